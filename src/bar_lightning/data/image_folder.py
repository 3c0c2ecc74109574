"""A folder of class subfolders of images (ImageNet style) -> shards, for ``convert image-folder``.

Labels follow the sorted class folder names; keys are ``<class>/<relative path without extension>`` made safe
for webdataset (see :func:`sanitize_key_part`).
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bar_lightning.data.shard_writer import (
    DEFAULT_MAX_COUNT,
    IMAGE_FORMATS,
    ShardSetSummary,
    _check_can_write,
    _check_prefix,
    _write_classes,
    encode_image,
    write_shards,
)
from bar_lightning.data.shards import FOLDER_IMAGE_FORMATS, MIN_DEFAULT_MAX_IMAGE_PIXELS, decode_image

SOURCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


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
