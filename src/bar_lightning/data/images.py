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

The parts live in their own modules, whose names are re-exported here: :mod:`bar_lightning.data.skip_policy`
(bad data: the errors, :class:`SkipCounter`, :class:`SkipPolicy`), :mod:`bar_lightning.data.image_transforms`
(:func:`build_image_transform`, :func:`build_eval_transform`) and :mod:`bar_lightning.data.shard_samples` (the
pipeline stages: :func:`samples_of_shard`, :func:`decode_sample`). This module splits the shards and assembles the
datasets.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from bar_lightning.data.image_transforms import build_eval_transform, build_image_transform
from bar_lightning.data.shard_samples import (
    _decode_and_transform,
    _read_shards,
    decode_sample,
    samples_of_shard,
)
from bar_lightning.data.shards import MIN_DEFAULT_MAX_IMAGE_PIXELS, Shard, ShardDataError, expand_shards
from bar_lightning.data.skip_policy import (
    SKIP_REASONS,
    BadSampleError,
    BadSampleWarning,
    SkipCounter,
    SkipPolicy,
    SkipRateExceededError,
)

__all__ = [
    "SKIP_REASONS",
    "BadSampleError",
    "BadSampleWarning",
    "ImageShardDataset",
    "ShardDataError",
    "SizedImageShardDataset",
    "SkipCounter",
    "SkipPolicy",
    "SkipRateExceededError",
    "SyntheticImages",
    "build_eval_transform",
    "build_image_transform",
    "decode_sample",
    "expand_shard_pattern",
    "make_eval_dataset",
    "make_train_dataset",
    "samples_of_shard",
    "samples_per_worker_for_epoch",
    "shards_for_rank_and_worker",
]

# Distinct stream tags so that the shard draws and the shuffle buffer never share a random stream.
_SHARD_STREAM = 0x53484152  # "SHAR"
_SHUFFLE_STREAM = 0x53485546  # "SHUF"

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
