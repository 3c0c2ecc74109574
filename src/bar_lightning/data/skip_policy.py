"""Bad data in the image pipelines: the errors, the warning, :class:`SkipCounter` and :class:`SkipPolicy`.

Which items are skipped in training and which raise in the strict pipelines (evaluation, pretokenization) is
described in :mod:`bar_lightning.data.images` ("Bad data").
"""

from __future__ import annotations

import multiprocessing
import warnings
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from bar_lightning.data.shards import CONVERT_HINT, ShardDataError

# Why an item was skipped. "unreadable_shard" and "empty_shard" are one whole shard, the rest one sample.
SKIP_REASONS = (
    "unreadable_shard",
    "empty_shard",
    "duplicate_key",
    "missing_image",
    "missing_label",
    "bad_label",
    "undecodable_image",
    "oversized_image",
)


# --------------------------------------------------------------------------------------------------------------
# Errors, warnings and the skip counter
# --------------------------------------------------------------------------------------------------------------


class BadSampleError(ShardDataError):
    """A bad sample or an unreadable shard in a strict pipeline (evaluation, pretokenization)."""


class SkipRateExceededError(ShardDataError):
    """Training skipped a larger fraction of the data than ``max_skip_rate`` allows."""


class BadSampleWarning(UserWarning):
    """A training sample or shard was skipped; the message names the shard and the key."""


class SkipCounter:
    """Counts items seen and skipped (in total and per reason) in memory shared with DataLoader workers.

    The counts live in shared memory that DataLoader workers receive when they start (by fork, spawn or
    forkserver), so the object in the main process (``datamodule.skip_counter``) shows the skips of all workers
    of this rank, live, whether there are no workers, persistent ones or ones re-created every epoch. Each
    process writes only its own row (row 0: the main process, row ``i + 1``: worker ``i``), so no lock is
    needed; readers sum the rows. Pickling it other than to start a worker (deepcopy, checkpoints) gives a
    detached copy with the current counts.
    """

    _SEEN = 0
    _SKIPPED = 1
    _FIRST_REASON = 2
    _FIELDS = _FIRST_REASON + len(SKIP_REASONS)

    def __init__(self, *, max_workers: int = 64) -> None:
        if not isinstance(max_workers, int) or max_workers < 0:
            raise ValueError(f"max_workers must be a non-negative integer, got {max_workers!r}")
        self.max_workers = max_workers
        self._counts = multiprocessing.RawArray("q", (max_workers + 1) * self._FIELDS)

    def __getstate__(self) -> dict[str, Any]:
        if get_spawning_popen() is not None:
            # Being sent to a new worker process: hand over the shared memory itself.
            return {"max_workers": self.max_workers, "shared_counts": self._counts}
        return {"max_workers": self.max_workers, "count_values": list(self._counts)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_workers = state["max_workers"]
        if "shared_counts" in state:
            self._counts = state["shared_counts"]
        else:
            self._counts = multiprocessing.RawArray("q", state["count_values"])

    def _rows(self) -> np.ndarray:
        return np.frombuffer(self._counts, dtype=np.int64).reshape(self.max_workers + 1, self._FIELDS)

    def _totals(self) -> np.ndarray:
        return self._rows().sum(axis=0)

    def record(self, *, seen: int = 0, reason: str | None = None) -> tuple[int, int]:
        """Add ``seen`` items and, with ``reason``, one skipped item; return the new totals ``(seen, skipped)``."""
        if reason is not None and reason not in SKIP_REASONS:
            raise ValueError(f"reason must be one of {SKIP_REASONS}, got {reason!r}")
        info = get_worker_info()
        row_index = 0 if info is None else info.id + 1
        if row_index > self.max_workers:
            raise ValueError(
                f"SkipCounter(max_workers={self.max_workers}) has no row for DataLoader worker {info.id}; create "
                f"it with max_workers >= {info.num_workers}"
            )
        row = self._rows()[row_index]
        row[self._SEEN] += seen
        if reason is not None:
            row[self._SKIPPED] += 1
            row[self._FIRST_REASON + SKIP_REASONS.index(reason)] += 1
        totals = self._totals()
        return int(totals[self._SEEN]), int(totals[self._SKIPPED])

    def reset(self) -> None:
        self._rows()[:] = 0

    @property
    def seen(self) -> int:
        """Samples read (valid or not) plus unreadable shards."""
        return int(self._totals()[self._SEEN])

    @property
    def skipped(self) -> int:
        """Bad samples plus unreadable shards, all skipped."""
        return int(self._totals()[self._SKIPPED])

    @property
    def by_reason(self) -> dict[str, int]:
        """Skips per reason in :data:`SKIP_REASONS`."""
        totals = self._totals()
        return {reason: int(totals[self._FIRST_REASON + i]) for i, reason in enumerate(SKIP_REASONS)}

    @property
    def skip_rate(self) -> float:
        totals = self._totals()
        return float(totals[self._SKIPPED] / totals[self._SEEN]) if totals[self._SEEN] else 0.0

    def __repr__(self) -> str:
        return f"SkipCounter(seen={self.seen}, skipped={self.skipped}, by_reason={self.by_reason})"


class SkipPolicy:
    """What a pipeline does with a bad item: raise (``strict``) or count, warn, skip and watch the skip rate."""

    def __init__(
        self,
        *,
        counter: SkipCounter,
        strict: bool,
        max_skip_rate: float = 0.01,
        min_samples_for_skip_rate: int = 100,
    ) -> None:
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        if min_samples_for_skip_rate < 1:
            raise ValueError(f"min_samples_for_skip_rate must be >= 1, got {min_samples_for_skip_rate}")
        self.counter = counter
        self.strict = strict
        self.max_skip_rate = max_skip_rate
        self.min_samples_for_skip_rate = min_samples_for_skip_rate

    def accept(self) -> None:
        """Count one good-so-far sample."""
        seen, skipped = self.counter.record(seen=1)
        self._check_rate(seen, skipped)

    def skip(
        self, *, reason: str, shard: str, key: str | None, detail: str, already_seen: bool = False
    ) -> None:
        """Raise (strict) or count, warn and let the caller drop the item.

        ``already_seen``: the item was counted by :meth:`accept` before (a sample that passed the shard reader and
        failed decoding), so only the skip is added.
        """
        where = f"shard {shard}" if key is None else f"sample {key!r} in shard {shard}"
        if self.strict:
            raise BadSampleError(
                f"{reason}: {where}: {detail}. Evaluation and pretokenization never skip data; fix or re-create "
                f"this shard ({CONVERT_HINT}) or remove it from the shard list"
            )
        seen, skipped = self.counter.record(seen=0 if already_seen else 1, reason=reason)
        warnings.warn(
            f"skipping {reason}: {where}: {detail} ({skipped} skipped of {seen} seen)",
            BadSampleWarning,
            stacklevel=2,
        )
        self._check_rate(seen, skipped)

    def _check_rate(self, seen: int, skipped: int) -> None:
        if self.strict or seen < self.min_samples_for_skip_rate:
            return
        if skipped / seen > self.max_skip_rate:
            raise SkipRateExceededError(
                f"skipped {skipped} of {seen} training items ({skipped / seen:.2%}), more than "
                f"max_skip_rate={self.max_skip_rate:.2%}; skips by reason: {self.counter.by_reason}. The shards "
                "look broken (see the BadSampleWarning messages for shards and keys): re-create them, or raise "
                "max_skip_rate if this much loss is acceptable"
            )
