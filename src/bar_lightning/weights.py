"""Fetch and verify the released BAR weights and every pretrained network the configs read, in one command.

    python -m bar_lightning.weights list
    python -m bar_lightning.weights fetch bar_b_patch4 bar_fsq_16bits inception
    python -m bar_lightning.weights verify

Training and evaluation never download anything: they read files under `paths.pretrained_dir`
(`$BAR_ROOT/pretrained`, else `<clone>/pretrained`) and stop with a clear error when one is missing. This command is
the one place that downloads, so what lands there is always checked the same way:

* what to fetch comes from a manifest shipped with the package (`weights_manifest.json`): per name, the files, their
  destination under the pretrained folder (the exact name the configs expect), where they come from (a Hugging Face
  repo file or a plain URL) and, where genuinely known, their size and SHA-256 (or the SHA-256 prefix torchvision
  puts in its file names);
* Hugging Face files resolve through `huggingface_hub` (so `HF_ENDPOINT` and a stored token are honoured) and the
  hub reports the SHA-256 of large files, which is checked too; the bytes themselves are streamed by the same code
  as plain URLs, so resume, progress and hashing behave the same for both;
* a download streams into `<dest>.part`, resumes with an HTTP `Range` request after an interruption, is checked
  (size, hash) and only then renamed into place: a file at its final path is always complete and checked;
* each installed file is recorded in `weights.lock.json` beside it (size, SHA-256, source, date), so a file without a
  pinned hash is still checked against what was first downloaded (trust on first download), and `verify` refuses a
  file that changed since.

`--offline` (or `HF_HUB_OFFLINE=1`) makes no network request at all: it checks what is there and lists what is missing
with the address to get each file from by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST_VARIABLE = "BAR_WEIGHTS_MANIFEST"  # another manifest file (tests use a fake one)
LOCK_FILE_NAME = "weights.lock.json"
FETCH_LOCK_NAME = ".weights.fetch.lock"  # held while a fetch runs in the folder
PARTIAL_SUFFIX = ".part"
COMMAND = "python -m bar_lightning.weights"
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA256_PREFIX = re.compile(r"^[0-9a-f]{8,63}$")

EXIT_OK = 0
EXIT_FAILED = 1  # a download failed, a file was refused, or (offline / verify NAME) a file is missing
EXIT_USAGE = 2  # unknown name, unreadable manifest


class WeightsError(Exception):
    """A failure this command reports in one message (no traceback): what went wrong, with which file, and the fix."""


class UnknownNameError(WeightsError):
    """A name that is no entry, alias or group of the manifest (a usage error: exit code 2)."""


class ManifestError(WeightsError):
    """The manifest itself is unreadable or malformed (a usage error: exit code 2)."""


# ---------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a file is downloaded from: a file of a Hugging Face repo, or a plain HTTP(S) URL."""

    url: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    revision: str = "main"

    @property
    def is_hf(self) -> bool:
        return self.hf_repo is not None

    def describe(self) -> str:
        """A human-readable address, also the `source` recorded in the lock file."""
        if self.is_hf:
            return f"hf://{self.hf_repo}/{self.hf_filename}@{self.revision}"
        return str(self.url)

    def browser_url(self) -> str:
        """An address a person can open to download the file by hand."""
        if self.is_hf:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/{self.hf_repo}/resolve/{self.revision}/{self.hf_filename}"
        return str(self.url)


@dataclass(frozen=True)
class WeightFile:
    """One file of an entry: its path under the pretrained folder, its sources and what is known of its content."""

    path: str  # POSIX, relative to the pretrained folder: the exact name the configs expect
    sources: tuple[Source, ...]  # the first is the official home, the others mirrors tried in order
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None  # torchvision's `<name>-<first 8 hex of SHA-256>.pth` convention

    @property
    def pinning(self) -> str:
        if self.sha256:
            return "pinned sha256"
        if self.sha256_prefix:
            return f"pinned sha256 prefix {self.sha256_prefix}"
        if any(source.is_hf for source in self.sources):
            return "hub-reported sha256, then lock"
        return "trust on first download (lock)"


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    files: tuple[WeightFile, ...]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    entries: dict[str, Entry]
    groups: dict[str, tuple[str, ...]]
    origin: str

    def names(self) -> list[str]:
        return list(self.entries)

    def resolve(self, names: Sequence[str]) -> list[Entry]:
        """The entries for names, aliases and group names (`all` is every entry), in order and without repeats."""
        aliases = {alias: entry.name for entry in self.entries.values() for alias in entry.aliases}
        picked: dict[str, Entry] = {}
        unknown = []
        for name in names:
            if name == "all":
                members: Iterable[str] = self.entries
            elif name in self.groups:
                members = self.groups[name]
            elif name in self.entries or name in aliases:
                members = [aliases.get(name, name)]
            else:
                unknown.append(name)
                continue
            for member in members:
                picked.setdefault(member, self.entries[member])
        if unknown:
            raise UnknownNameError(
                f"unknown weights name(s) {', '.join(repr(name) for name in unknown)}. Valid names: "
                f"{', '.join(self.entries)}; groups: all, {', '.join(self.groups)}"
                + (f"; aliases: {', '.join(aliases)}" if aliases else "")
                + f". `{COMMAND} list` describes each."
            )
        return list(picked.values())

    def entries_providing(self, file_name: str) -> list[Entry]:
        """Entries with a file whose relative path, or base name, is `file_name`."""
        return [
            entry
            for entry in self.entries.values()
            if any(file_name in (file.path, Path(file.path).name) for file in entry.files)
        ]


def _source_from(raw: dict[str, Any], where: str) -> Source:
    if "url" in raw:
        url = str(raw["url"])
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ManifestError(f"{where}: source url {url!r} is not http(s)")
        return Source(url=url)
    if "hf_repo" in raw and "hf_filename" in raw:
        return Source(hf_repo=str(raw["hf_repo"]), hf_filename=str(raw["hf_filename"]),
                      revision=str(raw.get("revision", "main")))
    raise ManifestError(f"{where}: a source needs 'url', or 'hf_repo' and 'hf_filename'; got {sorted(raw)}")


def _file_from(raw: dict[str, Any], where: str) -> WeightFile:
    path = str(raw.get("path", ""))
    if not path or Path(path).is_absolute() or ".." in Path(path).parts or "\\" in path:
        raise ManifestError(f"{where}: file path {path!r} must be a relative path inside the pretrained folder")
    where = f"{where} file {path}"
    sources = (_source_from(raw.get("source", {}), where),) + tuple(
        _source_from(mirror, where) for mirror in raw.get("mirrors", ())
    )
    sha256 = raw.get("sha256")
    prefix = raw.get("sha256_prefix")
    if sha256 is not None and not _SHA256.match(sha256):
        raise ManifestError(f"{where}: sha256 {sha256!r} is not 64 lowercase hex digits")
    if prefix is not None and not _SHA256_PREFIX.match(prefix):
        raise ManifestError(f"{where}: sha256_prefix {prefix!r} is not 8 to 63 lowercase hex digits")
    if sha256 and prefix and not sha256.startswith(prefix):
        raise ManifestError(f"{where}: sha256 {sha256} does not start with its sha256_prefix {prefix}")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ManifestError(f"{where}: size {size!r} is not a byte count")
    return WeightFile(path=path, sources=sources, size=size, sha256=sha256, sha256_prefix=prefix)


def parse_manifest(data: dict[str, Any], origin: str) -> Manifest:
    """Check and convert a manifest's JSON; every problem names the entry and the field."""
    if data.get("format") != 1:
        raise ManifestError(f"{origin}: unsupported manifest format {data.get('format')!r} (expected 1)")
    entries: dict[str, Entry] = {}
    taken: set[str] = {"all"}
    for raw in data.get("entries", ()):
        name = str(raw.get("name", ""))
        aliases = tuple(str(alias) for alias in raw.get("aliases", ()))
        for label in (name, *aliases):
            if not re.match(r"^[A-Za-z0-9_.-]+$", label) or label in taken:
                raise ManifestError(f"{origin}: entry name {label!r} is empty, malformed or used twice")
            taken.add(label)
        files = tuple(_file_from(file, f"{origin} entry {name}") for file in raw.get("files", ()))
        if not files:
            raise ManifestError(f"{origin}: entry {name} lists no files")
        entries[name] = Entry(name=name, description=str(raw.get("description", "")), files=files, aliases=aliases)
    groups: dict[str, tuple[str, ...]] = {}
    for group, members in data.get("groups", {}).items():
        if group in taken:
            raise ManifestError(f"{origin}: group name {group!r} is also an entry name or alias")
        missing = [member for member in members if member not in entries]
        if missing:
            raise ManifestError(f"{origin}: group {group!r} names unknown entries {missing}")
        groups[group] = tuple(members)
    _check_shared_files_agree(entries.values(), origin)
    return Manifest(entries=entries, groups=groups, origin=origin)


def _check_shared_files_agree(entries: Iterable[Entry], origin: str) -> None:
    # Two entries may share a file (both 16-bit tokenizers use one yaml), but then they must describe it the same way,
    # or which hash applies would depend on the order of the fetch.
    seen: dict[str, tuple[str, WeightFile]] = {}
    for entry in entries:
        for file in entry.files:
            if file.path in seen and seen[file.path][1] != file:
                raise ManifestError(
                    f"{origin}: entries {seen[file.path][0]} and {entry.name} describe {file.path} differently"
                )
            seen.setdefault(file.path, (entry.name, file))


def manifest_location(path: str | os.PathLike[str] | None = None) -> str:
    if path is not None:
        return str(path)
    return os.environ.get(MANIFEST_VARIABLE) or "<package>/weights_manifest.json"


def load_manifest(path: str | os.PathLike[str] | None = None) -> Manifest:
    """The manifest at `path`, else at `$BAR_WEIGHTS_MANIFEST`, else the one shipped in the package."""
    chosen = path if path is not None else os.environ.get(MANIFEST_VARIABLE)
    try:
        if chosen:
            text = Path(chosen).expanduser().read_text(encoding="utf-8")
        else:
            text = resources.files("bar_lightning").joinpath("weights_manifest.json").read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as error:
        raise ManifestError(f"cannot read the weights manifest {manifest_location(chosen)}: {error}") from None
    return parse_manifest(data, manifest_location(chosen))


def default_pretrained_dir() -> Path:
    """`paths.pretrained_dir` of conf/paths/default.yaml: `$BAR_ROOT/pretrained`, else `<clone>/pretrained`."""
    from bar_lightning.paths import project_root

    return project_root() / "pretrained"


# ---------------------------------------------------------------------------------------------------------------
# Hints for the "file missing" errors of training and evaluation
# ---------------------------------------------------------------------------------------------------------------
def fetch_hint(path: str | os.PathLike[str] | None, *, mentioned: str = "") -> str:
    """A sentence naming the fetch command for a missing file, or "" when no manifest entry provides it.

    The entry is found by the configured path (its tail under the pretrained folder, or its base name) or, when no
    path was configured, by a manifest file name that `mentioned` (the error's description of the file) contains.
    `--dir` is added when the configured path is not under the default pretrained folder. This runs while another
    error is being reported, so it never raises.
    """
    try:
        manifest = load_manifest()
        if path is not None and str(path):
            configured = Path(path).expanduser()
            for entry in manifest.entries.values():
                for file in entry.files:
                    if configured.as_posix().endswith("/" + file.path) or configured.as_posix() == file.path:
                        folder = Path(configured.as_posix()[: -len(file.path)] or ".")
                        return _hint_sentence(entry.name, folder)
            entries = manifest.entries_providing(configured.name)
            if entries:
                placed = default_pretrained_dir() / entries[0].files[0].path
                return (f" Fetch it with: {COMMAND} fetch {entries[0].name} (it writes {placed}; point the config "
                        "there or copy the file to the path above).")
            return ""
        for entry in manifest.entries.values():
            if any(Path(file.path).name in mentioned for file in entry.files):
                return _hint_sentence(entry.name, default_pretrained_dir())
    except Exception:  # a hint must never hide the error it decorates
        return ""
    return ""


def _hint_sentence(name: str, folder: Path) -> str:
    try:
        same = folder.resolve() == default_pretrained_dir().resolve()
    except OSError:
        same = False
    where = "" if same else f" --dir {folder}"
    return f" Fetch it with: {COMMAND} fetch {name}{where}"


# ---------------------------------------------------------------------------------------------------------------
# Lock file
# ---------------------------------------------------------------------------------------------------------------
def read_lock(folder: Path) -> dict[str, dict[str, Any]]:
    lock_path = folder / LOCK_FILE_NAME
    if not lock_path.exists():
        return {}
    try:
        data = json.loads(lock_path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        return files
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"{lock_path} is unreadable ({error}); move it away and run `{COMMAND} fetch ...` again to rebuild it"
        ) from None


def record_in_lock(folder: Path, relative_path: str, record: dict[str, Any]) -> None:
    """Add or replace one file's record; written to a temporary file and renamed, so the lock is never half written."""
    files = read_lock(folder)
    files[relative_path] = record
    lock_path = folder / LOCK_FILE_NAME
    temporary = lock_path.with_name(lock_path.name + ".tmp")
    temporary.write_text(json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=2) + "\n",
                         encoding="utf-8")
    os.replace(temporary, lock_path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Hashing and checks
# ---------------------------------------------------------------------------------------------------------------
def sha256_of(path: Path, *, label: str | None = None) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with ByteProgress(label or f"hashing {path.name}", size) as advance, path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


@dataclass(frozen=True)
class Expectation:
    """What a file's content must be, and where that knowledge came from (shown when a file is refused)."""

    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    origin: str = ""

    def mismatch(self, *, size: int, sha256: str) -> str | None:
        """Why a file of this size and hash is refused, or None when it matches."""
        if self.size is not None and size != self.size:
            return f"size {size} bytes, expected {self.size} bytes ({self.origin})"
        if self.sha256 is not None and sha256 != self.sha256:
            return f"sha256 {sha256}, expected {self.sha256} ({self.origin})"
        if self.sha256_prefix is not None and not sha256.startswith(self.sha256_prefix):
            return f"sha256 {sha256}, expected one starting with {self.sha256_prefix} ({self.origin})"
        return None

    @property
    def knows_content(self) -> bool:
        return self.sha256 is not None or self.sha256_prefix is not None


def manifest_expectation(file: WeightFile) -> Expectation:
    return Expectation(sha256=file.sha256, sha256_prefix=file.sha256_prefix, size=file.size, origin="manifest")


def refusal(path: Path, reason: str, entry_name: str) -> str:
    return (
        f"REFUSED {path}: {reason}. The file is not the expected one (corrupted, truncated or replaced). Fix: delete "
        f"it and fetch it again: rm '{path}' && {COMMAND} fetch {entry_name}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------
class ByteProgress:
    """A rich progress bar on stderr for `total` bytes (None: unknown); yields a function that advances it."""

    def __init__(self, label: str, total: int | None, completed: int = 0) -> None:
        self.label, self.total, self.completed = label, total, completed

    def __enter__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, completed=self.completed)
        return lambda count: self.bar.advance(task, count)

    def __exit__(self, *exc_info: object) -> None:
        self.bar.stop()


# ---------------------------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A source resolved to the URL that serves its bytes, with what the server says about them."""

    source: Source
    download_url: str
    headers: dict[str, str]
    expectation: Expectation
    commit: str | None = None


def resolve_source(source: Source, file: WeightFile) -> Resolved:
    """The URL to stream from; for a Hugging Face file also the hub's SHA-256 (LFS/Xet files) and commit."""
    pinned = manifest_expectation(file)
    if not source.is_hf:
        return Resolved(source=source, download_url=str(source.url), headers={}, expectation=pinned)
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers
    except ImportError:
        raise WeightsError(
            f"{file.path} comes from the Hugging Face hub ({source.describe()}), which needs huggingface_hub: "
            "pip install huggingface_hub"
        ) from None

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    url = hf_hub_url(source.hf_repo, source.hf_filename, revision=source.revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url)
    except Exception as error:  # huggingface_hub raises many types; all mean "cannot resolve"
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise _SourceFailed(source, url, f"{type(error).__name__}: {first_line}") from None
    hub_sha256 = metadata.etag if metadata.etag and _SHA256.match(metadata.etag) else None
    if hub_sha256 and pinned.sha256 and hub_sha256 != pinned.sha256:
        raise _SourceFailed(source, url, f"the hub reports sha256 {hub_sha256} but the manifest pins {pinned.sha256}"
                                         " (the file was replaced upstream); not downloaded")
    expectation = Expectation(
        sha256=pinned.sha256 or hub_sha256,
        sha256_prefix=pinned.sha256_prefix,
        size=pinned.size if pinned.size is not None else metadata.size,
        origin="manifest" if pinned.sha256 else "reported by the hub" if hub_sha256 else "manifest",
    )
    download_url = metadata.location or url
    # The token goes only to the hub itself, never to the CDN a large file is redirected to.
    same_host = urllib.parse.urlsplit(download_url).netloc == urllib.parse.urlsplit(url).netloc
    headers = dict(build_hf_headers()) if same_host else {}
    headers.pop("Accept-Encoding", None)
    return Resolved(source=source, download_url=download_url, headers=headers, expectation=expectation,
                    commit=metadata.commit_hash)


class _SourceFailed(Exception):
    """One source could not deliver the file; the caller tries the next mirror or reports all failures."""

    def __init__(self, source: Source, url: str, reason: str, *, keep_trying: bool = True) -> None:
        super().__init__(f"{url}: {reason}")
        self.source, self.url, self.reason, self.keep_trying = source, url, reason, keep_trying


def _open(url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={**headers, "Accept-Encoding": "identity"})
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)  # http(s) only: the manifest parser checks


def _content_range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def stream_to_partial(resolved: Resolved, partial: Path, label: str) -> tuple[int, str]:
    """Download into `partial`, resuming from its current length; returns (size, sha256) of the complete file.

    A server that ignores `Range` answers 200 with the whole file: the partial file is then restarted from zero,
    never appended to. Any interruption leaves `partial` in place for the next attempt.
    """
    expected_size = resolved.expectation.size
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:
        partial.unlink()  # longer than the whole file: not a prefix of it
        have = 0
    digest = hashlib.sha256()
    if have:
        with ByteProgress(f"re-reading {partial.name}", have) as advance, partial.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                advance(len(chunk))
    if expected_size is not None and have == expected_size:
        return have, digest.hexdigest()  # the previous attempt got every byte and stopped before the checks

    headers = dict(resolved.headers)
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = _open(resolved.download_url, headers)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            partial.unlink()  # the server cannot continue this partial file: start over next time
            raise _SourceFailed(resolved.source, resolved.download_url,
                                f"the server refused to resume at byte {have} (HTTP 416); the partial file was "
                                "deleted, run the command again to download from the start") from None
        raise _SourceFailed(resolved.source, resolved.download_url, f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _SourceFailed(resolved.source, resolved.download_url, f"cannot connect ({reason})") from None

    with response:
        if response.status == 206 and _content_range_start(response) == have and have:
            mode = "ab"
        elif response.status == 206:
            partial.unlink(missing_ok=True)
            raise _SourceFailed(resolved.source, resolved.download_url,
                                f"asked for bytes {have}- but the server sent "
                                f"'{response.headers.get('Content-Range')}'; the partial file was deleted, run the "
                                "command again to download from the start", keep_trying=False)
        else:
            mode, have, digest = "wb", 0, hashlib.sha256()  # a 200: the server sent the file from byte 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else expected_size
        received = have
        try:
            with partial.open(mode) as handle, ByteProgress(label, total, completed=have) as advance:
                received = _copy(response, handle, digest, advance, start=have)
        except (OSError, http.client.HTTPException) as error:
            raise _SourceFailed(resolved.source, resolved.download_url,
                                f"interrupted after {_bytes_so_far(partial)} bytes ({error}); run the same command "
                                f"again to resume from {partial}", keep_trying=False) from None
    if total is not None and received < total:
        raise _SourceFailed(resolved.source, resolved.download_url,
                            f"the connection closed after {received} of {total} bytes; run the same command again "
                            f"to resume from {partial}", keep_trying=False)
    return received, digest.hexdigest()


def _bytes_so_far(partial: Path) -> int:
    return partial.stat().st_size if partial.exists() else 0


def _copy(response: BinaryIO, handle: BinaryIO, digest: Any, advance: Any, *, start: int) -> int:
    received = start
    while chunk := response.read(CHUNK_BYTES):
        handle.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        advance(len(chunk))
    handle.flush()
    return received


# ---------------------------------------------------------------------------------------------------------------
# fetch / verify
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What a command did, printed line by line; the failures decide the exit code."""

    failures: list[str]

    def ok(self, line: str) -> None:
        print(line, flush=True)

    def fail(self, line: str) -> None:
        self.failures.append(line)
        print(line, file=sys.stderr, flush=True)


def _unique_files(entries: Sequence[Entry]) -> Iterator[tuple[Entry, WeightFile]]:
    seen: set[str] = set()
    for entry in entries:
        for file in entry.files:
            if file.path not in seen:
                seen.add(file.path)
                yield entry, file


def check_present_file(folder: Path, entry: Entry, file: WeightFile, lock: dict[str, dict[str, Any]],
                       report: Report, *, adopt: bool, hub: Expectation | None = None) -> bool:
    """Check a file already at its destination; returns False (and reports why) when it is refused.

    The manifest's hash or prefix wins when it has one; otherwise the lock's record (what was first downloaded), else
    `hub`, what the hub reports for an unrecorded Hugging Face file. A file with none of these, e.g. a hand-copied
    file offline, is adopted into the lock by `fetch` (trust on first use) and reported as unrecorded by `verify`.
    """
    destination = folder / file.path
    size = destination.stat().st_size
    sha256 = sha256_of(destination, label=f"checking {file.path}")
    pinned = manifest_expectation(file)
    recorded = lock.get(file.path)
    expectation = pinned
    if not pinned.knows_content and recorded:
        expectation = Expectation(sha256=recorded.get("sha256"), size=recorded.get("size"),
                                  origin=f"{LOCK_FILE_NAME}, recorded {recorded.get('fetched_at', '?')}")
    elif not pinned.knows_content and hub is not None:
        expectation = hub
    reason = expectation.mismatch(size=size, sha256=sha256)
    if reason:
        report.fail(refusal(destination, reason, entry.name))
        return False
    if pinned.knows_content:
        how = "matches the manifest"
    elif recorded:
        how = f"matches {LOCK_FILE_NAME}"
    elif expectation.knows_content:
        how = f"matches the sha256 {expectation.origin}"
    else:
        how = "no recorded hash"
    if adopt and (recorded is None or recorded.get("sha256") != sha256):
        # A hand-copied file (or one whose stale record the manifest's pinned hash overrides) is recorded as it is.
        record_in_lock(folder, file.path, {"size": size, "sha256": sha256, "source": "present before fetch",
                                           "entry": entry.name, "fetched_at": _now()})
        how += f"; recorded in {LOCK_FILE_NAME}"
    elif recorded is None and not pinned.knows_content:
        how += f" (run `{COMMAND} fetch {entry.name}` to record it)"
    report.ok(f"ok      {file.path} ({size} bytes, {how})")
    return True


def fetch_file(folder: Path, entry: Entry, file: WeightFile, report: Report, *, offline: bool) -> None:
    destination = folder / file.path
    lock = read_lock(folder)
    if destination.exists():
        hub = None
        if not offline and file.path not in lock and not manifest_expectation(file).knows_content:
            hub = _hub_expectation(file)
        check_present_file(folder, entry, file, lock, report, adopt=True, hub=hub)
        return
    if offline:
        report.fail(_missing_message(folder, entry, file, "offline: not downloaded"))
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
    attempts = []
    for source in file.sources:
        try:
            resolved = resolve_source(source, file)
            size, sha256 = stream_to_partial(resolved, partial, label=file.path)
        except _SourceFailed as failure:
            attempts.append(f"{failure.url}: {failure.reason}")
            if failure.keep_trying:
                continue
            break
        reason = resolved.expectation.mismatch(size=size, sha256=sha256)
        if reason:
            partial.unlink()  # complete but wrong: resuming it could never give the right file
            report.fail(
                f"REFUSED {file.path} from {resolved.download_url}: {reason}. The download was deleted and nothing "
                f"was installed at {destination}. Fix: run `{COMMAND} fetch {entry.name}` again; if it is refused "
                f"again, the file at the source changed: report it, or copy a known-good copy to {destination}."
            )
            return
        os.replace(partial, destination)
        record_in_lock(folder, file.path, {
            "size": size, "sha256": sha256, "source": source.describe(), "url": resolved.download_url,
            "commit": resolved.commit, "entry": entry.name, "fetched_at": _now(),
            "checked_against": resolved.expectation.origin if resolved.expectation.knows_content
            else "nothing (first download)",
        })
        checked = (f"checked against the {resolved.expectation.origin}" if resolved.expectation.knows_content
                   else "recorded: trust on first download")
        report.ok(f"fetched {file.path} ({size} bytes, sha256 {sha256[:16]}..., {checked})")
        return
    tried = "; ".join(attempts)
    report.fail(
        f"FAILED  {file.path} ({entry.name}): {tried}. Alternative: download it by hand from "
        f"{file.sources[0].browser_url()} and copy it to exactly {destination}, then run `{COMMAND} fetch "
        f"{entry.name}` to check and record it."
    )


def _hub_expectation(file: WeightFile) -> Expectation | None:
    """What the hub reports for a file copied by hand, so that adopting it checks it too; None when unreachable."""
    for source in file.sources:
        if source.is_hf:
            try:
                expectation = resolve_source(source, file).expectation
            except _SourceFailed:
                continue
            if expectation.knows_content:
                return expectation
    return None


def _missing_message(folder: Path, entry: Entry, file: WeightFile, why: str) -> str:
    return (f"MISSING {file.path} ({entry.name}; {why}): get it from {file.sources[0].browser_url()} and copy it to "
            f"exactly {folder / file.path}, or run `{COMMAND} fetch {entry.name}` with network access.")


def verify(folder: Path, entries: Sequence[Entry], report: Report, *, missing_is_failure: bool) -> None:
    lock = read_lock(folder)
    for entry, file in _unique_files(entries):
        destination = folder / file.path
        if not destination.exists():
            message = _missing_message(folder, entry, file, "not fetched")
            if missing_is_failure:
                report.fail(message)
            else:
                report.ok(f"missing {file.path} ({entry.name}): `{COMMAND} fetch {entry.name}`")
            continue
        check_present_file(folder, entry, file, lock, report, adopt=False)


def list_entries(manifest: Manifest, folder: Path) -> None:
    print(f"pretrained folder: {folder}")
    print(f"manifest: {manifest.origin}\n")
    for entry in manifest.entries.values():
        alias = f" (alias {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{entry.name}{alias}: {entry.description}")
        for file in entry.files:
            state = "present" if (folder / file.path).exists() else "missing"
            size = f"{file.size} bytes" if file.size is not None else "size from server"
            print(f"    {state:8s}{file.path}  <- {file.sources[0].describe()}  [{size}; {file.pinning}]")
    print("\ngroups: all = every name; " + "; ".join(f"{group} = {' '.join(members)}"
                                                     for group, members in manifest.groups.items()))


@contextlib.contextmanager
def one_fetch_at_a_time(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder: two fetches appending to one `.part` file would corrupt it."""
    with (folder / FETCH_LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise WeightsError(
                f"another `{COMMAND} fetch` is running in {folder}; wait for it to finish (its downloads resume "
                "where they stopped if it is interrupted)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def offline_requested(flag: bool) -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag or value in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Fetch and verify released BAR weights and the pretrained networks the configs read.")
    parser.add_argument("--dir", type=Path, default=None,
                        help="pretrained folder (default: paths.pretrained_dir = $BAR_ROOT/pretrained, else "
                             "<clone>/pretrained)")
    parser.add_argument("--manifest", default=None,
                        help=f"another manifest JSON (default: ${MANIFEST_VARIABLE}, else the packaged one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="names, their files, where they go and whether they are present")
    fetch = commands.add_parser("fetch", help="download, check and record files (resumes partial downloads)")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="entry, alias or group names ('all': everything)")
    fetch.add_argument("--offline", action="store_true",
                       help="no network (also HF_HUB_OFFLINE=1): check present files, list missing ones")
    check = commands.add_parser("verify", help="check present files against the manifest or the lock")
    check.add_argument("names", nargs="*", metavar="NAME",
                       help="names to verify (missing files then fail); default: every present file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        manifest = load_manifest(arguments.manifest)
        folder = (arguments.dir or default_pretrained_dir()).expanduser().resolve()
        if arguments.command == "list":
            list_entries(manifest, folder)
            return EXIT_OK
        report = Report(failures=[])
        if arguments.command == "fetch":
            entries = manifest.resolve(arguments.names)
            offline = offline_requested(arguments.offline)
            folder.mkdir(parents=True, exist_ok=True)
            with one_fetch_at_a_time(folder):
                for entry, file in _unique_files(entries):
                    fetch_file(folder, entry, file, report, offline=offline)
        else:
            entries = manifest.resolve(arguments.names) if arguments.names else list(manifest.entries.values())
            verify(folder, entries, report, missing_is_failure=bool(arguments.names))
    except (UnknownNameError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if report.failures:
        print(f"\n{len(report.failures)} file(s) failed in {folder}; see the lines above.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
