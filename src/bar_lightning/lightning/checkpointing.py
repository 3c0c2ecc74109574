"""Checkpoint files: atomic, durable saves; safe loads; and the choice of the checkpoint a run resumes from.

* :class:`AtomicCheckpointIO` is the Trainer's checkpoint I/O plugin: every checkpoint Lightning writes
  (`ModelCheckpoint`, `last.ckpt`, the preemption save) goes to a temporary file in the destination folder, is
  flushed and fsynced, then renamed over the target, so a kill or a full disk never leaves a truncated `last.ckpt`.
  Every checkpoint it reads is read with `torch.load(weights_only=True)`: no code in the file runs.
* :class:`FinalCheckpoint` makes sure `last.ckpt` holds the final step when training ends.
* :func:`newest_valid_checkpoint` picks what an automatic resume loads: the newest checkpoint in the run's own
  `checkpoints/` folder that opens as a training checkpoint. A damaged newer file is reported by name and skipped.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bar_lightning.io import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".ckpt"
LAST_CHECKPOINT_NAME = "last.ckpt"
# Keys every Lightning training checkpoint holds; a file without them cannot resume a fit.
TRAINING_CHECKPOINT_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot (or must not) be loaded; the message names the file and the reason."""


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint without executing code in it (`weights_only=True`).

    Raises `CheckpointReadError` naming the file when it needs arbitrary code to unpickle (a crafted or foreign
    pickle) or when it is truncated or corrupt. `mmap=True` maps tensor storage instead of reading it, so checking
    a large checkpoint costs little memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # legacy (non-zip) pickles cannot be memory-mapped; they are still read without running code
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        what = (
            "unpickling it would run arbitrary code" if "GLOBAL" in reason else
            "it is not a plain checkpoint of tensors and containers; only the unrestricted unpickler, which can run "
            "arbitrary code, would read it"
        )
        raise CheckpointReadError(
            f"refusing to load {path}: {what} ({reason}). Only plain checkpoints (as train.py writes) are loaded; if "
            "you trust the file, re-save its contents as tensors from a trusted environment"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointReadError(
            f"{path} is truncated or corrupt and cannot be loaded ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointReadError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint (a dict)")
    return checkpoint


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what was refused (e.g. `GLOBAL posix.system`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    return (named or lines or [type(error).__name__])[0]


def check_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """`read_checkpoint` (memory-mapped) plus the keys a resumed fit needs; returns the checkpoint."""
    checkpoint = read_checkpoint(path, mmap=True)
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointReadError(
            f"{path} is not a training checkpoint of this project: it lacks {missing} (a weights-only export or a "
            "released .bin cannot resume training; use it through evaluate.py or the compat loaders)"
        )
    return checkpoint


def newest_valid_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest `*.ckpt` in `folder` (by modification time) that loads as a training checkpoint.

    None when the folder holds no checkpoint. Damaged newer files are logged by name and skipped. When every
    checkpoint is damaged this raises rather than returning None: silently starting from scratch in a run
    directory that holds training state would throw that state away.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [path for path in folder.iterdir() if path.suffix == CHECKPOINT_SUFFIX and path.is_file()]
    # Newest first; at equal times `last.ckpt` first (it is written after the step checkpoint of the same step).
    candidates.sort(key=lambda path: (path.stat().st_mtime_ns, path.name == LAST_CHECKPOINT_NAME), reverse=True)
    problems = []
    for path in candidates:
        try:
            check_training_checkpoint(path)
        except CheckpointReadError as error:
            log.warning("Not resuming from %s: %s", path, error)
            problems.append(str(error))
            continue
        if problems:
            log.warning("Resuming from %s, the newest checkpoint that loads", path)
        return path
    if problems:
        raise CheckpointReadError(
            f"no checkpoint in {folder} can be loaded, so this run cannot resume:\n  " + "\n  ".join(problems)
            + f"\nMove the damaged files out of {folder} to start from scratch, or pass ckpt_path=<a good file>"
        )
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with durable atomic local saves and code-free loads.

    Lightning's own save stages the file through an fsspec transaction (in $TMPDIR on some versions) and does not
    fsync; here the temporary file sits in the destination folder and is fsynced before the rename. Remote URLs
    (s3://, gs://, ...) keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not use storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(path, lambda file: torch.save(checkpoint, file), durable=True)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        # Always weights_only: a resumed or user-named checkpoint must never run code, whatever the caller asked.
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path, map_location=map_location)


class FinalCheckpoint(L.Callback):
    """Writes `checkpoint_path` when training ends, unless it already holds the final step.

    `ModelCheckpoint(save_last=True)` saves `last.ckpt` only together with a periodic checkpoint, so a run whose
    `max_steps` is not a multiple of `every_n_train_steps` would otherwise end with the last few steps unsaved.
    """

    def __init__(self, checkpoint_path: str | os.PathLike) -> None:
        self.checkpoint_path = Path(checkpoint_path)

    def _saved_step(self) -> int | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            return int(check_training_checkpoint(self.checkpoint_path)["global_step"])
        except CheckpointReadError:
            return None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads the same file and takes the same branch: save_checkpoint is collective.
        if self._saved_step() != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
