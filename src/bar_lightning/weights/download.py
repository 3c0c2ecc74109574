"""Getting a file's bytes and checking them: the lock file (`weights.lock.json`), SHA-256 hashing and the expected
content, the progress bar, and the download itself (a Hugging Face file or a plain URL, streamed into `<dest>.part`
with resume).

`huggingface_hub` and `rich` are imported only where they are used.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bar_lightning.weights.manifest import _SHA256, COMMAND, Source, WeightFile, WeightsError

LOCK_FILE_NAME = "weights.lock.json"
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 60.0


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
