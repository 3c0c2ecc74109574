"""The weights manifest: what each name fetches (files, destinations, sources, known sizes and hashes), read from
`weights_manifest.json` (or `$BAR_WEIGHTS_MANIFEST`), checked, and resolved from names, aliases and groups; plus the
errors the command reports and the default pretrained folder.

Standard library only: `hints` imports this while another error is being reported.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

MANIFEST_VARIABLE = "BAR_WEIGHTS_MANIFEST"  # another manifest file (tests use a fake one)
COMMAND = "python -m bar_lightning.weights"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA256_PREFIX = re.compile(r"^[0-9a-f]{8,63}$")


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
