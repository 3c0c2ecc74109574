"""Small file utilities shared across the package."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, durable: bool = False) -> Path:
    """Write through a temporary file in the destination folder, then rename: readers never see a partial file.

    The temporary file lives next to `path` (not in $TMPDIR) so the rename never crosses file systems and a small
    node-local /tmp cannot fail the write. `durable=True` also flushes the file and the folder to disk (fsync)
    before and after the rename, so that after a crash or power loss `path` holds either the old or the new
    content, never a truncated one; checkpoints use it, the many small token files do not need the cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would have.
        os.chmod(temporary_name, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, values: Any, **dumps_options: Any) -> Path:
    """`values` as JSON through `atomic_write`; serialised first, so a value JSON cannot hold leaves no file behind."""
    text = json.dumps(values, **dumps_options)
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Persist a rename: on POSIX the new directory entry is durable only once the folder itself is synced."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
