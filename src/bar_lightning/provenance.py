"""What made an artefact: the files it was computed from (path and content hash), the config, the seed, the code.

`metrics.json` (evaluate.py) and `metadata.json` (pretokenize.py) carry this record under `provenance`, so a result
can be traced to the exact checkpoint and code even when the run folder was shared or its files were moved.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_HASH_BLOCK = 4 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, read in blocks (a 5 GB checkpoint costs a few seconds, not its size in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """`{"path": absolute path, "sha256": ..., "bytes": ...}` of one input file."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def model_source_record(source: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The files a `generator` / `tokenizer` source section names, each with its hash (unset entries left out)."""
    return {
        key: file_record(value)
        for key in ("checkpoint", "upstream_weights", "upstream_config")
        if (value := source.get(key)) and Path(value).is_file()
    }


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """This package's version and, in a git checkout, its commit and whether tracked files were modified."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[2]
    try:
        package_version = version("bar_lightning")
    except PackageNotFoundError:  # imported from a source tree that was not installed: its pyproject says
        declared = re.search(r'^version = "([^"]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE) if (
            root / "pyproject.toml").is_file() else None
        package_version = declared.group(1) if declared else None
    record: dict[str, Any] = {"package_version": package_version, "git_commit": None, "git_modified": None}
    if not (root / ".git").exists():
        return record
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return record
    record.update(git_commit=commit or None, git_modified=bool(status.strip()))
    return record


def provenance(cfg: DictConfig, *, inputs: dict[str, Any]) -> dict[str, Any]:
    """The record stored with a result: inputs (with hashes), the resolved config, the seed, the code, when and where."""
    return {
        "inputs": inputs,
        "seed": cfg.get("seed"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "code": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
    }
