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

The pieces live in :mod:`bar_lightning.data.shard_writer` (writing shard sets),
:mod:`bar_lightning.data.image_folder` and :mod:`bar_lightning.data.fashion_mnist` (the two sources); their names
are re-exported here, and this module holds the shard index of existing shards and the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bar_lightning.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_INSTALL_HINT,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    convert_fashion_mnist,
    fashion_mnist_image,
    load_fashion_mnist,
    read_idx,
)
from bar_lightning.data.image_folder import (
    SOURCE_IMAGE_SUFFIXES,
    convert_image_folder,
    list_image_folder,
    sanitize_key_part,
)
from bar_lightning.data.shard_writer import (
    CLASSES_FILENAME,
    DEFAULT_MAX_COUNT,
    IMAGE_FORMATS,
    JPEG_QUALITY,
    ShardSetSummary,
    encode_image,
    shard_index_path,
    write_shards,
)
from bar_lightning.data.shards import (
    MIN_DEFAULT_MAX_IMAGE_PIXELS,
    SHARD_INDEX_SUFFIX,
    ShardDataError,
    count_shard_samples,
    expand_shards,
    write_shard_index,
)
from bar_lightning.run_lock import RunDirectoryLocked, run_lock

__all__ = [
    "CLASSES_FILENAME",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_MAX_COUNT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_INSTALL_HINT",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_FORMATS",
    "JPEG_QUALITY",
    "SOURCE_IMAGE_SUFFIXES",
    "ShardSetSummary",
    "build_parser",
    "convert_fashion_mnist",
    "convert_image_folder",
    "encode_image",
    "fashion_mnist_image",
    "index_shards",
    "list_image_folder",
    "load_fashion_mnist",
    "main",
    "read_idx",
    "sanitize_key_part",
    "shard_index_path",
    "write_shards",
]


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
