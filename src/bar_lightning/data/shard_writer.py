"""Shard sets on disk: write samples as ``<out>/<prefix>-%06d.tar`` with their index, and ``classes.json``.

Shards are written into a hidden temporary folder inside ``<out>`` and moved to their final names only after the
last one is complete (see :func:`write_shards`); the converters in :mod:`bar_lightning.data.convert` use this.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from bar_lightning.data.shards import SHARD_INDEX_SUFFIX, write_shard_index

IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
DEFAULT_MAX_COUNT = 4000
CLASSES_FILENAME = "classes.json"

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
