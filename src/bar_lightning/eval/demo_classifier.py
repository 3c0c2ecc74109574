"""The demo's feature network: train, save, load and evaluate a :class:`SmallImageClassifier` on Fashion-MNIST.

Inception-v3 weights (what FID uses) are not available offline, so the offline demo measures generated images
with a small CNN trained here on the same 32x32 RGB Fashion-MNIST images the tokenizer and generator see:

* ``class_accuracy``: how often the classifier predicts the class the generator was conditioned on;
* ``fid_demo``: the Frechet distance between Gaussian fits of the classifier's penultimate features
  (:meth:`SmallImageClassifier.features`) of generated and of real images. It is FID's formula on another feature
  network, so its values are comparable only with other ``fid_demo`` values from the same classifier weights.

Typical use::

    train_images, train_labels = load_fashion_mnist(split="train")
    classifier = train_demo_classifier(train_images=train_images, train_labels=train_labels)
    save_classifier(classifier, "outputs/demo_classifier.safetensors")
    test_images, test_labels = load_fashion_mnist(split="test")
    reference = feature_statistics(features(classifier, test_images))
    metrics = classifier_metrics(classifier, generated_images, labels=generated_labels, reference_features=reference)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torchvision.transforms.v2 import functional as TF

from bar_lightning.data.convert import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_INSTALL_HINT,
    fashion_mnist_image,
)
from bar_lightning.data.convert import load_fashion_mnist as load_fashion_mnist_idx
from bar_lightning.eval import metrics as generation_metrics
from bar_lightning.io import atomic_write
from bar_lightning.models.classifier import SmallImageClassifier

# Written into the safetensors header so that load_classifier can refuse other files with a clear message.
CLASSIFIER_FORMAT = "bar_lightning.SmallImageClassifier/v1"

# Defaults of train_demo_classifier, measured on Fashion-MNIST (60k training images, 32x32) on two CPU cores:
# about 47 s wall-clock (95 s CPU time) to 0.90 test accuracy (0.898 / 0.902 for seeds 1 / 0).
# * width 16 instead of the class default 32: four times fewer multiply-adds (about 3x faster on CPU);
# * two epochs with a high peak learning rate: lr 6e-3 gave 0.892, 3e-3 0.885; three epochs cost 50% more time
#   for about +0.5 point;
# * no random flips by default: in two epochs the net underfits, and flips cost about 1 point (0.892 vs 0.902).
DEFAULT_TRAIN_WIDTH = 16
DEFAULT_TRAIN_EPOCHS = 2
DEFAULT_TRAIN_BATCH_SIZE = 128
DEFAULT_TRAIN_LR = 1e-2
DEFAULT_RANDOM_FLIP = False
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_FEATURE_BATCH_SIZE = 500


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_fashion_mnist(
    root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
    split: str = "train",
    size: int = 32,
    *,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float32[N, 3, size, size] in [-1, 1], labels int64[N])`` of a Fashion-MNIST split, in IDX order.

    Exactly the pixels the tokenizer and generator train on: the converter's IDX reader and resize
    (:func:`bar_lightning.data.convert.fashion_mnist_image`: bicubic 28 -> ``size``, grey -> RGB), then the image
    DataModule's scaling (``uint8 / 255``, normalised with mean 0.5 and std 0.5). ``limit``: first N images only.
    The full training split takes about 740 MB as float32.
    """
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None (all images), got {limit!r}")
    try:
        pixels, labels = load_fashion_mnist_idx(root, split=split)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"cannot load Fashion-MNIST split {split!r} from root={str(root)!r}: {error}. Install the files with "
            f"`{FASHION_MNIST_INSTALL_HINT}` or pass root= the folder holding the IDX files"
        ) from error
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    # One bytes join is ~30% faster than np.asarray per PIL image (60k images: ~5 s instead of ~7 s).
    rgb_bytes = b"".join(fashion_mnist_image(image, size=size).tobytes() for image in pixels)
    resized = np.frombuffer(rgb_bytes, dtype=np.uint8).reshape(len(pixels), size, size, 3)  # [N, s, s, 3]
    images_uint8 = torch.from_numpy(resized.copy()).permute(0, 3, 1, 2).contiguous()  # [N, 3, s, s]
    # The same torchvision functions as the DataModule's transform, so the floats match bit for bit.
    images = TF.to_dtype(images_uint8, torch.float32, scale=True)
    images = TF.normalize(images, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    return images, torch.from_numpy(labels.astype(np.int64))


def _check_images(images: torch.Tensor, *, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor [N, C, H, W] in [-1, 1], got {shape}")


def _check_labels(labels: torch.Tensor, *, count: int, num_classes: int | None, name: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != (count,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be an integer tensor [{count}] (one label per image), got {shape}")
    if num_classes is not None and count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in 0..{num_classes - 1}, got values {int(labels.min())}..{int(labels.max())}"
        )


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _warmup_cosine(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up (BatchNorm statistics settle first), then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_demo_classifier(
    *,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = DEFAULT_TRAIN_EPOCHS,
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    lr: float = DEFAULT_TRAIN_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    width: int = DEFAULT_TRAIN_WIDTH,
    feature_dim: int = 128,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    random_flip: bool = DEFAULT_RANDOM_FLIP,
    max_train_images: int | None = None,
    num_threads: int | None = 2,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> SmallImageClassifier:
    """Train a :class:`SmallImageClassifier` on ``train_images`` ``[N, 3, H, W]`` in [-1, 1]; returns it in eval mode.

    A plain loop (no Lightning: nothing to log or checkpoint, and it must stay fast): AdamW, linear warm-up then
    cosine decay per step, cross-entropy, random horizontal flips (``random_flip``), the last partial batch
    dropped (a tiny batch gives noisy BatchNorm statistics). Deterministic for a given ``seed``, device and thread
    count: the initial weights come from ``seed`` (the global RNG state is restored afterwards) and the order and
    flips from a private generator.

    ``num_classes``: defaults to ``max(train_labels) + 1``. ``max_train_images``: train on a seeded random subset
    of that size. ``num_threads``: torch's intra-op threads while training (restored afterwards); None leaves
    them. ``on_epoch_end`` receives ``{"epoch", "loss", "train_accuracy", "seconds"}`` after each epoch (the mean
    loss and accuracy over that epoch's batches, in training mode).
    """
    _check_images(train_images, name="train_images")
    count = train_images.shape[0]
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if num_classes is None:
        if count == 0:
            raise ValueError("train_images is empty; pass at least batch_size images")
        num_classes = int(train_labels.max()) + 1 if isinstance(train_labels, torch.Tensor) else 0
    _check_labels(train_labels, count=count, num_classes=num_classes, name="train_labels")
    generator = torch.Generator().manual_seed(seed)
    if max_train_images is not None:
        if not isinstance(max_train_images, int) or max_train_images <= 0:
            raise ValueError(f"max_train_images must be a positive integer or None, got {max_train_images!r}")
        if max_train_images < count:
            subset = torch.randperm(count, generator=generator)[:max_train_images]
            train_images, train_labels, count = train_images[subset], train_labels[subset], max_train_images
    if count < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {count} training images; lower batch_size or pass more "
            "images (the last partial batch is dropped, so no step would run)"
        )
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads <= 0):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")

    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
            torch.manual_seed(seed)
            model = SmallImageClassifier(
                in_channels=train_images.shape[1],
                num_classes=num_classes,
                width=width,
                feature_dim=feature_dim,
            )
        # channels_last: oneDNN's convolutions are about 30% faster in it on CPU (measured); on CUDA it enables
        # the NHWC tensor-core kernels.
        model = model.to(device=device, memory_format=torch.channels_last)
        model.train()
        # No weight decay on BatchNorm parameters and biases (standard; decaying a BN scale fights the
        # normalisation instead of regularising).
        decayed = [p for p in model.parameters() if p.ndim > 1]
        not_decayed = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=lr,
        )
        steps_per_epoch = count // batch_size
        total_steps = steps_per_epoch * epochs
        warmup_steps = max(1, min(100, total_steps // 20))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: _warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps),
        )
        for epoch in range(epochs):
            started = time.perf_counter()
            order = torch.randperm(count, generator=generator)
            flips = torch.rand(count, generator=generator) < 0.5 if random_flip else None
            loss_sum = torch.zeros((), dtype=torch.float64)
            correct = 0
            for step in range(steps_per_epoch):
                batch_indices = order[step * batch_size : (step + 1) * batch_size]
                images = train_images[batch_indices]  # [B, C, H, W]
                if flips is not None:
                    flip = flips[batch_indices].view(-1, 1, 1, 1)
                    images = torch.where(flip, images.flip(-1), images)
                images = images.to(device=device, memory_format=torch.channels_last, non_blocking=True)
                labels = train_labels[batch_indices].to(device=device, dtype=torch.long, non_blocking=True)
                logits = model(images)  # [B, num_classes]
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach().double().cpu()
                correct += int((logits.detach().argmax(dim=1) == labels).sum())
            if on_epoch_end is not None:
                on_epoch_end(
                    {
                        "epoch": float(epoch),
                        "loss": float(loss_sum) / steps_per_epoch,
                        "train_accuracy": correct / (steps_per_epoch * batch_size),
                        "seconds": time.perf_counter() - started,
                    }
                )
    finally:
        torch.set_num_threads(previous_threads)
    # Back to the default layout: saved weights and later callers should not depend on the training layout.
    model = model.to(memory_format=torch.contiguous_format)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


def save_classifier(model: SmallImageClassifier, path: str | Path) -> Path:
    """Write the weights (safetensors) with the constructor arguments in its header; atomic (temp file + rename)."""
    if not isinstance(model, SmallImageClassifier):
        raise TypeError(f"model must be a SmallImageClassifier, got {type(model).__name__}")
    # safetensors wants contiguous CPU tensors; clone so no two entries share storage.
    tensors = {
        name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()
    }
    metadata = {"format": CLASSIFIER_FORMAT, "config": json.dumps(model.config(), sort_keys=True)}
    return atomic_write(path, lambda file: file.write(save(tensors, metadata=metadata)))


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> SmallImageClassifier:
    """The classifier written by :func:`save_classifier`, on ``device``, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights {path} do not exist; train and save them first (train_demo_classifier + "
            "save_classifier) or fix the path"
        )
    with safe_open(str(path), framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != CLASSIFIER_FORMAT or "config" not in metadata:
            raise ValueError(
                f"{path} is not a demo classifier file: its header has format={metadata.get('format')!r}, expected "
                f"{CLASSIFIER_FORMAT!r}; write it with save_classifier"
            )
        config: dict[str, Any] = json.loads(metadata["config"])
        state_dict = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open has no iter)
    model = SmallImageClassifier(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------
# Features and metrics
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStatistics:
    """Gaussian fit of features, in float64: ``mean [D]`` and ``covariance [D, D]`` (unbiased), of ``count`` rows."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


@torch.no_grad()
def features(
    model: SmallImageClassifier, images: torch.Tensor, batch_size: int = DEFAULT_FEATURE_BATCH_SIZE
) -> torch.Tensor:
    """Penultimate features ``float32[N, feature_dim]`` (on the CPU) of ``images [N, C, H, W]`` in [-1, 1].

    Runs in eval mode (BatchNorm uses its running statistics), so each image's features do not depend on the
    other images of its batch, hence not on ``batch_size`` beyond float rounding. The model's mode is restored.
    """
    _check_images(images, name="images")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model.features(images[start : start + batch_size].to(device)).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, model.feature_dim)
    return torch.cat(chunks)


def feature_statistics(feature_rows: torch.Tensor) -> FeatureStatistics:
    """Mean and unbiased covariance, in float64, of ``feature_rows [N, D]`` (N >= 2); see `metrics.feature_statistics`."""
    if not isinstance(feature_rows, torch.Tensor) or feature_rows.ndim != 2 or feature_rows.shape[0] < 2:
        shape = (
            tuple(feature_rows.shape)
            if isinstance(feature_rows, torch.Tensor)
            else type(feature_rows).__name__
        )
        raise ValueError(
            f"feature_rows must be a tensor [N, D] with N >= 2 (a covariance needs two rows), got {shape}"
        )
    mean, covariance = generation_metrics.feature_statistics(feature_rows)
    return FeatureStatistics(mean=mean, covariance=covariance, count=feature_rows.shape[0])


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics) -> float:
    """FID's formula on two Gaussian fits (the same implementation as the Inception metrics)."""
    if first.mean.shape != second.mean.shape:
        raise ValueError(
            f"feature dimensions differ: {first.mean.shape[0]} vs {second.mean.shape[0]}; compute both statistics "
            "with the same classifier"
        )
    return generation_metrics.frechet_distance(first.mean, first.covariance, second.mean, second.covariance)


def classifier_metrics(
    model: SmallImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    reference_features: torch.Tensor | FeatureStatistics | None = None,
    batch_size: int = DEFAULT_FEATURE_BATCH_SIZE,
) -> dict[str, float]:
    """Metrics of ``images [N, C, H, W]`` in [-1, 1] under the demo classifier.

    * ``class_accuracy`` (when ``labels [N]`` are given): fraction of images classified as their label (for
      generated images: the class they were conditioned on).
    * ``fid_demo`` (when ``reference_features`` are given, as features ``[M, D]`` of real images or their
      :class:`FeatureStatistics`): Frechet distance between the feature statistics of ``images`` and the
      reference. Like FID it is biased upwards for small N; compare values computed from the same N.
    * ``num_images``: N.
    """
    if labels is None and reference_features is None:
        raise ValueError(
            "nothing to compute: pass labels= (class_accuracy) and/or reference_features= (fid_demo)"
        )
    _check_images(images, name="images")
    image_features = features(model, images, batch_size=batch_size)  # [N, D]
    metrics: dict[str, float] = {"num_images": float(images.shape[0])}
    if labels is not None:
        _check_labels(labels, count=images.shape[0], num_classes=model.num_classes, name="labels")
        if images.shape[0] == 0:
            raise ValueError("images is empty; class_accuracy needs at least one image")
        with torch.no_grad():
            predictions = model.classifier_head(image_features.to(next(model.parameters()).device)).argmax(
                dim=1
            )
        metrics["class_accuracy"] = float((predictions.cpu() == labels.cpu()).double().mean())
    if reference_features is not None:
        reference = (
            reference_features
            if isinstance(reference_features, FeatureStatistics)
            else feature_statistics(reference_features)
        )
        metrics["fid_demo"] = frechet_distance(feature_statistics(image_features), reference)
    return metrics
