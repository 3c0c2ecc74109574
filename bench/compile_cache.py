"""Compile artifacts carried from one GPU machine to the next, so that a benchmark call does not spend its device time
compiling what an earlier call already compiled.

Each device call starts a fresh machine with an empty Inductor cache, and a cold compilation of the full-size tokenizer
step took 215-350 s for ours and 240-460 s for the official one (docs/benchmarks.md 5f-5j): two cold codes did not fit
in one 600 s call. torch's portable compile cache (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`:
the FX-graph, AOTAutograd and Triton-kernel artifacts of the process) removes that cost:

* `BENCH_COMPILE_CACHE_IN=<dir>`: before compiling, `load(prefix)` loads every blob of that folder whose key starts
  with `prefix` (the code and script: `ours_tokenizer`, `official_tokenizer`, `ours_training`, `official_training`),
  so a G/D-phase run also finds the autoencoder graphs of a generator-phase blob. A blob that is truncated, corrupt or
  from another torch fails with a printed warning and the run compiles as without it: the cache saves time, never
  changes what runs. Blobs are pickles: load only those your own runs wrote.
* `BENCH_COMPILE_CACHE_OUT=<dir>`: at the end of a script, `save(key)` writes what the process compiled or took from
  the cache as `<key>.megacache.xz.NN` (xz at a fast preset, split into parts of at most `PART_BYTES`, since a device
  call returns files of at most 16 MiB), unless every artifact of it was loaded. The key names the run (code, phase,
  variants): torch re-saves only the loaded artifacts a process used, so one blob per kind of run keeps each
  complete. Once per process: torch serialises a second time by appending, and its loader keeps only the last batch
  of each kind of artifact (`CacheArtifactManager.deserialize` builds a dict), which would silently drop the first.
  bench/h200.sh uses the carried `.compile_cache/` as both folders and returns the blobs a call wrote under
  `$OUT/compile_cache`.
* `python bench/compile_cache.py <returned folder>` puts returned blobs into `.compile_cache/` (git-ignored), replacing
  the older blob of each key, compressed again at xz's strongest preset (a call carries at most 64 MiB, the wheels
  take 26 of them); carry it (`carry: [".whl", ".upstream", ".compile_cache"]`). Measured on the blob of ours'
  full-size G/D phase (2026-12-07, 137.7 MiB of artifacts): zlib level 6 20.3 MiB; xz preset 1 10.3 MiB (3.4 s on
  the 2-core development machine), preset 9e 5.5 MiB (76 s there). Blobs of the zlib format written before then
  (`<key>.megacache.zlib.NN`) are converted by the same command.

Artifacts are keyed by torch, Triton and the GPU (a blob written on an H100 misses on an H200) and by the graphs, so a
code change recompiles what it touches. The timed steps do not depend on where their kernels came from; `first_steps_s`
does, and every row records `compile_cache` (the artifacts loaded) to say so.
"""

from __future__ import annotations

import argparse
import lzma
import os
import re
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

PART_BYTES = 15 * 2**20
SUFFIX = ".megacache.xz."
ZLIB_SUFFIX = ".megacache.zlib."  # the format before 2026-12-07's eighth session; take() converts it
SAVE_PRESET = 1  # at the end of a device run, inside its time limit
CARRY_PRESET = 9 | lzma.PRESET_EXTREME  # on the development machine, for the 64 MiB a call carries
_KEY = re.compile(r"^[A-Za-z0-9._-]+$")

# Artifact keys loaded by this process (a save that adds none writes nothing), and whether it saved already.
_loaded: set[str] = set()
_saved = False


def artifact_keys(info: Any) -> set[str]:
    """The artifact keys of a `torch.compiler` CacheInfo, as `kind/key`."""
    return {f"{kind}/{key}" for kind, keys in getattr(info, "artifacts", {}).items() for key in keys}


def blob_parts(folder: Path, suffix: str = SUFFIX) -> dict[str, list[Path]]:
    """The parts of every blob in `folder` (of the format `suffix` names), by key, in order."""
    numbered: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in folder.glob(f"*{suffix}*"):
        key, _, number = path.name.rpartition(suffix)
        if number.isdigit():
            numbered[key].append((int(number), path))
    # By number, not by name: part 100 comes after part 99, not after part 10.
    return {key: [path for _, path in sorted(paths)] for key, paths in sorted(numbered.items())}


def decompress(data: bytes, suffix: str = SUFFIX) -> bytes:
    """The one xz (or, for `ZLIB_SUFFIX`, zlib) stream of `data`, refusing a truncated or corrupt stream and bytes
    after its end (a part of another blob)."""
    name = "zlib" if suffix == ZLIB_SUFFIX else "xz"
    stream = zlib.decompressobj() if suffix == ZLIB_SUFFIX else lzma.LZMADecompressor(lzma.FORMAT_XZ)
    blob = stream.decompress(data)
    if not stream.eof:
        raise ValueError(f"the {name} stream is truncated (a part is missing or cut short)")
    if stream.unused_data:
        raise ValueError(f"{len(stream.unused_data)} bytes follow the {name} stream (a part of another blob)")
    return blob


def read_blob(parts: list[Path], suffix: str = SUFFIX) -> bytes:
    """The artifacts of one blob from its parts, which must be numbered 0..n-1 (see `decompress` for the rest)."""
    numbers = [int(path.name.rpartition(suffix)[2]) for path in parts]
    if numbers != list(range(len(parts))):
        raise ValueError(f"parts {numbers} are not 0..{len(parts) - 1}")
    return decompress(b"".join(path.read_bytes() for path in parts), suffix)


def write_blob(folder: Path, key: str, data: bytes, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write the compressed blob `data` as the parts of `key` in `folder`, replacing every older part of that key (of
    either format). All parts are written before the old ones go: a process killed meanwhile leaves the old blob or
    a truncated new one, which load() refuses."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    for number, start in enumerate(range(0, len(data), part_bytes)):
        path = folder / f"{key}{SUFFIX}{number:02d}"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data[start : start + part_bytes])
        staged.append((temporary, path))
    for suffix in (SUFFIX, ZLIB_SUFFIX):
        for stale in blob_parts(folder, suffix).get(key, []):
            stale.unlink()
    for temporary, path in staged:
        os.replace(temporary, path)
    return [path for _, path in staged]


def load(prefix: str, folder: str | os.PathLike | None = None) -> int:
    """Load every blob of `folder` (default: $BENCH_COMPILE_CACHE_IN) whose key starts with `prefix`; returns how many
    artifacts they held (0 without a folder or a blob; a blob that cannot be loaded counts none)."""
    folder = folder if folder is not None else os.environ.get("BENCH_COMPILE_CACHE_IN")
    blobs = blob_parts(Path(folder)) if folder and Path(folder).is_dir() else {}
    total = 0
    for key, parts in blobs.items():
        if not key.startswith(prefix):
            continue
        try:
            blob = read_blob(parts)
            info = torch.compiler.load_cache_artifacts(blob)
            if info is None:  # torch logs why (a checksum, another version) and returns nothing
                raise ValueError("torch.compiler.load_cache_artifacts could not read it")
        except Exception as error:  # a cache only saves time: compile as without it
            print(f"compile cache {key}: not loaded ({type(error).__name__}: {error}); compiling without it",
                  flush=True)
            continue
        keys = artifact_keys(info)
        _loaded.update(keys)
        total += len(keys)
        print(f"compile cache {key}: loaded {len(keys)} artifacts", flush=True)
    return total


def save(key: str, folder: str | os.PathLike | None = None, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write this process's compile artifacts as blob `key` in `folder` (default: $BENCH_COMPILE_CACHE_OUT) when they
    hold any that was not loaded; returns the parts written (none when saving fails: printed). Once per process."""
    global _saved
    folder = folder if folder is not None else os.environ.get("BENCH_COMPILE_CACHE_OUT")
    if not folder:
        return []
    if not _KEY.match(key):
        raise ValueError(f"compile cache key {key!r}: use letters, digits, '.', '_' and '-' only (key_of makes one)")
    if _saved:
        raise RuntimeError("compile_cache.save runs once per process: torch's loader would keep only the artifacts "
                           "of the last save (see the module docstring); save at the end of the script")
    _saved = True
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return []
        blob, info = saved
        keys = artifact_keys(info)
        if keys <= _loaded:
            return []
        data = lzma.compress(blob, preset=SAVE_PRESET)
        written = write_blob(Path(folder), key, data, part_bytes)
    except Exception as error:  # the results are written already; a cache only saves time
        print(f"compile cache {key}: not saved ({type(error).__name__}: {error})", flush=True)
        return []
    print(f"compile cache {key}: saved {len(keys)} artifacts, {len(data) / 2**20:.1f} MiB in {len(written)} part(s)",
          flush=True)
    return written


def loaded_artifacts() -> int:
    """How many artifacts this process loaded (recorded in each bench row as `compile_cache`)."""
    return len(_loaded)


def key_of(*names: str) -> str:
    """A blob key from the names of a run (code, phase, variants), joined by '_': any other run of characters than
    letters, digits, '.', '_' and '-' becomes '-', since a device call returns only files named in those."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(names))


def take(returned: Path, into: Path, preset: int = CARRY_PRESET, part_bytes: int = PART_BYTES) -> list[str]:
    """Replace the blobs of `into` by those of `returned` (a device call's $OUT/compile_cache), key by key, compressed
    again at `preset`: a key's old parts all go, so a blob that shrank leaves no part behind. A zlib blob of the
    earlier format is converted (an xz blob of the same key wins). A returned blob that cannot be read is reported
    and left out, and the carried blob of its key stays. Returns the keys taken."""
    returned_blobs = {key: (parts, ZLIB_SUFFIX) for key, parts in blob_parts(returned, ZLIB_SUFFIX).items()}
    returned_blobs.update({key: (parts, SUFFIX) for key, parts in blob_parts(returned).items()})
    taken = []
    for key, (parts, suffix) in sorted(returned_blobs.items()):
        try:
            blob = read_blob(parts, suffix)
        except (ValueError, lzma.LZMAError, zlib.error) as error:
            print(f"{key}: not taken ({type(error).__name__}: {error}); the carried blob of this key, if any, stays")
            continue
        started = time.perf_counter()
        write_blob(into, key, lzma.compress(blob, preset=preset), part_bytes)
        print(f"{key}: {len(blob) / 2**20:.1f} MiB of artifacts compressed in {time.perf_counter() - started:.0f} s")
        taken.append(key)
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("returned", type=Path, help="the compile_cache folder a device call returned")
    parser.add_argument("--into", type=Path, default=Path(__file__).resolve().parents[1] / ".compile_cache",
                        help="the carried folder (default: .compile_cache at the repository root)")
    args = parser.parse_args()
    if not args.returned.is_dir():
        raise SystemExit(f"{args.returned}: no such folder (a device call returns its blobs under $OUT/compile_cache)")
    for key in take(args.returned, args.into):
        size = sum(path.stat().st_size for path in blob_parts(args.into)[key])
        print(f"{key}: {size / 2**20:.1f} MiB in {args.into}")
    total = sum(path.stat().st_size for paths in blob_parts(args.into).values() for path in paths)
    print(f"{args.into}: {total / 2**20:.1f} MiB carried with every call (a call carries at most 64 MiB in all)")


if __name__ == "__main__":
    main()
