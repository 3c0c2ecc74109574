"""Fashion-MNIST from its IDX files -> shards of RGB images, for ``convert fashion-mnist`` and the demo."""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bar_lightning.data.shard_writer import (
    DEFAULT_MAX_COUNT,
    IMAGE_FORMATS,
    ShardSetSummary,
    _check_can_write,
    _write_classes,
    encode_image,
    write_shards,
)

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX file stem per split; files may also carry a ".gz" suffix.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_IDX_UNSIGNED_BYTE = 0x08


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) into a uint8 array of its dimensions."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4:
        raise ValueError(f"{path} is too short for an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UNSIGNED_BYTE:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file: magic is 0x{int.from_bytes(data[:4], 'big'):08x}, expected "
            f"0x{IDX_IMAGES_MAGIC:08x} (images) or 0x{IDX_LABELS_MAGIC:08x} (labels)"
        )
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path} holds {len(data)} bytes but its header (shape {shape}) needs {expected}; the file is "
            "truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{root} has neither {stem} nor {stem}.gz; install the data set with `{FASHION_MNIST_INSTALL_HINT}` or "
        "pass --root to the folder holding the IDX files"
    )


def load_fashion_mnist(root: str | Path, *, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8[N, 28, 28], labels uint8[N])`` of ``split`` ("train": 60000, "test": 10000)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist; install it with `{FASHION_MNIST_INSTALL_HINT}` or pass "
            "--root to the folder holding the IDX files"
        )
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx_file(root, images_stem))
    labels = read_idx(_find_idx_file(root, labels_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"Fashion-MNIST {split}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"Fashion-MNIST {split}: label {labels.max()} is outside 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return images, labels


def fashion_mnist_image(pixels: np.ndarray, *, size: int) -> Image.Image:
    """One 28x28 grey image as an RGB PIL image of ``size`` x ``size`` (bicubic)."""
    image = Image.fromarray(pixels)  # uint8 [H, W] -> mode "L"
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return image.convert("RGB")


def _fashion_mnist_samples(
    images: np.ndarray, labels: np.ndarray, *, split: str, size: int, image_format: str
) -> Iterator[dict[str, Any]]:
    for index, (pixels, label) in enumerate(zip(images, labels)):
        image = fashion_mnist_image(pixels, size=size)
        yield {
            "__key__": f"fmnist-{split}-{index:06d}",
            image_format: encode_image(image, image_format=image_format),
            "cls": int(label),
        }


def convert_fashion_mnist(
    *,
    out_dir: str | Path,
    root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
    size: int = 32,
    splits: Sequence[str] = ("train", "test"),
    max_count: int = DEFAULT_MAX_COUNT,
    image_format: str = "png",
    limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, ShardSetSummary]:
    """Write ``fmnist-<split>-%06d.tar`` per split (IDX order) and ``classes.json``; ``limit``: first N per split."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out_dir = Path(out_dir)
    # Read and check every split first, so a missing or corrupt file fails before anything is written.
    loaded = {split: load_fashion_mnist(root, split=split) for split in splits}
    for split in splits:
        _check_can_write(out_dir, f"fmnist-{split}", overwrite=overwrite)
    summaries: dict[str, ShardSetSummary] = {}
    for split, (images, labels) in loaded.items():
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        summaries[split] = write_shards(
            _fashion_mnist_samples(images, labels, split=split, size=size, image_format=image_format),
            out_dir=out_dir,
            prefix=f"fmnist-{split}",
            max_count=max_count,
            overwrite=overwrite,
        )
    _write_classes(out_dir, FASHION_MNIST_CLASSES)
    return summaries
