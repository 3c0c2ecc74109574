"""LightningDataModule serving bit-token batches to the BAR generator.

Batches are ``{"bits": int64[B, tokens * bits_per_token], "label": int64[B], "key": list[str]}``.

Per-epoch flip choice: the training DataLoader sets the dataset's epoch to ``trainer.current_epoch`` each time
Lightning starts iterating it (every epoch, after ``on_train_epoch_start``), so no callback or LightningModule
hook is needed. Outside a Trainer, call :meth:`TokenDataModule.set_epoch` before iterating. Lightning adds the
DistributedSampler itself under DDP (it re-creates the DataLoader; the epoch hook survives that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from bar_lightning.data.tokens import PretokenizedTokens, SyntheticBitTokens

SOURCES = ("pretokenized", "synthetic")

# Offset of the held-out synthetic set's sample seed: same class prototypes, independent noise draws.
_VAL_SAMPLE_SEED_OFFSET = 1_000_003


class EpochSyncedDataLoader(DataLoader):
    """DataLoader that calls ``dataset.set_epoch(epoch_fn())`` whenever iteration starts.

    ``epoch_fn`` is an ``__init__`` argument stored under the same name so Lightning can re-create the
    loader with a distributed sampler without losing it.
    """

    def __init__(self, dataset: Any, *, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_fn is not None:
            # Before super().__iter__(): that is when indices are sent to (possibly persistent) workers.
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


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


class TokenDataModule(EpochSyncedDataModule):
    """Pretokenized (upstream ``.npz`` layout) or synthetic bit tokens for the BAR generator.

    ``val_num_samples`` > 0 adds a held-out synthetic validation set (same class prototypes, different sample
    seed); pretokenized data has no validation split here (upstream pretokenizes only ``train``).
    ``pin_memory``/``persistent_workers`` default to "CUDA available"/"num_workers > 0".
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
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("tokens", tokens),
            ("bits_per_token", bits_per_token),
            ("num_classes", num_classes),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        if source == "pretokenized":
            if not root:
                raise ValueError(
                    "source='pretokenized' needs root (the folder holding metadata.json and train/), got "
                    f"{root!r}; use source='synthetic' to train without pretokenized data"
                )
            if val_num_samples:
                raise ValueError(
                    f"val_num_samples={val_num_samples} applies only to source='synthetic'; set it to 0"
                )
        else:
            if synthetic_num_samples <= 0:
                raise ValueError(f"synthetic_num_samples must be positive, got {synthetic_num_samples}")
            if not 0.0 <= synthetic_noise <= 1.0:
                raise ValueError(f"synthetic_noise must be in [0, 1], got {synthetic_noise}")
            if val_num_samples < 0:
                raise ValueError(f"val_num_samples must be >= 0, got {val_num_samples}")
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
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
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
        else:
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
        if self.drop_last and len(dataset) < self.batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} items, fewer than batch_size={self.batch_size} with "
                "drop_last=True, so an epoch would have no batches; lower batch_size or add data"
            )
        dataset.set_epoch(self._epoch)
        self.train_dataset = dataset

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return EpochSyncedDataLoader(
            self.train_dataset,
            epoch_fn=self._current_epoch,
            shuffle=True,
            drop_last=self.drop_last,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out synthetic set, or an empty list (Lightning then skips validation)."""
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, shuffle=False, drop_last=False, **self._loader_kwargs())
