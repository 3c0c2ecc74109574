"""Write image datasets as webdataset shards that :mod:`bar_lightning.data.images` reads.

Usage::

    # A folder of class subfolders (ImageNet style): <src>/<class>/**/<image>; labels follow sorted folder names.
    python -m bar_lightning.data.convert image-folder --src /data/imagenet/train --out /data/shards \\
        --prefix imagenet-train [--max-count 4000] [--format png|jpg] [--shuffle-seed 0 | --no-shuffle]

    # Fashion-MNIST from the IDX files of `apt-get install -y dataset-fashion-mnist`, resized to 32x32 RGB.
    python -m bar_lightning.data.convert fashion-mnist --out /data/fmnist [--root DIR] [--size 32] \\
        [--splits train test] [--limit N]

Each sample is ``<key>.png`` (or ``.jpg``, quality 95) holding an RGB image and ``<key>.cls`` holding the class
index as text. Keys are unique and stable: ``<class>/<relative path without extension>`` with every character
outside ``[A-Za-z0-9_-]`` replaced by ``_`` (webdataset splits a file name at its first dot, so keys must not
contain dots), and ``fmnist-<split>-<index in the IDX file>`` for Fashion-MNIST. ``classes.json`` next to the
shards lists the class names in label order.

    # A shard index for shards made elsewhere (e.g. upstream's ImageNet shards): reads each shard to its end.
    python -m bar_lightning.data.convert index '/data/wds/imagenet-train-*.tar' --out /data/wds/imagenet-train.index.json

Shards go to ``<out>/<prefix>-%06d.tar``. They are written into a hidden temporary folder inside ``<out>`` and
moved to their final names only after the last one is complete, so an interrupted conversion never leaves a
truncated shard (nor a mix of old and new shards) under the final names. ``<out>/<prefix>.index.json`` (webdataset's
``wids`` shard index: every shard's sample count and size) is written with them; readers use it to detect a
truncated or stale shard, and it can be passed wherever shards are taken (``data.train_shards=<index>``), with no
brace pattern to quote. Source images over ``--max-image-pixels`` are skipped like unreadable ones.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from bar_lightning.data.shards import (
    FOLDER_IMAGE_FORMATS,
    MIN_DEFAULT_MAX_IMAGE_PIXELS,
    SHARD_INDEX_SUFFIX,
    ShardDataError,
    count_shard_samples,
    decode_image,
    expand_shards,
    write_shard_index,
)
from bar_lightning.run_lock import RunDirectoryLocked, run_lock

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
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
DEFAULT_MAX_COUNT = 4000
CLASSES_FILENAME = "classes.json"
SOURCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_IDX_UNSIGNED_BYTE = 0x08

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class ShardSetSummary:
    """What one conversion wrote: ``samples`` items in ``shards`` (final paths), ``skipped`` unreadable inputs."""

    prefix: str
    samples: int = 0
    skipped: int = 0
    shards: list[Path] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        """Brace pattern naming exactly these shards, for ``train_shards`` / ``eval_shards`` configs."""
        if not self.shards:
            return ""
        folder = self.shards[0].parent
        if len(self.shards) == 1:
            return str(self.shards[0])
        return str(folder / f"{self.prefix}-{{{0:06d}..{len(self.shards) - 1:06d}}}.tar")

    @property
    def index(self) -> Path | None:
        """The shard index written beside the shards (names them without a brace pattern)."""
        return shard_index_path(self.shards[0].parent, self.prefix) if self.shards else None


def shard_index_path(out_dir: str | Path, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}{SHARD_INDEX_SUFFIX}"


# --------------------------------------------------------------------------------------------------------------
# Shard writing
# --------------------------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, *, image_format: str) -> bytes:
    """RGB image bytes: PNG (lossless) or JPEG at quality 95."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buffer = io.BytesIO()
    if image_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _final_shard_paths(out_dir: Path, prefix: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    return sorted(path for path in out_dir.iterdir() if pattern.match(path.name))


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_PATTERN.match(prefix) or "%" in prefix:
        raise ValueError(
            f"prefix must start with a letter or digit and contain only letters, digits, '_', '.', '-', got "
            f"{prefix!r}"
        )


def _check_can_write(out_dir: Path, prefix: str, *, overwrite: bool) -> None:
    """Refuse to mix with an existing shard set: a glob over old and new shards would read both."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = _final_shard_paths(out_dir, prefix)
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} shards {prefix}-*.tar already exist in {out_dir} (first: {existing[0].name}); pass "
            "--overwrite to replace them or choose another --out/--prefix"
        )


def write_shards(
    samples: Iterable[dict[str, Any]],
    *,
    out_dir: str | Path,
    prefix: str,
    max_count: int = DEFAULT_MAX_COUNT,
    overwrite: bool = False,
) -> ShardSetSummary:
    """Write ``samples`` (``{"__key__", "<ext>": bytes, "cls": int}``) to ``<out_dir>/<prefix>-%06d.tar``.

    Shards are complete under their final names or absent: they are written into a temporary folder and moved
    (``os.replace``, same file system) after the last one is closed. Old shards of the same prefix are removed
    only then, and only with ``overwrite``.
    """
    _check_prefix(prefix)
    if not isinstance(max_count, int) or max_count <= 0:
        raise ValueError(f"max_count must be a positive integer, got {max_count!r}")
    out_dir = Path(out_dir)
    _check_can_write(out_dir, prefix, overwrite=overwrite)
    summary = ShardSetSummary(prefix=prefix)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{prefix}-partial-", dir=out_dir))
    try:
        # mtime=0 (an int): identical inputs give identical shards, and tarfile adds no pax header per file
        # (it does for a float time stamp), which would more than double the size of small samples.
        samples_per_shard: dict[str, int] = {}
        with wds.ShardWriter(
            str(staging_dir / f"{prefix}-%06d.tar"), maxcount=max_count, verbose=0, mtime=0
        ) as writer:
            keys_written: set[str] = set()
            for sample in samples:
                key = sample["__key__"]
                if key in keys_written:
                    raise ValueError(
                        f"duplicate key {key!r} in the samples for {prefix}; keys must be unique"
                    )
                keys_written.add(key)
                writer.write(sample)
                # ShardWriter may start a new shard on size as well as count: count where each sample went.
                shard_name = Path(writer.fname).name
                samples_per_shard[shard_name] = samples_per_shard.get(shard_name, 0) + 1
                summary.samples += 1
        staged = sorted(staging_dir.glob(f"{prefix}-*.tar"))
        if summary.samples == 0:
            staged = []  # ShardWriter opens its first shard eagerly; an empty tar is no shard
        for old_shard in _final_shard_paths(out_dir, prefix):
            old_shard.unlink()
        shard_index_path(out_dir, prefix).unlink(missing_ok=True)
        for shard in staged:
            final_path = out_dir / shard.name
            os.replace(shard, final_path)
            summary.shards.append(final_path)
        if summary.shards:
            write_shard_index(
                shard_index_path(out_dir, prefix),
                [(path, samples_per_shard[path.name]) for path in summary.shards],
                name=prefix,
            )
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return summary


def _write_classes(out_dir: Path, classes: Sequence[str]) -> Path:
    """Write ``classes.json``; a different class list already there is an error (labels would disagree)."""
    path = out_dir / CLASSES_FILENAME
    content = {"classes": list(classes)}
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != content:
            raise ValueError(
                f"{path} lists other classes ({len(existing.get('classes', []))} classes) than this conversion "
                f"({len(classes)}): the labels of the two shard sets would disagree; write to another --out"
            )
        return path
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------


def sanitize_key_part(part: str) -> str:
    """A path component made safe for a webdataset key (no dots, no separators, no spaces)."""
    return _KEY_UNSAFE.sub("_", part).strip("_") or "_"


def list_image_folder(source_dir: str | Path) -> tuple[list[str], list[tuple[Path, int, str]]]:
    """Class names (sorted subfolder names) and ``(path, label, key)`` per image, in sorted order.

    Hidden files and folders are ignored; keys that collide after sanitising get ``-2``, ``-3``, ... in sorted
    path order, so they stay the same for the same folder.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {source_dir} does not exist or is not a folder; pass --src DIR"
        )
    classes = sorted(p.name for p in source_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{source_dir} has no class subfolders; expected <src>/<class_name>/<image files> (one folder per "
            "class, labels follow the sorted folder names)"
        )
    entries: list[tuple[Path, int, str]] = []
    used_keys: set[str] = set()
    for label, class_name in enumerate(classes):
        class_dir = source_dir / class_name
        for path in sorted(class_dir.rglob("*")):
            relative = path.relative_to(class_dir)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            if path.suffix.lower() not in SOURCE_IMAGE_SUFFIXES:
                continue
            parts = [class_name, *relative.parent.parts, path.name[: -len(path.suffix)]]
            base_key = "/".join(sanitize_key_part(part) for part in parts)
            key, repeat = base_key, 1
            while key in used_keys:
                repeat += 1
                key = f"{base_key}-{repeat}"
            used_keys.add(key)
            entries.append((path, label, key))
    return classes, entries


def _image_folder_samples(
    entries: Sequence[tuple[Path, int, str]], *, image_format: str, summary: ShardSetSummary,
    max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[dict[str, Any]]:
    for path, label, key in entries:
        try:
            image = decode_image(path, max_pixels=max_image_pixels, formats=FOLDER_IMAGE_FORMATS)
            encoded = encode_image(image, image_format=image_format)
        except Exception as error:  # PIL raises many types; one unreadable file should not end the conversion
            summary.skipped += 1
            print(
                f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})",
                file=sys.stderr,
            )
            continue
        yield {"__key__": key, image_format: encoded, "cls": label}


def convert_image_folder(
    *,
    source_dir: str | Path,
    out_dir: str | Path,
    prefix: str,
    max_count: int = DEFAULT_MAX_COUNT,
    image_format: str = "png",
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS,
) -> ShardSetSummary:
    """Convert ``<source_dir>/<class>/**/<image>`` to shards; write ``classes.json`` next to them.

    ``shuffle_seed``: the sample order in the shards is a seeded permutation (None: sorted by class and path).
    Training reads one shard at a time through a shuffle buffer far smaller than the data set, so sorted
    shards would give batches of one or two classes; the keys do not depend on the order.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    classes, entries = list_image_folder(source_dir)
    if not entries:
        raise ValueError(
            f"{source_dir} has class folders but no image files with suffixes {SOURCE_IMAGE_SUFFIXES}"
        )
    out_dir = Path(out_dir)
    _check_prefix(prefix)
    _check_can_write(out_dir, prefix, overwrite=overwrite)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(entries)
    # The summary is filled by the sample generator (skips) and by write_shards (samples, shards).
    skipped_summary = ShardSetSummary(prefix=prefix)
    summary = write_shards(
        _image_folder_samples(entries, image_format=image_format, summary=skipped_summary,
                              max_image_pixels=max_image_pixels),
        out_dir=out_dir,
        prefix=prefix,
        max_count=max_count,
        overwrite=overwrite,
    )
    summary.skipped = skipped_summary.skipped
    _write_classes(out_dir, classes)
    return summary


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


# --------------------------------------------------------------------------------------------------------------
# Shard index of existing shards
# --------------------------------------------------------------------------------------------------------------


def index_shards(spec: str | Sequence[str], *, index_path: str | Path) -> list[tuple[str, int]]:
    """Read every shard of ``spec`` to its end and write their ``wids`` index; a damaged shard stops it."""
    counts = [(shard.url, count_shard_samples(shard.url)) for shard in expand_shards(spec)]
    write_shard_index(index_path, counts, name=Path(index_path).name.removesuffix(SHARD_INDEX_SUFFIX))
    return counts


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _print_summary(summaries: dict[str, ShardSetSummary], out_dir: Path) -> None:
    for name, summary in summaries.items():
        skipped = f", {summary.skipped} unreadable inputs skipped" if summary.skipped else ""
        print(f"{name}: {summary.samples} samples in {len(summary.shards)} shards{skipped}")
        if summary.shards:
            print(f"  shards: {summary.index}  (or the pattern {summary.pattern})")
    print(f"classes: {out_dir / CLASSES_FILENAME}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bar_lightning.data.convert",
        description="Write image data sets as webdataset shards (<key>.png|jpg + <key>.cls).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_common(command: argparse.ArgumentParser) -> None:
        command.add_argument("--out", required=True, type=Path, help="folder for the shards and classes.json")
        command.add_argument(
            "--max-count",
            type=int,
            default=DEFAULT_MAX_COUNT,
            help="samples per shard (default: %(default)s)",
        )
        command.add_argument(
            "--format",
            dest="image_format",
            choices=IMAGE_FORMATS,
            default="png",
            help="png: lossless (default); jpg: quality 95, smaller",
        )
        command.add_argument(
            "--overwrite", action="store_true", help="replace existing shards with the same prefix"
        )
        command.add_argument(
            "--max-image-pixels", type=int, default=MIN_DEFAULT_MAX_IMAGE_PIXELS,
            help="skip source images with more pixels than this (default: %(default)s = 4096 x 4096)",
        )

    folder = commands.add_parser("image-folder", help="a folder of class subfolders of images")
    folder.add_argument("--src", required=True, type=Path, help="folder with one subfolder per class")
    folder.add_argument("--prefix", required=True, help="shard name prefix, e.g. imagenet-train")
    order = folder.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the sample order in the shards (default: 0)"
    )
    order.add_argument("--no-shuffle", action="store_true", help="keep the sorted class/path order")
    add_common(folder)

    fashion = commands.add_parser(
        "fashion-mnist", help=f"Fashion-MNIST IDX files ({FASHION_MNIST_INSTALL_HINT})"
    )
    fashion.add_argument(
        "--root",
        type=Path,
        default=Path(DEFAULT_FASHION_MNIST_ROOT),
        help="folder of the IDX files (.gz or not)",
    )
    fashion.add_argument("--size", type=int, default=32, help="output side length in pixels (default: 32)")
    fashion.add_argument(
        "--splits", nargs="+", choices=tuple(FASHION_MNIST_FILES), default=list(FASHION_MNIST_FILES)
    )
    fashion.add_argument(
        "--limit", type=int, default=None, help="convert only the first N images of each split"
    )
    add_common(fashion)

    index = commands.add_parser(
        "index", help="write the shard index (sample counts, sizes) of existing shards, reading each to its end"
    )
    index.add_argument("shards", help="shards: a brace pattern, glob (quoted) or folder")
    index.add_argument("--out", required=True, type=Path, help=f"the index file to write (*{SHARD_INDEX_SUFFIX})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One conversion per output folder: two would replace each other's shards half-way.
    folder = args.out.parent if args.command == "index" else args.out
    try:
        with run_lock(folder, purpose="convert", main_process=True):
            return _run(args)
    except RunDirectoryLocked as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "index":
            if not args.out.name.endswith(SHARD_INDEX_SUFFIX):
                raise ValueError(f"--out must end in {SHARD_INDEX_SUFFIX} (readers look for that name), got {args.out}")
            counts = index_shards(args.shards, index_path=args.out)
            print(f"{len(counts)} shards, {sum(count for _, count in counts)} samples: {args.out}")
            return 0
        if args.command == "image-folder":
            summaries = {
                args.prefix: convert_image_folder(
                    source_dir=args.src,
                    out_dir=args.out,
                    prefix=args.prefix,
                    max_count=args.max_count,
                    image_format=args.image_format,
                    shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                    overwrite=args.overwrite,
                    max_image_pixels=args.max_image_pixels,
                )
            }
        else:
            summaries = convert_fashion_mnist(
                out_dir=args.out,
                root=args.root,
                size=args.size,
                splits=args.splits,
                max_count=args.max_count,
                image_format=args.image_format,
                limit=args.limit,
                overwrite=args.overwrite,
            )
    except (FileNotFoundError, FileExistsError, ValueError, ShardDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(summaries, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
