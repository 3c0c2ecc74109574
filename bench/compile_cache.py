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
  the cache as `<key>.megacache.zlib.NN` (zlib, split into parts of at most `PART_BYTES`, since a device call returns
  files of at most 16 MiB), unless every artifact of it was loaded. The key names the run (code, phase, variants):
  torch re-saves only the loaded artifacts a process used, so one blob per kind of run keeps each complete. Once per
  process: torch serialises a second time by appending, and its loader keeps only the last batch of each kind of
  artifact (`CacheArtifactManager.deserialize` builds a dict), which would silently drop the first.
  bench/h200.sh uses the carried `.compile_cache/` as both folders and returns the blobs a call wrote under
  `$OUT/compile_cache`.
* `python bench/compile_cache.py <returned folder>` puts returned blobs into `.compile_cache/` (git-ignored), replacing
  the older blob of each key; carry it (`carry: [".whl", ".upstream", ".compile_cache"]`).

Artifacts are keyed by torch, Triton and the GPU (a blob written on an H100 misses on an H200) and by the graphs, so a
code change recompiles what it touches. The timed steps do not depend on where their kernels came from; `first_steps_s`
does, and every row records `compile_cache` (the artifacts loaded) to say so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

PART_BYTES = 15 * 2**20
SUFFIX = ".megacache.zlib."
_KEY = re.compile(r"^[A-Za-z0-9._-]+$")

# Artifact keys loaded by this process (a save that adds none writes nothing), and whether it saved already.
_loaded: set[str] = set()
_saved = False


def artifact_keys(info: Any) -> set[str]:
    """The artifact keys of a `torch.compiler` CacheInfo, as `kind/key`."""
    return {f"{kind}/{key}" for kind, keys in getattr(info, "artifacts", {}).items() for key in keys}


def blob_parts(folder: Path) -> dict[str, list[Path]]:
    """The parts of every blob in `folder`, by key, in order."""
    parts: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.glob(f"*{SUFFIX}*")):
        key, _, number = path.name.rpartition(SUFFIX)
        if number.isdigit():
            parts[key].append(path)
    return dict(parts)


def decompress(data: bytes) -> bytes:
    """The one zlib stream of `data`, refusing a truncated stream or bytes after its end (a part of another blob)."""
    stream = zlib.decompressobj()
    blob = stream.decompress(data)
    if not stream.eof:
        raise ValueError("the zlib stream is truncated (a part is missing or cut short)")
    if stream.unused_data:
        raise ValueError(f"{len(stream.unused_data)} bytes follow the zlib stream (a part of another blob)")
    return blob


def load(prefix: str, folder: str | os.PathLike | None = None) -> int:
    """Load every blob of `folder` (default: $BENCH_COMPILE_CACHE_IN) whose key starts with `prefix`; returns how many
    artifacts they held (0 without a folder or a blob; a blob that cannot be loaded counts none)."""
    folder = folder if folder is not None else os.environ.get("BENCH_COMPILE_CACHE_IN")
    blobs = blob_parts(Path(folder)) if folder and Path(folder).is_dir() else {}
    total = 0
    for key, parts in blobs.items():
        if not key.startswith(prefix):
            continue
        numbers = [int(path.name.rpartition(SUFFIX)[2]) for path in parts]
        try:
            if numbers != list(range(len(parts))):
                raise ValueError(f"parts {numbers} are not 0..{len(parts) - 1}")
            blob = decompress(b"".join(path.read_bytes() for path in parts))
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
        data = zlib.compress(blob, 6)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # All parts are written before the old ones go: a run killed meanwhile leaves the old blob or a truncated
        # new one, which load() refuses.
        staged = []
        for number, start in enumerate(range(0, len(data), part_bytes)):
            path = folder / f"{key}{SUFFIX}{number:02d}"
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_bytes(data[start : start + part_bytes])
            staged.append((temporary, path))
        for stale in blob_parts(folder).get(key, []):
            stale.unlink()
        for temporary, path in staged:
            os.replace(temporary, path)
    except Exception as error:  # the results are written already; a cache only saves time
        print(f"compile cache {key}: not saved ({type(error).__name__}: {error})", flush=True)
        return []
    print(f"compile cache {key}: saved {len(keys)} artifacts, {len(data) / 2**20:.1f} MiB in {len(staged)} part(s)",
          flush=True)
    return [path for _, path in staged]


def loaded_artifacts() -> int:
    """How many artifacts this process loaded (recorded in each bench row as `compile_cache`)."""
    return len(_loaded)


def key_of(*names: str) -> str:
    """A blob key from the names of a run (code, phase, variants), joined by '_': any other run of characters than
    letters, digits, '.', '_' and '-' becomes '-', since a device call returns only files named in those."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(names))


def take(returned: Path, into: Path) -> list[str]:
    """Replace the blobs of `into` by those of `returned` (a device call's $OUT/compile_cache), key by key: a key's old
    parts all go, so a blob that shrank leaves no part behind. Returns the keys taken."""
    into.mkdir(parents=True, exist_ok=True)
    taken = []
    for key, parts in sorted(blob_parts(returned).items()):
        for stale in blob_parts(into).get(key, []):
            stale.unlink()
        for path in parts:
            shutil.copyfile(path, into / path.name)
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
