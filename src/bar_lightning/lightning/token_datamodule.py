"""LightningDataModule serving bit-token batches to the BAR generator.

Batches are ``{"bits": int64[B, tokens * bits_per_token], "label": int64[B], "key": list[str]}``.

Per-epoch flip choice: the training DataLoader sets the dataset's epoch to ``trainer.current_epoch`` each time
Lightning starts iterating it (every epoch, after ``on_train_epoch_start``), so no callback or LightningModule
hook is needed. Outside a Trainer, call :meth:`TokenDataModule.set_epoch` before iterating. Lightning adds the
DistributedSampler itself under DDP (it re-creates the DataLoader; the epoch hook survives that).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler

from bar_lightning.data.tokens import PretokenizedTokens, SyntheticBitTokens

# Offset of the held-out synthetic set's sample seed: same class prototypes, independent noise draws.
_VAL_SAMPLE_SEED_OFFSET = 1_000_003


class EpochSyncedDataLoader(DataLoader):
    """DataLoader that calls ``dataset.set_epoch(epoch_fn())`` (if the dataset has it) whenever iteration starts.

    ``epoch_fn`` is an ``__init__`` argument stored under the same name so Lightning can re-create the
    loader with a distributed sampler without losing it.
    """

    def __init__(self, dataset: Any, *, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_fn is not None and hasattr(self.dataset, "set_epoch"):
            # Before super().__iter__(): that is when indices are sent to (possibly persistent) workers.
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for `(seed, epoch, stream)`, independent of the global random streams."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]) >> 1


_ORDER_STREAM = 0x4F524452  # "ORDR": the shuffling permutation
_WORKER_STREAM = 0x574B5253  # "WKRS": the base seed of DataLoader workers


class _SkipFirstBatches:
    """A batch sampler that drops its first `count` batches of indices (drawn, so the order stays the same)."""

    def __init__(self, batch_sampler: Iterable[list[int]], count: int) -> None:
        self.batch_sampler = batch_sampler
        self.count = count

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.count)  # type: ignore[arg-type]


class ResumableDataLoader(EpochSyncedDataLoader):
    """Map-style training loader whose position is saved in checkpoints, so a resumed fit continues mid-epoch exactly.

    * The order of epoch `e` is a pure function of `(seed, e)`: the shuffling permutation and the workers' base
      seed come from generators re-seeded when each epoch's iteration starts, never from the global torch stream
      (which the training step uses; see `RandomStateCheckpoint`).
    * `state_dict()` is `{"epoch", "batches_yielded"}`; Lightning stores it in each checkpoint (its fit loop saves
      the state of stateful loaders) and calls `load_state_dict` on resume. The next iteration of that epoch then
      draws the same permutation and skips the batches already trained on, without loading them.

    Under DDP Lightning swaps in a `DistributedSampler` (seeded, `set_epoch` per epoch), which keeps both properties.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int = 0,
        shuffle: bool = False,
        epoch_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        # Lightning re-creates the loader from these same arguments (e.g. with a DistributedSampler); a generator
        # it passes back is this loader's own worker-seed generator and is reused.
        self.seed = seed
        self._order_generator = torch.Generator()
        worker_generator = kwargs.pop("generator", None) or torch.Generator()
        if shuffle:
            kwargs["sampler"] = RandomSampler(dataset, generator=self._order_generator)
        super().__init__(dataset, epoch_fn=epoch_fn, generator=worker_generator, **kwargs)
        self._iteration_epoch = 0
        self._batches_yielded = 0
        self._resume_position: dict[str, int] | None = None
        self._batches_to_skip = 0

    @property
    def _index_sampler(self) -> Any:
        # Read by the DataLoader iterator when it starts (and by persistent workers' resets) to draw index batches.
        index_sampler = super()._index_sampler
        return _SkipFirstBatches(index_sampler, self._batches_to_skip) if self._batches_to_skip else index_sampler

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._iteration_epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_position = {"epoch": int(state_dict["epoch"]), "batches_yielded": int(state_dict["batches_yielded"])}

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iteration_epoch
        self._order_generator.manual_seed(_epoch_seed(self.seed, epoch, _ORDER_STREAM))
        self.generator.manual_seed(_epoch_seed(self.seed, epoch, _WORKER_STREAM))
        resume, self._resume_position = self._resume_position, None
        skip = resume["batches_yielded"] if resume is not None and resume["epoch"] == epoch else 0
        self._iteration_epoch, self._batches_yielded = epoch, skip
        self._batches_to_skip = skip
        try:
            iterator = super().__iter__()
        finally:
            self._batches_to_skip = 0
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches_yielded += 1
            yield batch


class EpochSyncedDataModule(LightningDataModule):
    """Tracks the epoch whose random choices the training dataset uses (its `set_epoch`).

    Inside a Trainer the epoch comes from `trainer.current_epoch` (read by `EpochSyncedDataLoader` each time
    iteration starts); outside one, call `set_epoch`. Subclasses set `self._epoch` and `self.train_dataset`.
    """

    _epoch: int = 0
    train_dataset: Any = None

    def set_epoch(self, epoch: int) -> None:
        """Select the training random choices of ``epoch`` (only needed outside a Trainer)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch = int(epoch)
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(self._epoch)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch


def worker_options(num_workers: int, pin_memory: bool | None, persistent_workers: bool | None) -> dict[str, Any]:
    """The DataLoader's worker keywords of every DataModule here, with None resolved: `pin_memory` on where CUDA is
    available (asynchronous host-to-device copies), `persistent_workers` where there are worker processes."""
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "persistent_workers": num_workers > 0 if persistent_workers is None else persistent_workers,
    }


class TokenDataModule(EpochSyncedDataModule):
    """Pretokenized (upstream ``.npz`` layout) or synthetic bit tokens for the BAR generator.

    ``val_num_samples`` > 0 adds a held-out synthetic validation set (same class prototypes, different sample
    seed); pretokenized data has no validation split here (upstream pretokenizes only ``train``).
    ``pin_memory``/``persistent_workers`` default to "CUDA available"/"num_workers > 0".

    The arguments are the ``data`` values that ``validate_train_config`` checked (``check_token_data``) and are
    trusted here; the token files are checked when ``setup`` reads them. Built by hand, a bad value is refused
    where it is used (the datasets, the DataLoader, ``setup`` for an unknown source), except ``val_num_samples``,
    which below 1 or with pretokenized data only means no validation set.
    """

    def __init__(
        self,
        *,
        source: str,
        root: str | None = None,
        batch_size: int,
        num_workers: int = 0,
        tokens: int,
        bits_per_token: int,
        num_classes: int,
        flip_probability: float = 0.5,
        synthetic_num_samples: int = 1024,
        synthetic_noise: float = 0.1,
        val_num_samples: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        drop_last: bool = True,
        split: str = "train",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokens = tokens
        self.bits_per_token = bits_per_token
        self.num_classes = num_classes
        self.flip_probability = flip_probability
        self.synthetic_num_samples = synthetic_num_samples
        self.synthetic_noise = synthetic_noise
        self.val_num_samples = val_num_samples
        self.seed = seed
        self.worker_options = worker_options(num_workers, pin_memory, persistent_workers)
        self.drop_last = drop_last
        self.train_dataset: PretokenizedTokens | SyntheticBitTokens | None = None
        self.val_dataset: SyntheticBitTokens | None = None
        self._epoch = 0

    @property
    def sequence_bits(self) -> int:
        """Bits per image: tokens * bits_per_token."""
        return self.tokens * self.bits_per_token

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        if self.source == "pretokenized":
            assert self.root is not None
            dataset = PretokenizedTokens(
                self.root,
                split=self.split,
                flip_probability=self.flip_probability,
                expected_length=self.sequence_bits,
                seed=self.seed,
                bits_per_token=self.bits_per_token,
            )
            if len(dataset.classes) > self.num_classes:
                raise ValueError(
                    f"{dataset.split_dir} has {len(dataset.classes)} class folders, so labels reach "
                    f"{len(dataset.classes) - 1}, but num_classes={self.num_classes}; set num_classes to at least "
                    f"{len(dataset.classes)}"
                )
        elif self.source == "synthetic":
            dataset = SyntheticBitTokens(
                self.synthetic_num_samples,
                self.num_classes,
                self.tokens,
                self.bits_per_token,
                seed=self.seed,
                noise=self.synthetic_noise,
            )
            if self.val_num_samples > 0:
                self.val_dataset = SyntheticBitTokens(
                    self.val_num_samples,
                    self.num_classes,
                    self.tokens,
                    self.bits_per_token,
                    seed=self.seed,
                    noise=self.synthetic_noise,
                    sample_seed=self.seed + _VAL_SAMPLE_SEED_OFFSET,
                )
        else:
            # Not a repeat of the config's check: a module built by hand would otherwise train on synthetic tokens.
            raise ValueError(f"source={self.source!r} is not a token source; use 'pretokenized' or 'synthetic'")
        if self.drop_last and len(dataset) < self.batch_size:
            from bar_lightning.config.schema import ConfigError

            raise ConfigError(
                f"the training set has {len(dataset)} items, fewer than batch_size={self.batch_size} with "
                "drop_last=True, so an epoch would have no batches; lower data.batch_size or add data"
            )
        dataset.set_epoch(self._epoch)
        self.train_dataset = dataset

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            **self.worker_options,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return ResumableDataLoader(
            self.train_dataset,
            seed=self.seed,
            epoch_fn=self._current_epoch,
            shuffle=True,
            drop_last=self.drop_last,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out synthetic set, or an empty list (Lightning then skips validation)."""
        if self.val_dataset is None:
            return []
        # Its own generator: starting a validation pass must not draw from the global stream training uses.
        return DataLoader(self.val_dataset, shuffle=False, drop_last=False,
                          generator=torch.Generator().manual_seed(self.seed), **self._loader_kwargs())
