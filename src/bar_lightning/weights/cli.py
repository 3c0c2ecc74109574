"""The command line: `list`, `fetch` and `verify`, the report they print, the lock that keeps one fetch per folder,
the argument parser and the exit codes (`python -m bar_lightning.weights` runs `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bar_lightning.weights.download import (
    LOCK_FILE_NAME,
    Expectation,
    _now,
    _SourceFailed,
    manifest_expectation,
    read_lock,
    record_in_lock,
    refusal,
    resolve_source,
    sha256_of,
    stream_to_partial,
)
from bar_lightning.weights.manifest import (
    COMMAND,
    MANIFEST_VARIABLE,
    Entry,
    Manifest,
    ManifestError,
    UnknownNameError,
    WeightFile,
    WeightsError,
    default_pretrained_dir,
    load_manifest,
)

FETCH_LOCK_NAME = ".weights.fetch.lock"  # held while a fetch runs in the folder
PARTIAL_SUFFIX = ".part"

EXIT_OK = 0
EXIT_FAILED = 1  # a download failed, a file was refused, or (offline / verify NAME) a file is missing
EXIT_USAGE = 2  # unknown name, unreadable manifest


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
