"""Inputs of pretokenize.py: the images of shards or of an image folder, their crops and their pixel values.

Each input is `(stem, label, load)` with the decoding deferred, so that an image whose token files exist is never
decoded; the crops are ADM's centre crop (or five crops with `ten_crop`) as uint8 arrays, which
`pixels_to_images` maps to [-1, 1] exactly as `to_tensor` does. The job is described in
:mod:`bar_lightning.pretokenize`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bar_lightning.data.shard_samples import decode_sample, samples_of_shard
from bar_lightning.data.shards import (
    FOLDER_IMAGE_FORMATS,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    ImageTooLargeError,
    OversizedMember,
    Shard,
    decode_image,
    expand_shards,
    parse_label,
)
from bar_lightning.data.skip_policy import BadSampleError, SkipCounter, SkipPolicy

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CLASS_FOLDER_DIGITS = 5  # labels 0..99999: zero-padded so the folders sort in label order
MAX_LABEL = 10**CLASS_FOLDER_DIGITS - 1
MAX_STEM_BYTES = 200  # file names are at most 255 bytes on common file systems, with room for "_c4.npz"


class PretokenizeError(ValueError):
    """The inputs or the output folder do not allow a correct pretokenization; the message says which and why."""


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: box-halve while the short side is >= 2 * size, bicubic resize, then crop the centre."""
    return Image.fromarray(adm_center_crop_array(image, size))


def adm_center_crop_array(image: Image.Image, size: int) -> np.ndarray:
    """`adm_center_crop` as a `[size, size, channels]` uint8 array (a view: no copy of the crop)."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def five_crops(image: Image.Image, size: int, scale: float) -> list[Image.Image]:
    """Corner and centre crops of the image resized to `scale * size` on its short side (ten with mirrors)."""
    import torchvision.transforms.functional as TF

    resized = TF.resize(image, round(size * scale), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return list(TF.five_crop(resized, size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL (any mode) -> float `[3, H, W]` in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def pixel_table() -> torch.Tensor:
    """float32 `[256]`: the value `to_tensor` gives each uint8 pixel value (the same numpy operations, so equal)."""
    return torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0)


def pixels_to_images(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` -> float `[B, 3, H, W]` in [-1, 1], on the device of both, equal to `to_tensor`."""
    return table[pixels.long()].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Inputs: (stem, label, load) with the decoding deferred, so that an image whose files exist is never decoded
# --------------------------------------------------------------------------------------------------------------


def image_folder_files(root: Path) -> list[tuple[str, int]]:
    """`(path, label)` of every image of `<root>/<class>/<image>` (classes: sorted folder names), in order."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_folder={root} does not exist")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.image_folder={root} has no class subfolders (expected <root>/<class>/<image>)")
    if len(classes) > MAX_LABEL + 1:
        raise PretokenizeError(f"data.image_folder={root} has {len(classes)} class folders; at most {MAX_LABEL + 1}")
    return [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    ]


def _decode_file(path: Path, max_image_pixels: int) -> Image.Image:
    try:
        return decode_image(path, max_pixels=max_image_pixels, formats=FOLDER_IMAGE_FORMATS)
    except ImageTooLargeError as error:
        raise PretokenizeError(f"{path}: {error}; raise max_image_pixels if such images are wanted") from None
    except Exception as error:  # PIL raises many types
        raise PretokenizeError(f"{path} does not decode ({type(error).__name__}: {error}); fix or remove it") from None


def folder_sources(files: Sequence[tuple[str, int]], *, max_image_pixels: int
                   ) -> Iterator[tuple[str, int, Callable[[], Image.Image]]]:
    """`(stem, label, load)` of image files; `load()` decodes the image (errors name the file)."""
    for name, label in files:
        path = Path(name)
        yield path.stem, label, functools.partial(_decode_file, path, max_image_pixels)


def _well_formed_label(sample: dict[str, Any]) -> int | None:
    """The label of a sample that has an image and a readable label (what `decode_sample` checks before decoding),
    or None: then `decode_sample` is asked, and names the problem exactly as everywhere else."""
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
    label = sample.get(LABEL_EXTENSION)
    if image_extension is None or label is None:
        return None
    if isinstance(sample[image_extension], OversizedMember) or isinstance(label, OversizedMember):
        return None
    try:
        return parse_label(label)
    except ValueError:
        return None


def _decode_sample_image(sample: dict[str, Any], policy: SkipPolicy, max_image_pixels: int) -> Image.Image:
    decoded = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
    if decoded is None:  # pragma: no cover - a strict policy raises instead
        raise BadSampleError(f"sample {sample['__key__']!r} in shard {sample['__url__']} was refused")
    return decoded[0]


def _given(image: Image.Image) -> Image.Image:
    return image


def shard_sources(shards: Sequence[Shard], *, max_image_pixels: int
                  ) -> Iterator[tuple[str, int, Callable[[], Image.Image]]]:
    """`(stem, label, load)` of every sample of `shards`, read strictly by the shared reader; `load()` decodes."""
    policy = SkipPolicy(counter=SkipCounter(), strict=True)
    for shard in shards:
        for sample in samples_of_shard(shard, policy=policy, max_image_pixels=max_image_pixels):
            label = _well_formed_label(sample)
            if label is None:  # raises (strict): the shared decoder names what is wrong
                image, label = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
                load: Callable[[], Image.Image] = functools.partial(_given, image)
            else:
                load = functools.partial(_decode_sample_image, sample, policy, max_image_pixels)
            if label > MAX_LABEL:
                raise BadSampleError(
                    f"bad_label: sample {sample['__key__']!r} in shard {shard.url}: label {label} is above {MAX_LABEL} "
                    f"(class folders have {CLASS_FOLDER_DIGITS} digits)"
                )
            yield str(sample["__key__"]).replace("/", "_"), label, load


def iter_image_folder(root: Path, rank: int, world_size: int, *, max_image_pixels: int
                      ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of `<root>/<class>/<image>` (classes: sorted folder names), this rank's share."""
    files = image_folder_files(root)[rank::world_size]
    for stem, label, load in folder_sources(files, max_image_pixels=max_image_pixels):
        yield stem, label, load()


def iter_shards(spec: Any, rank: int, world_size: int, *, max_image_pixels: int
                ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of every sample of this rank's shards, read strictly by the shared reader.

    Whole shards per rank: every image is encoded by exactly one process.
    """
    for stem, label, load in shard_sources(expand_shards(spec)[rank::world_size], max_image_pixels=max_image_pixels):
        yield stem, label, load()


def check_stem(stem: str) -> None:
    if len(stem.encode("utf-8")) > MAX_STEM_BYTES:
        raise PretokenizeError(f"the input key {stem[:60]!r}... is {len(stem.encode())} bytes long; token files are "
                               f"named by their key, at most {MAX_STEM_BYTES} bytes: shorten the keys")
