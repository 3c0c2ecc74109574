"""LightningDataModule serving image batches from webdataset shards (tokenizer training, reconstruction eval).

Batches are ``{"image": float32[B, 3, crop, crop] in [-1, 1], "label": int64[B], "key": list[str]}``.

Training reads ``train_shards`` resampled and independently on every rank and worker (see
:mod:`bar_lightning.data.images`), in epochs of ``samples_per_epoch`` samples over all ranks, rounded up so that
every worker yields whole batches; ``len(train_dataloader())`` is exact and equal on all ranks. Because the data
set is an ``IterableDataset``, Lightning adds no ``DistributedSampler`` (``use_distributed_sampler`` has no effect
on it): the rank and world size come from the attached trainer (``trainer.global_rank``, ``trainer.world_size``)
when ``setup`` runs. Validation reads ``eval_shards`` once, split by rank and worker, and raises on bad data.
Lightning warns once that an ``IterableDataset`` with ``__len__`` may be inaccurate with several workers; here it
is exact.

Skipped training samples: :attr:`ImageDataModule.skip_counter` (a :class:`~bar_lightning.data.images.SkipCounter`)
counts them for this rank. Its counts live in shared memory that the DataLoader workers inherit, so the main
process sees every worker's skips as they happen, with or without (persistent) workers. This was chosen over a
per-batch ``skipped`` field because it needs nothing in the batch and nothing from the LightningModule's
``training_step`` beyond reading a number. To log it (``log_number`` writes a host number to the device with a
kernel; ``self.log`` of a plain float would wait on the GPU every step)::

    counter = self.trainer.datamodule.skip_counter
    log_number(self, "data/skipped", counter.skipped, on_step=True, reduce_fx="max")   # this rank
    log_number(self, "data/skip_rate", counter.skip_rate, on_step=True)

Every skip also emits a ``BadSampleWarning`` naming the shard and the key, and training stops with
``SkipRateExceededError`` when more than ``max_skip_rate`` of the items a rank has read were bad.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from bar_lightning.data.images import (
    ImageShardDataset,
    SizedImageShardDataset,
    SkipCounter,
    SyntheticImages,
    build_eval_transform,
    build_image_transform,
    expand_shard_pattern,
    make_eval_dataset,
    make_train_dataset,
)
from bar_lightning.data.shards import default_max_image_pixels
from bar_lightning.lightning.token_datamodule import (
    EpochSyncedDataLoader,
    EpochSyncedDataModule,
    ResumableDataLoader,
    worker_options,
)


def check_shard_sources(**sources: Any) -> None:
    """Every named shard spec resolves to existing shards; otherwise the error names `data.<key>` and its fix."""
    for key, spec in sources.items():
        if not spec:
            continue
        try:
            expand_shard_pattern(spec)
        except (OSError, ValueError) as error:
            hint = " (null: no validation)" if key == "eval_shards" else ""
            raise type(error)(f"data.{key}: {error}; set data.{key}=<shards>{hint}") from None


class ImageDataModule(EpochSyncedDataModule):
    """Webdataset image shards for the tokenizer: augmented, resampled training and strict, exact evaluation.

    ``batch_size`` and ``eval_batch_size`` are per rank; ``samples_per_epoch`` is global (all ranks).
    ``pin_memory``/``persistent_workers`` default to "CUDA available"/"num_workers > 0". Evaluation images are
    resized to ``crop_size`` on the shorter edge and centre-cropped (upstream's eval transform), whatever
    ``resize_shorter_edge`` is.
    """

    def __init__(
        self,
        *,
        train_shards: str,
        eval_shards: str | None = None,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        resize_shorter_edge: int,
        crop_size: int,
        random_crop: bool = True,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int,
        seed: int = 0,
        max_skip_rate: float = 0.01,
        min_samples_for_skip_rate: int = 100,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        super().__init__()
        if not train_shards:
            raise ValueError(
                f"train_shards must name shard files (a brace pattern or glob), got {train_shards!r}"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("samples_per_epoch", samples_per_epoch),
            ("crop_size", crop_size),
            ("resize_shorter_edge", resize_shorter_edge),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size <= 0):
            raise ValueError(
                f"eval_batch_size must be a positive integer or None (= batch_size), got {eval_batch_size!r}"
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if max_image_pixels is not None and (not isinstance(max_image_pixels, int) or max_image_pixels <= 0):
            raise ValueError(
                f"max_image_pixels must be a positive integer or None (max(4096², 16 x crop area)), got "
                f"{max_image_pixels!r}"
            )
        # Fail at construction, not deep inside a worker, when the transform sizes are inconsistent.
        self.train_transform = build_image_transform(
            resize_shorter_edge=resize_shorter_edge,
            crop_size=crop_size,
            random_crop=random_crop,
            random_flip=random_flip,
        )
        self.eval_transform = build_eval_transform(crop_size=crop_size)
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.eval_shards = eval_shards
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.max_skip_rate = max_skip_rate
        self.min_samples_for_skip_rate = min_samples_for_skip_rate
        self.worker_options = worker_options(num_workers, pin_memory, persistent_workers)
        self.skip_counter = SkipCounter(max_workers=num_workers)
        # Images over this many pixels are refused from their header, before they are decoded.
        self.max_image_pixels = max_image_pixels if max_image_pixels is not None else default_max_image_pixels(crop_size)
        self.train_dataset: SizedImageShardDataset | None = None
        self.eval_dataset: ImageShardDataset | None = None
        self._epoch = 0

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def prepare_data(self) -> None:
        # Runs before setup(): a wrong pattern fails here naming the config key and the pattern.
        check_shard_sources(train_shards=self.train_shards, eval_shards=self.eval_shards)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets for this rank (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        rank, world_size = self._rank_and_world_size()
        self.train_dataset = make_train_dataset(
            shards=self.train_shards,
            transform=self.train_transform,
            batch_size=self.batch_size,
            samples_per_epoch=self.samples_per_epoch,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_skip_rate=self.max_skip_rate,
            min_samples_for_skip_rate=self.min_samples_for_skip_rate,
            skip_counter=self.skip_counter,
            max_image_pixels=self.max_image_pixels,
        )
        self.train_dataset.set_epoch(self._epoch)
        if self.eval_shards:
            self.eval_dataset = make_eval_dataset(
                shards=self.eval_shards, transform=self.eval_transform, rank=rank, world_size=world_size,
                max_image_pixels=self.max_image_pixels,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        # Batched here rather than in the pipeline: each worker yields whole batches (its epoch length is a
        # multiple of batch_size), so drop_last never drops data it was asked to produce.
        return EpochSyncedDataLoader(
            self.train_dataset,
            epoch_fn=self._current_epoch,
            batch_size=self.batch_size,
            drop_last=True,
            **self.worker_options,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Every evaluation sample once over all ranks, or an empty list (Lightning then skips validation)."""
        if self.eval_shards is None:
            return []
        if self.eval_dataset is None:
            raise RuntimeError("call setup() before val_dataloader()")
        # Its own generator: starting a validation pass must not draw from the global stream training uses.
        return DataLoader(
            self.eval_dataset, batch_size=self.eval_batch_size, drop_last=False,
            generator=torch.Generator().manual_seed(self.seed), **self.worker_options
        )


class SyntheticImageDataModule(LightningDataModule):
    """Seeded synthetic images (see `SyntheticImages`) for the tiny tokenizer experiment and tests."""

    def __init__(self, *, image_size: int, batch_size: int, num_samples: int = 256, val_num_samples: int = 0,
                 num_classes: int = 10, seed: int = 0, num_workers: int = 0, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None) -> None:
        super().__init__()
        if batch_size <= 0 or batch_size > num_samples:
            raise ValueError(f"batch_size={batch_size} must be in 1..num_samples={num_samples}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        self.save_hyperparameters()
        # As ImageDataModule (while these keys were ignored here, the profiled tokenizer bench step held pageable
        # host-to-device copies: docs/benchmarks.md, 5e).
        self.worker_options = worker_options(num_workers, pin_memory, persistent_workers)
        self.train_dataset = SyntheticImages(num_samples=num_samples, image_size=image_size, num_classes=num_classes,
                                             seed=seed)
        self.val_dataset = (
            SyntheticImages(num_samples=val_num_samples, image_size=image_size, num_classes=num_classes,
                            seed=seed + 1_000_003)
            if val_num_samples > 0 else None
        )

    def train_dataloader(self) -> DataLoader:
        # Resumable: the order of each epoch follows from (seed, epoch) and a resumed fit continues mid-epoch.
        return ResumableDataLoader(self.train_dataset, seed=self.hparams.seed, epoch_fn=self._current_epoch,
                                   batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                                   **self.worker_options)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.hparams.batch_size,
                          generator=torch.Generator().manual_seed(self.hparams.seed), **self.worker_options)
