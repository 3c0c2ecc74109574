"""The one reader of webdataset shards: every consumer (training, evaluation, pretokenization, the demo) reads
shards through this module, so what a shard may do to a process is decided in one place.

What is read. A shard is a plain (uncompressed) tar file. Of its members only regular files named
``<key>.<image extension>`` (png, jpg, jpeg, webp) and ``<key>.cls`` are read, each up to a byte limit; every
other member (``.pyd``, ``.pth``, ``.json``, ``.gz``, links, devices, ...) is stepped over without its data being
looked at, so nothing in a shard is ever unpickled, ``torch.load``-ed or decompressed. Images are decoded by
Pillow restricted to PNG, JPEG and WebP, after their header has shown a size within the pixel budget
(:func:`decode_image`); labels must be ASCII digits (:func:`parse_label`).

What counts as complete. A tar ends with an end-of-archive block of zeros. Python's ``tarfile`` ends a stream
quietly when the file stops at a member boundary or inside a header, which made a cut shard read as a complete,
shorter one; here the reader checks that the archive really ended (:class:`ShardReadError` otherwise). When the
converter's shard index (:data:`SHARD_INDEX_SUFFIX`, webdataset's ``wids`` JSON format: ``nsamples`` and
``filesize`` of every shard) lists the shard, its size is checked before reading and its sample count after.

Shard lists (:func:`expand_shards`): a brace pattern (``a-{000000..000009}.tar``), a glob (``a-*.tar``), a
``::``-separated list, a folder (its ``*.tar`` files), or a shard index file (``*.index.json``) naming them.
The brace-free forms need no quoting in a shell.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

# Extensions tried, in this order, for the image of a sample.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
LABEL_EXTENSION = "cls"
READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LABEL_EXTENSION))

# Pillow decoders a shard image may use; every other plugin (EPS runs Ghostscript, ...) is never asked.
SHARD_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# An image folder of the user's own files may also hold these (pretokenize.py, the converter).
FOLDER_IMAGE_FORMATS = (*SHARD_IMAGE_FORMATS, "BMP", "GIF", "TIFF", "PPM")

# The default pixel budget: 4096 x 4096 pixels (about 50 MB decoded as RGB), or 16 times the crop's area when
# that is larger. ImageNet's originals fit; a 10000 x 10000 "bomb" (100 M pixels from a 110 KB PNG) does not.
MIN_DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGE_PIXELS_PER_CROP_AREA = 16
# A compressed image is never much larger than its pixels (8 bytes a pixel: 16-bit RGBA) plus headers.
_MAX_IMAGE_BYTES_PER_PIXEL = 8
_IMAGE_HEADER_ALLOWANCE = 1 << 20
MAX_LABEL_BYTES = 64

SHARD_INDEX_SUFFIX = ".index.json"
SHARD_INDEX_KIND = "wids-shard-index-v1"

CONVERT_HINT = (
    "create shards with `python -m bar_lightning.data.convert image-folder ...` or "
    "`python -m bar_lightning.data.convert fashion-mnist ...`"
)
_INDEX_HINT = "re-create it with `python -m bar_lightning.data.convert index <shards> --out <file>`"
_COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
# webdataset's member names: "<key>.<extension>", the key running to the first dot of the file name.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
# webdataset's metadata members (__index__, __meta__/...) belong to no sample.
_META_MEMBER = re.compile(r"(^|/)__[^/]*__($|/)")
_LABEL = re.compile(rb"\s*([0-9]{1,9})\s*")


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class ShardDataError(ValueError):
    """Base class of the data errors; ``str()`` is the message as written (never webdataset's tuple)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ShardReadError(ShardDataError):
    """A shard that cannot be read to its end: missing, truncated, corrupt, compressed, or not what its index says."""


class ImageTooLargeError(ValueError):
    """An image over the pixel budget; raised from its header, before it is decoded."""


# --------------------------------------------------------------------------------------------------------------
# Shard lists and the shard index
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One shard file and, when a shard index lists it, its expected sample count and size in bytes."""

    url: str
    expected_samples: int | None = None
    expected_bytes: int | None = None
    index: str | None = None

    def __str__(self) -> str:
        return self.url


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def default_max_image_pixels(crop_size: int) -> int:
    """The pixel budget when none is configured: max(4096², 16 x crop_size²)."""
    return max(MIN_DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGE_PIXELS_PER_CROP_AREA * int(crop_size) ** 2)


def max_image_bytes(max_pixels: int) -> int:
    """The largest image member read for a pixel budget (bigger ones are refused unread)."""
    return _MAX_IMAGE_BYTES_PER_PIXEL * int(max_pixels) + _IMAGE_HEADER_ALLOWANCE


def read_shard_index(path: str | os.PathLike) -> list[Shard]:
    """The shards a ``wids`` index lists, with URLs resolved against the index's folder; errors name the file."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardDataError(f"shard index {path} cannot be read ({type(error).__name__}: {error}); {_INDEX_HINT}") from None
    entries = content.get("shardlist") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise ShardDataError(f"shard index {path} has no 'shardlist' list (a wids shard index); {_INDEX_HINT}")
    shards = []
    for position, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else None
        samples = entry.get("nsamples") if isinstance(entry, dict) else None
        size = entry.get("filesize") if isinstance(entry, dict) else None
        if (
            not isinstance(url, str) or not url
            or not _is_count(samples) or (size is not None and not _is_count(size))
        ):
            raise ShardDataError(
                f"shard index {path}: entry {position} must have a 'url' and integer 'nsamples' >= 0 (and "
                f"'filesize'), got {str(entry)[:200]}; {_INDEX_HINT}"
            )
        if url.startswith("pipe:"):
            # A data file must not run commands; a pipe: URL is for the user's own command line only.
            raise ShardDataError(
                f"shard index {path}: entry {position} is a pipe: command ({url[:80]!r}); an index may name files and "
                "URLs only (give pipe: shards on the command line if you mean to run that command)"
            )
        if not is_remote(url) and not os.path.isabs(url):
            url = str(path.parent / url)
        shards.append(Shard(url=url, expected_samples=samples, expected_bytes=size, index=str(path)))
    return shards


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _indexed_shards_in(folder: str, cache: dict[str, dict[str, Shard]]) -> dict[str, Shard]:
    """Shards listed by the index files in ``folder``, by absolute path (cached per folder)."""
    if folder not in cache:
        listed: dict[str, Shard] = {}
        for index_path in sorted(glob.glob(os.path.join(glob.escape(folder), f"*{SHARD_INDEX_SUFFIX}"))):
            for shard in read_shard_index(index_path):
                listed[os.path.abspath(shard.url)] = shard
        cache[folder] = listed
    return cache[folder]


def expand_shards(spec: str | Sequence[str]) -> list[Shard]:
    """The shards a spec names, in order, each with what the shard index beside it says about it.

    ``spec``: a brace pattern, a glob, a ``::``-separated list, a folder (its ``*.tar`` files), a shard index file
    (``*.index.json``), or a list of these. Local files must all exist: a missing one raises FileNotFoundError
    naming it and the spec (an evaluation over part of a set is wrong, and a training spec naming absent files
    is a config error).
    """
    import webdataset as wds

    specs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
    if not specs or not all(isinstance(one, str) and one.strip() for one in specs):
        raise ValueError(
            f"shards must be a non-empty string or list of strings (a brace pattern, glob, folder or shard index "
            f"file), got {spec!r}"
        )
    shards: list[Shard] = []
    missing: list[str] = []
    for one_spec in specs:
        one_spec = os.path.expanduser(one_spec.strip())
        if not is_remote(one_spec) and one_spec.endswith(".json") and os.path.isfile(one_spec):
            shards.extend(read_shard_index(one_spec))
            continue
        if not is_remote(one_spec) and os.path.isdir(one_spec):
            in_folder = sorted(glob.glob(os.path.join(glob.escape(one_spec), "*.tar")))
            if not in_folder:
                raise FileNotFoundError(f"shard folder {one_spec} holds no *.tar file; {CONVERT_HINT}")
            shards.extend(Shard(url=path) for path in in_folder)
            continue
        for url in wds.shardlists.expand_urls(one_spec):
            if is_remote(url):
                shards.append(Shard(url=url))
            elif glob.has_magic(url):
                shards.extend(Shard(url=path) for path in sorted(glob.glob(url)))
            elif os.path.isfile(url):
                shards.append(Shard(url=url))
            else:
                missing.append(url)
    if not shards and not missing:
        raise FileNotFoundError(f"no shard file matches {spec!r}; {CONVERT_HINT}, or fix the path")
    absent = [shard.url for shard in shards if not is_remote(shard.url) and not os.path.isfile(shard.url)]
    if missing or absent:
        total = len(missing) + len(shards)
        raise FileNotFoundError(
            f"{len(missing) + len(absent)} of the {total} shards named by {spec!r} do not exist (first: "
            f"{(missing + absent)[0]}); fix the pattern (e.g. the brace range) or create the missing shards"
        )
    cache: dict[str, dict[str, Shard]] = {}
    expanded = []
    for shard in shards:
        if shard.index is None and not is_remote(shard.url):
            listed = _indexed_shards_in(os.path.dirname(os.path.abspath(shard.url)), cache)
            known = listed.get(os.path.abspath(shard.url))
            if known is not None:
                shard = Shard(url=shard.url, expected_samples=known.expected_samples,
                              expected_bytes=known.expected_bytes, index=known.index)
        expanded.append(shard)
    return expanded


def write_shard_index(index_path: str | os.PathLike, shards: Sequence[tuple[str | os.PathLike, int]], *,
                      name: str | None = None) -> Path:
    """Write a ``wids`` shard index for ``(shard path, sample count)`` pairs; URLs relative to the index's folder."""
    from bar_lightning.io import atomic_write_json

    index_path = Path(index_path)
    entries = []
    for shard_path, samples in shards:
        shard_path = Path(shard_path)
        try:
            url = os.path.relpath(shard_path.resolve(), index_path.parent.resolve())
        except ValueError:  # another drive (Windows)
            url = str(shard_path.resolve())
        entries.append({"url": url, "nsamples": int(samples), "filesize": shard_path.stat().st_size})
    content: dict[str, Any] = {"__kind__": SHARD_INDEX_KIND, "wids_version": 1, "shardlist": entries}
    if name:
        content["name"] = name
    return atomic_write_json(index_path, content, indent=2)


# --------------------------------------------------------------------------------------------------------------
# Reading one shard
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OversizedMember:
    """Stands in a sample for a member over its byte limit, which was not read."""

    size: int
    limit: int


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers on the archive why the last header read failed: only a block of zeros is a real end."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as error:
            archive.bar_end_of_headers = error  # type: ignore[attr-defined]
            raise


def _open_stream(url: str) -> BinaryIO:
    if is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")  # the user's own URL or pipe command
    return open(url, "rb")


def split_member_name(name: str) -> tuple[str | None, str]:
    """``("<key>", "<extension>")`` of a member name as webdataset splits it; ``(None, "")`` for no sample."""
    if _META_MEMBER.search(name):
        return None, ""
    match = _MEMBER_NAME.match(name)
    if match is None:
        return None, ""
    return match.group(1), match.group(2).lower()


def read_shard_samples(shard: Shard, *, max_image_pixels: int) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", "<ext>": bytes | OversizedMember, "__ignored__": [ext, ...]}``.

    Members of the same key that follow each other form one sample (a repeated extension starts a new one). Raises
    :class:`ShardReadError` naming the shard when it cannot be read to its real end or disagrees with its index;
    the samples yielded before that are intact.
    """
    url = shard.url
    if not is_remote(url):
        try:
            size = os.stat(url).st_size
        except OSError as error:
            raise ShardReadError(f"shard {url} cannot be opened ({type(error).__name__}: {error.strerror or error})") from None
        if shard.expected_bytes is not None and size != shard.expected_bytes:
            raise ShardReadError(
                f"shard {url} is {size} bytes but its index {shard.index} says {shard.expected_bytes}: the file is "
                f"{'truncated' if size < shard.expected_bytes else 'not the one indexed'}; re-create or re-copy it"
            )
    label_limit = MAX_LABEL_BYTES
    image_limit = max_image_bytes(max_image_pixels)
    samples_read = 0
    try:
        stream = _open_stream(url)
    except OSError as error:
        raise ShardReadError(f"shard {url} cannot be opened ({type(error).__name__}: {error})") from None
    with stream:
        head = _peek(stream)
        for magic, compression in _COMPRESSION_MAGIC.items():
            if head.startswith(magic):
                raise ShardReadError(
                    f"shard {url} is {compression}-compressed; shards are read as plain tar files and nothing in "
                    "them is decompressed: decompress it first (e.g. gunzip) or re-create it with the converter"
                )
        try:
            archive = tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndRecordingTarInfo)
        except tarfile.TarError as error:
            raise ShardReadError(f"shard {url} is not a tar file ({_describe(error)}); {CONVERT_HINT}") from None
        current: dict[str, Any] | None = None
        try:
            for member in archive:
                archive.members = []  # stream mode keeps every header otherwise: memory in proportion to members
                if not member.isreg():
                    continue  # folders, links, devices: no sample data
                key, extension = split_member_name(member.name)
                if key is None:
                    continue
                if current is None or key != current["__key__"] or extension in current:
                    if current is not None:
                        samples_read += 1
                        yield current
                    current = {"__key__": key, "__url__": url, "__ignored__": []}
                if extension not in READ_EXTENSIONS:
                    current["__ignored__"].append(extension)  # never read: no decoder ever sees it
                    current[extension] = None
                    continue
                limit = label_limit if extension == LABEL_EXTENSION else image_limit
                if member.size > limit:
                    current[extension] = OversizedMember(size=member.size, limit=limit)
                    continue
                member_file = archive.extractfile(member)
                data = member_file.read() if member_file is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                current[extension] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            raise ShardReadError(
                f"shard {url} is truncated or corrupt after {samples_read} samples ({_describe(error)}); re-create "
                f"or re-copy it ({CONVERT_HINT})"
            ) from None
        end = getattr(archive, "bar_end_of_headers", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            read = samples_read + (current is not None)
            raise ShardReadError(
                f"shard {url} is truncated: it stops after {read} samples (the last possibly incomplete) without "
                f"the tar end-of-archive block ({type(end).__name__ if end is not None else 'no end'}: the file was "
                f"cut at a member boundary or inside a header); re-create or re-copy it ({CONVERT_HINT})"
            )
        if current is not None:
            samples_read += 1
            yield current
    if shard.expected_samples is not None and samples_read != shard.expected_samples:
        raise ShardReadError(
            f"shard {url} holds {samples_read} samples but its index {shard.index} says {shard.expected_samples}; "
            "the shard or the index is stale: re-create them together"
        )


def _peek(stream: BinaryIO) -> bytes:
    """The first bytes of a stream without consuming them (buffered files and pipes both allow it)."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        return bytes(peek(8)[:8])
    return b""


def _describe(error: BaseException) -> str:
    detail = str(error.args[0]) if error.args else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def count_shard_samples(shard: str | os.PathLike, *, max_image_pixels: int = MIN_DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """Samples of one shard read to its end (raises :class:`ShardReadError` when it is not whole)."""
    return sum(1 for _ in read_shard_samples(Shard(url=str(shard)), max_image_pixels=max_image_pixels))


# --------------------------------------------------------------------------------------------------------------
# Decoding the two members a sample may contribute
# --------------------------------------------------------------------------------------------------------------


def parse_label(value: bytes) -> int:
    """A ``.cls`` member: a non-negative integer in ASCII digits (surrounding white space allowed)."""
    match = _LABEL.fullmatch(value) if isinstance(value, bytes | bytearray) else None
    if match is None:
        raise ValueError(f"cls is {bytes(value[:20]) if isinstance(value, bytes | bytearray) else value!r}, not a "
                         "non-negative integer in ASCII digits")
    return int(match.group(1))


def decode_image(source: bytes | str | os.PathLike, *, max_pixels: int,
                 formats: Sequence[str] = SHARD_IMAGE_FORMATS) -> Image.Image:
    """An RGB image from bytes or a file, refused from its header (:class:`ImageTooLargeError`) over ``max_pixels``.

    Only Pillow's decoders for ``formats`` are asked; the pixels are decoded only after the size check.
    """
    opened = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with warnings.catch_warnings():
        # The budget here is the limit; Pillow's own bomb warning (above 89 M pixels) would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image_file = Image.open(opened, formats=list(formats))
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"{error}; the pixel budget max_image_pixels={max_pixels:,}") from None
        with image_file as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{width}x{height} = {width * height:,} pixels, more than max_image_pixels={max_pixels:,} "
                    "(refused before decoding)"
                )
            image.load()  # decode now: a truncated file fails here rather than inside the transform
            return image.convert("RGB")
