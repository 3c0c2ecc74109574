"""Image shards (webdataset) for tokenizer training, reconstruction evaluation and pretokenization.

Shard layout (as written by ``python -m bar_lightning.data.convert`` and by upstream's ImageNet converter)::

    <key>.png | <key>.jpg | <key>.jpeg | <key>.webp   # the image (grey or RGBA images are converted to RGB)
    <key>.cls                                         # the integer class label as text, e.g. b"417"

Every dataset item is a dict ``{"image": float32[3, crop, crop] in [-1, 1], "label": int, "key": str}``;
the DataLoader batches them into ``{"image": [B, 3, H, W], "label": int64[B], "key": list[str]}``.

Two pipelines:

* Training (:func:`make_train_dataset`): shards are drawn *with replacement* (``wds.ResampledShards``) and
  independently on every rank and DataLoader worker, each from its own random stream seeded by
  ``(seed, rank, worker, epoch)``, so nothing is split between ranks or workers and no two streams coincide.
  Samples pass a shuffle buffer, then decoding and augmentation. ``with_epoch`` cuts the endless stream into
  epochs of a fixed number of samples per worker (a multiple of the batch size), so every rank yields the
  same number of batches and ``len(dataloader)`` is exact.
* Evaluation (:func:`make_eval_dataset`): every shard is read exactly once over all ranks and workers
  (``shards[rank::world_size]``, then ``[worker::num_workers]``), in order, without shuffling or resampling.

Bad data. Shards are read by :mod:`bar_lightning.data.shards` (the one reader: only images and labels, plain
tar, a pixel budget, truncation detected). Training skips a bad sample (undecodable or oversized image, missing
image or ``cls``, a label that is not a non-negative integer, a key already seen in the same shard), a shard that
cannot be read to its end (truncated, corrupt, compressed, file gone, not what its index says) and a shard without
samples, with a :class:`BadSampleWarning` naming the shard and the key, and counts it in a :class:`SkipCounter`.
Once ``min_samples_for_skip_rate`` items were seen, a skip rate above ``max_skip_rate`` stops training with
:class:`SkipRateExceededError`: a few broken files are normal, many mean broken data. Strict pipelines
(evaluation, pretokenization) raise :class:`BadSampleError` at the first bad sample or shard, because a metric over
a silently reduced set is not comparable.

Randomness of augmentations (crop position, flip) comes from torch's global generator; DataLoader workers get
distinct torch seeds, and ``lightning.seed_everything(seed, workers=True)`` also makes them differ across ranks.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

from bar_lightning.data.shards import (
    CONVERT_HINT,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    MIN_DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    OversizedMember,
    Shard,
    ShardDataError,
    ShardReadError,
    decode_image,
    expand_shards,
    parse_label,
    read_shard_samples,
)

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

# Normalisation to [-1, 1], as BAR's tokenizer expects (upstream: mean = std = 0.5 per channel).
_NORMALIZE_MEAN = (0.5, 0.5, 0.5)
_NORMALIZE_STD = (0.5, 0.5, 0.5)

# Distinct stream tags so that the shard draws and the shuffle buffer never share a random stream.
_SHARD_STREAM = 0x53484152  # "SHAR"
_SHUFFLE_STREAM = 0x53485546  # "SHUF"

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


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------


class _ToRGB:
    """Convert a PIL image of any mode (grey, palette, RGBA, ...) to RGB; a class so that it pickles."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "_ToRGB()"


def build_image_transform(
    *, resize_shorter_edge: int, crop_size: int, random_crop: bool, random_flip: bool
) -> v2.Compose:
    """PIL image -> float32 tensor [3, crop_size, crop_size] in [-1, 1] (upstream's augmentation).

    Resize the shorter edge to ``resize_shorter_edge`` (bicubic, antialiased), crop ``crop_size`` at a random
    position or in the centre, optionally flip horizontally. Geometry runs on the PIL image, as upstream does, so
    the values stay within [0, 255] before scaling.
    """
    if not isinstance(crop_size, int) or crop_size <= 0:
        raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
    if not isinstance(resize_shorter_edge, int) or resize_shorter_edge < crop_size:
        raise ValueError(
            f"resize_shorter_edge must be an integer >= crop_size={crop_size} so a full crop fits, got "
            f"{resize_shorter_edge!r}"
        )
    steps: list[Callable[[Any], Any]] = [
        _ToRGB(),
        v2.Resize(resize_shorter_edge, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomCrop(crop_size) if random_crop else v2.CenterCrop(crop_size),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(_NORMALIZE_MEAN), std=list(_NORMALIZE_STD)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


def build_eval_transform(*, crop_size: int) -> v2.Compose:
    """Evaluation transform: shorter edge to ``crop_size``, centre crop, no flip (upstream's eval transform)."""
    return build_image_transform(
        resize_shorter_edge=crop_size, crop_size=crop_size, random_crop=False, random_flip=False
    )


# --------------------------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------------------------


def expand_shard_pattern(pattern: str | Sequence[str]) -> list[str]:
    """The shard files a spec names (see :func:`bar_lightning.data.shards.expand_shards`), as paths or URLs."""
    return [shard.url for shard in expand_shards(pattern)]


def shards_for_rank_and_worker(
    shards: Sequence[Any], *, rank: int, world_size: int, worker_id: int, num_workers: int
) -> list[Any]:
    """The shards one evaluation worker reads: rank-strided, then worker-strided; every shard exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id must be in [0, num_workers={num_workers}), got {worker_id}")
    return list(shards)[rank::world_size][worker_id::num_workers]


def samples_per_worker_for_epoch(
    *, samples_per_epoch: int, world_size: int, num_workers: int, batch_size: int
) -> int:
    """Samples each training worker yields per epoch: whole batches, at least ``samples_per_epoch`` over all.

    ``num_workers`` is per rank; 0 (loading in the main process) counts as one.
    """
    for name, value in (("samples_per_epoch", samples_per_epoch), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    streams = world_size * max(1, num_workers)
    batches_per_worker = math.ceil(samples_per_epoch / (streams * batch_size))
    return batches_per_worker * batch_size


def _derived_seed(*coordinates: int) -> int:
    """A 63-bit seed that mixes integer coordinates well (unlike webdataset's ``make_seed``)."""
    state = np.random.SeedSequence([int(c) for c in coordinates]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def _current_worker() -> tuple[int, int]:
    """(worker_id, num_workers) of the DataLoader worker running this code; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------------------------


def samples_of_shard(shard: Shard, *, policy: SkipPolicy, max_image_pixels: int) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (see :func:`read_shard_samples`), duplicates removed, problems sent to ``policy``.

    A shard that cannot be read to its end is one skip (its samples before the damage are kept); one without any
    sample is another. A strict policy raises instead.
    """
    keys_in_shard: set[str] = set()
    samples = read_shard_samples(shard, max_image_pixels=max_image_pixels)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except ShardReadError as error:
            policy.skip(reason="unreadable_shard", shard=shard.url, key=None, detail=str(error))
            return
        key = sample["__key__"]
        if key in keys_in_shard:
            # Kept: the first sample under this key; a repeat would be a second, different "same" image.
            policy.skip(reason="duplicate_key", shard=shard.url, key=key, detail="the key occurs twice in the shard")
            continue
        keys_in_shard.add(key)
        policy.accept()
        yield sample
    if not keys_in_shard:
        policy.skip(reason="empty_shard", shard=shard.url, key=None, detail="the shard holds no sample")


def _read_shards(
    shard_source: Iterable[Shard],
    *,
    policy: SkipPolicy,
    max_image_pixels: int,
    max_consecutive_empty_shards: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of each shard in turn; ``max_consecutive_empty_shards`` guards an endless (resampled) source.

    Without the guard, resampling a shard set in which no shard holds a sample would loop forever in silence.
    """
    consecutive_empty_shards = 0
    for shard in shard_source:
        shard_was_empty = True
        for sample in samples_of_shard(shard, policy=policy, max_image_pixels=max_image_pixels):
            shard_was_empty = False
            yield sample
        consecutive_empty_shards = consecutive_empty_shards + 1 if shard_was_empty else 0
        if (
            max_consecutive_empty_shards is not None
            and consecutive_empty_shards > max_consecutive_empty_shards
        ):
            raise ShardDataError(
                f"{consecutive_empty_shards} shards in a row held no usable sample (last: {shard.url}); the "
                f"training shards look empty or unreadable; check them or {CONVERT_HINT}"
            )


def _decode_and_transform(
    samples: Iterable[dict[str, Any]],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    policy: SkipPolicy,
    max_image_pixels: int,
) -> Iterator[dict[str, Any]]:
    for sample in samples:
        decoded = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
        if decoded is not None:
            image, label = decoded
            yield {"image": transform(image), "label": label, "key": sample["__key__"]}


def decode_sample(
    sample: dict[str, Any], *, policy: SkipPolicy, max_image_pixels: int
) -> tuple[Image.Image, int] | None:
    """``(RGB image, label)`` of a raw sample, or None after reporting why it is bad to ``policy``.

    The one place a shard sample's image and label are decoded: training, evaluation and pretokenization share it.
    """
    shard, key = sample["__url__"], sample["__key__"]

    def bad(reason: str, detail: str) -> None:
        policy.skip(reason=reason, shard=shard, key=key, already_seen=True, detail=detail)

    image_extension = next((ext for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
    if image_extension is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        bad("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry (has {present})")
        return None
    if sample.get(LABEL_EXTENSION) is None:
        bad("missing_label", "no cls entry")
        return None
    for extension in (image_extension, LABEL_EXTENSION):
        member = sample[extension]
        if isinstance(member, OversizedMember):
            reason = "bad_label" if extension == LABEL_EXTENSION else "oversized_image"
            bad(reason, f"{extension} is {member.size:,} bytes, over the {member.limit:,} read for it (not read)")
            return None
    try:
        label = parse_label(sample[LABEL_EXTENSION])
    except ValueError as error:
        bad("bad_label", str(error))
        return None
    try:
        image = decode_image(sample[image_extension], max_pixels=max_image_pixels)
    except ImageTooLargeError as error:
        bad("oversized_image", f"{image_extension} is {error}; raise data.max_image_pixels if such images are wanted")
        return None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        bad("undecodable_image", f"{image_extension} does not decode ({type(error).__name__}: {error})")
        return None
    return image, label


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class ImageShardDataset(wds.DataPipeline):
    """Image items from webdataset shards; build it with :func:`make_train_dataset` or :func:`make_eval_dataset`.

    The pipeline is assembled per iteration (``iterator1``) because its random streams depend on the DataLoader
    worker running it and on the epoch, which are only known then.
    """

    def __init__(
        self,
        *,
        shards: Sequence[Shard],
        transform: Callable[[Image.Image], torch.Tensor],
        policy: SkipPolicy,
        resampled: bool,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 or 1: no shuffling), got {shuffle_buffer}")
        if not isinstance(max_image_pixels, int) or max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        self.shards = [shard if isinstance(shard, Shard) else Shard(url=str(shard)) for shard in shards]
        self.max_image_pixels = max_image_pixels
        self.transform = transform
        self.policy = policy
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._iteration_epoch = 0

    @property
    def skip_counter(self) -> SkipCounter:
        return self.policy.counter

    def set_epoch(self, epoch: int) -> None:
        """Select the random streams of ``epoch`` (for the next iteration; workers copy it when they start)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Persistent workers never see set_epoch() again, so each new iteration moves on to the next epoch.
        self._iteration_epoch = self.epoch
        self.epoch += 1
        return super().__iter__()

    def iterator1(self) -> Iterator[dict[str, Any]]:
        worker_id, num_workers = _current_worker()
        stream = (self.seed, self.rank, worker_id, self._iteration_epoch)
        if self.resampled:
            shard_seed = _derived_seed(*stream, _SHARD_STREAM)
            by_url = {shard.url: shard for shard in self.shards}
            # deterministic=True: webdataset mixes only our seed and its own epoch (no pid or clock).
            draws = wds.ResampledShards([shard.url for shard in self.shards], worker_seed=lambda: shard_seed,
                                        deterministic=True)
            shard_source: Iterable[Shard] = (by_url[draw["url"]] for draw in draws)
        else:
            shard_source = shards_for_rank_and_worker(
                self.shards, rank=self.rank, world_size=self.world_size, worker_id=worker_id, num_workers=num_workers
            )
        samples = _read_shards(
            shard_source,
            policy=self.policy,
            max_image_pixels=self.max_image_pixels,
            # Far beyond chance: with one usable shard in n, n * 50 empty draws in a row have odds of ~e^-50.
            max_consecutive_empty_shards=50 * len(self.shards) if self.resampled else None,
        )
        if self.shuffle_buffer > 1:
            shuffle = wds.shuffle(
                bufsize=self.shuffle_buffer,
                # Start yielding once a fifth of the buffer is full, as upstream does (1000 of 5000).
                initial=max(1, self.shuffle_buffer // 5),
                rng=random.Random(_derived_seed(*stream, _SHUFFLE_STREAM)),
            )
            samples = shuffle(samples)
        return _decode_and_transform(
            samples, transform=self.transform, policy=self.policy, max_image_pixels=self.max_image_pixels
        )


class SizedImageShardDataset(ImageShardDataset):
    """A training dataset whose epoch length is fixed by ``with_epoch``, so it can report ``len()``."""

    def __init__(self, *, samples_per_worker: int, num_workers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples_per_worker = samples_per_worker
        self.num_workers = num_workers
        self.with_epoch(samples_per_worker)

    def __len__(self) -> int:
        """Samples per epoch on this rank: every worker yields ``samples_per_worker``."""
        return self.samples_per_worker * max(1, self.num_workers)


def make_train_dataset(
    *,
    shards: str | Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    samples_per_epoch: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    max_skip_rate: float = 0.01,
    min_samples_for_skip_rate: int = 100,
    skip_counter: SkipCounter | None = None,
    max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS,
) -> SizedImageShardDataset:
    """Endless resampled training stream cut into epochs of ``samples_per_epoch`` (rounded up to whole batches).

    ``num_workers`` must equal the DataLoader's (it sets the per-worker epoch length); ``batch_size`` is per rank
    and the DataLoader must use it with ``drop_last=True``.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    samples_per_worker = samples_per_worker_for_epoch(
        samples_per_epoch=samples_per_epoch,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
    )
    policy = SkipPolicy(
        counter=skip_counter if skip_counter is not None else SkipCounter(max_workers=num_workers),
        strict=False,
        max_skip_rate=max_skip_rate,
        min_samples_for_skip_rate=min_samples_for_skip_rate,
    )
    return SizedImageShardDataset(
        samples_per_worker=samples_per_worker,
        num_workers=num_workers,
        shards=expand_shards(shards),
        transform=transform,
        policy=policy,
        resampled=True,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        max_image_pixels=max_image_pixels,
    )


def make_eval_dataset(
    *,
    shards: str | Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
    skip_counter: SkipCounter | None = None,
    max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageShardDataset:
    """Every sample of ``shards`` exactly once over all ranks and workers, in shard order; raises on bad data.

    Ranks get whole shards (``shards[rank::world_size]``), so they may hold different numbers of samples:
    aggregate metrics with cross-rank sums (torchmetrics), not per-step collectives.
    """
    shard_list = expand_shards(shards)
    if len(shard_list) < world_size:
        warnings.warn(
            f"{len(shard_list)} evaluation shards for world_size={world_size}: ranks from {len(shard_list)} on "
            "get no shard and evaluate nothing; write more, smaller shards (convert --max-count) to use all ranks",
            stacklevel=2,
        )
    policy = SkipPolicy(counter=skip_counter if skip_counter is not None else SkipCounter(), strict=True)
    return ImageShardDataset(
        shards=shard_list,
        transform=transform,
        policy=policy,
        resampled=False,
        rank=rank,
        world_size=world_size,
        seed=0,
        shuffle_buffer=0,
        max_image_pixels=max_image_pixels,
    )


class SyntheticImages(torch.utils.data.Dataset):
    """Seeded synthetic images for tests and smoke runs: a colour gradient with a few rectangles and discs.

    Item `index` is always the same image (derived from `(seed, index)`), `[3, size, size]` in [-1, 1], with label
    `index % num_classes` (the number of shapes depends on the label, so there is something class-dependent).
    """

    def __init__(self, *, num_samples: int, image_size: int, num_classes: int = 10, seed: int = 0) -> None:
        if num_samples <= 0 or image_size <= 0:
            raise ValueError(f"num_samples={num_samples} and image_size={image_size} must be positive")
        self.num_samples, self.image_size, self.num_classes, self.seed = num_samples, image_size, num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size, label = self.image_size, index % self.num_classes
        axis = torch.linspace(-1, 1, size)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        colour_a, colour_b = torch.rand(2, 3, 1, 1, generator=generator) * 2 - 1
        mix = (rows * torch.rand(1, generator=generator) + cols * torch.rand(1, generator=generator)).clamp(-1, 1)
        image = colour_a * (1 + mix) / 2 + colour_b * (1 - mix) / 2  # [3, H, W]
        for shape in range(1 + label % 3):
            centre = torch.rand(2, generator=generator) * 1.6 - 0.8
            radius = 0.15 + 0.3 * torch.rand(1, generator=generator)
            colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
            if shape % 2 == 0:
                inside = ((rows - centre[0]).abs() < radius) & ((cols - centre[1]).abs() < radius)
            else:
                inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2
            image = torch.where(inside, colour, image)
        return {"image": image.clamp(-1, 1), "label": torch.tensor(label), "key": f"synthetic/{index}"}
