"""Image transforms of the shard pipelines: PIL image -> float32 tensor ``[3, crop, crop]`` in [-1, 1].

Randomness of augmentations (crop position, flip) comes from torch's global generator (see
:mod:`bar_lightning.data.images`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

# Normalisation to [-1, 1], as BAR's tokenizer expects (upstream: mean = std = 0.5 per channel).
_NORMALIZE_MEAN = (0.5, 0.5, 0.5)
_NORMALIZE_STD = (0.5, 0.5, 0.5)


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
