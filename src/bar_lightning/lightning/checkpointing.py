"""Checkpoint files: atomic, durable saves; safe loads; and the choice of the checkpoint a run resumes from.

* :class:`AtomicCheckpointIO` is the Trainer's checkpoint I/O plugin: every checkpoint Lightning writes
  (`ModelCheckpoint`, `last.ckpt`, the preemption save) goes to a temporary file in the destination folder, is
  flushed and fsynced, then renamed over the target, so a kill or a full disk never leaves a truncated `last.ckpt`.
  It never replaces a checkpoint of a later step with one of an earlier step. Every checkpoint it reads is read
  with `torch.load(weights_only=True)`: no code in the file runs.
* :class:`FinalCheckpoint` makes sure `last.ckpt` holds the final step when training ends.
* :class:`RunIdentity` stamps every checkpoint with the identity of the run that wrote it (task, seed, model) and
  its hash, so a file from another run is told apart.
* :func:`scan_checkpoints` / :func:`most_advanced` pick what an automatic resume loads: the checkpoint of the
  highest `global_step` in the run's own `checkpoints/` folder (`last.ckpt` on a tie) among those that open as
  training checkpoints of this run. Damaged files and other runs' files are reported by name and never taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bar_lightning.checkpoint_files import (  # noqa: F401 - re-exported: the checkpoint API lives here too
    CHECKPOINT_KINDS,
    CHECKPOINT_SUFFIX,
    LAST_CHECKPOINT_NAME,
    RUN_IDENTITY_KEY,
    TRAINING_CHECKPOINT_KEYS,
    CheckpointConflictError,
    CheckpointKindError,
    CheckpointReadError,
    check_training_checkpoint,
    check_weights_fit,
    checkpoint_kind,
    read_checkpoint,
    read_module_checkpoint,
)
from bar_lightning.io import atomic_write

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Which run wrote a checkpoint, and which checkpoint a run resumes from
# --------------------------------------------------------------------------------------------------------------


def identity_hash(identity: dict[str, Any]) -> str:
    """A short, stable hash of a run identity (canonical JSON)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def identity_differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: ours vs theirs` for every leaf where two identities differ."""
    differences = []
    for key in sorted(set(ours) | set(theirs), key=str):
        mine, other = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        if isinstance(mine, dict) and isinstance(other, dict):
            differences += identity_differences(mine, other, f"{prefix}{key}.")
        elif mine != other:
            differences.append(f"{prefix}{key}: {mine!r} here, {other!r} in the file")
    return differences


class RunIdentity(L.Callback):
    """Stamps every checkpoint with the identity (task, seed, model) of the run writing it, and its hash."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity
        self.config_hash = identity_hash(identity)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_IDENTITY_KEY] = {"config_hash": self.config_hash, "identity": self.identity}


@dataclass
class CheckpointInfo:
    path: Path
    global_step: int
    config_hash: str | None  # None: written before checkpoints carried their run's identity
    identity: dict[str, Any] | None
    kind: str  # see checkpoint_kind


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Step and run identity of a training checkpoint, read memory-mapped (cheap even for a large file)."""
    checkpoint = check_training_checkpoint(path)
    stamp = checkpoint.get(RUN_IDENTITY_KEY)
    stamp = stamp if isinstance(stamp, dict) else {}
    config_hash = stamp.get("config_hash") if isinstance(stamp.get("config_hash"), str) else None
    identity = stamp.get("identity") if isinstance(stamp.get("identity"), dict) else None
    return CheckpointInfo(Path(path), int(checkpoint["global_step"]), config_hash, identity, checkpoint_kind(checkpoint))


@dataclass
class CheckpointScan:
    """What a run's `checkpoints/` folder holds: this run's checkpoints, other runs', and damaged files."""

    folder: Path
    ours: list[CheckpointInfo] = field(default_factory=list)
    foreign: list[tuple[CheckpointInfo, list[str]]] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)

    def most_advanced(self) -> CheckpointInfo | None:
        """This run's checkpoint of the highest step; `last.ckpt` on a tie (it is written after the others)."""
        if not self.ours:
            return None
        return max(self.ours, key=lambda info: (info.global_step, info.path.name == LAST_CHECKPOINT_NAME))


def scan_checkpoints(folder: str | os.PathLike, identity: dict[str, Any] | None) -> CheckpointScan:
    """Read the step and run of every `*.ckpt` in `folder` (memory-mapped); damaged files are listed, not raised.

    A checkpoint is this run's when its stamped hash equals `identity`'s (or it carries no stamp, or no identity is
    given); otherwise it is another run's, with the keys that differ.
    """
    scan = CheckpointScan(folder=Path(folder))
    if not scan.folder.is_dir():
        return scan
    config_hash = identity_hash(identity) if identity is not None else None
    for path in sorted(scan.folder.iterdir()):
        if path.suffix != CHECKPOINT_SUFFIX or not path.is_file():
            continue
        try:
            info = inspect_checkpoint(path)
        except CheckpointReadError as error:
            log.warning("Not resuming from %s: %s", path, error)
            scan.damaged.append(str(error))
            continue
        if config_hash is None or info.config_hash is None or info.config_hash == config_hash:
            scan.ours.append(info)
        else:
            differences = identity_differences(identity or {}, info.identity or {}) or ["(hash differs)"]
            log.warning("Not resuming from %s: written by another run (%s)", path, "; ".join(differences))
            scan.foreign.append((info, differences))
    return scan


def checkpoint_to_resume(scan: CheckpointScan) -> CheckpointInfo | None:
    """The checkpoint an automatic resume loads (see :meth:`CheckpointScan.most_advanced`).

    None when the folder holds no checkpoint. When it holds checkpoints but none of this run opens, this raises
    rather than returning None: silently starting from scratch would throw the training state away.
    """
    chosen = scan.most_advanced()
    if chosen is None and scan.damaged:
        raise CheckpointReadError(
            f"no checkpoint in {scan.folder} can be loaded, so this run cannot resume:\n  " + "\n  ".join(scan.damaged)
            + f"\nMove the damaged files out of {scan.folder} to start from scratch, or pass ckpt_path=<a good file>"
        )
    if chosen is not None and scan.damaged:
        log.warning("Resuming from %s, the most advanced checkpoint that loads", chosen.path)
    return chosen


def check_nothing_is_overwritten(scan: CheckpointScan, *, start_step: int, start: str) -> None:
    """Refuse to start when the run would overwrite another run's checkpoints or this run's later ones."""
    if scan.foreign:
        info, differences = scan.foreign[0]
        raise CheckpointConflictError(
            f"{scan.folder} holds {len(scan.foreign)} checkpoint(s) of another run (e.g. {info.path.name} at step "
            f"{info.global_step}: {'; '.join(differences[:3])}); this run would overwrite them. Use another "
            "hydra.run.dir, move those files away, or pass ckpt_path=<file> in a new run folder to continue from one"
        )
    later = [info for info in scan.ours if info.global_step > start_step]
    if later:
        latest = max(later, key=lambda info: info.global_step)
        raise CheckpointConflictError(
            f"{scan.folder} holds {latest.path.name} at step {latest.global_step}, later than this run's start "
            f"({start}, step {start_step}); continuing here would overwrite it. To branch from an earlier step, "
            f"start a new run folder (hydra.run.dir=<new>) with ckpt_path=<that file>"
        )


def newest_valid_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The most advanced checkpoint in `folder` that loads as a training checkpoint (no run identity check)."""
    chosen = checkpoint_to_resume(scan_checkpoints(folder, identity=None))
    return chosen.path if chosen is not None else None


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
        self._refuse_going_back(checkpoint, Path(path))
        atomic_write(path, lambda file: torch.save(checkpoint, file), durable=True)

    @staticmethod
    def _refuse_going_back(checkpoint: dict[str, Any], path: Path) -> None:
        """Never replace a checkpoint of a later step (e.g. written by a run that went further) with an earlier one."""
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or not path.is_file():
            return
        try:
            existing = inspect_checkpoint(path)
        except CheckpointReadError:
            return  # a damaged file holds nothing to keep
        if existing.global_step > step:
            raise CheckpointConflictError(
                f"not writing step {step} over {path}, which holds step {existing.global_step}; another run went "
                "further in this folder. Nothing was overwritten: use another run folder"
            )

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
