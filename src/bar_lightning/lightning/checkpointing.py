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
import pickle
import zipfile
from dataclasses import dataclass, field
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
# Where RunIdentity stores the identity of the run that wrote a checkpoint.
RUN_IDENTITY_KEY = "bar_lightning_run"


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot (or must not) be loaded; the message names the file and the reason."""


class CheckpointConflictError(RuntimeError):
    """Starting or saving would overwrite checkpoints of a later step or of another run."""


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
    step = checkpoint["global_step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointReadError(f"{path} has global_step={step!r}, not a step count; it is not a training checkpoint")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# What kind of checkpoint a file is
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_KINDS = {
    "generator": "a generator checkpoint (written by train.py with a generator experiment)",
    "tokenizer": "a tokenizer checkpoint (written by train.py with a tokenizer experiment)",
    "weights": "a bare weights file (a state dict, like a released .bin), not a training checkpoint",
    "unknown": "not a checkpoint written by this project's train.py",
}


class CheckpointKindError(CheckpointReadError):
    """A checkpoint of another kind than the key it was given to expects; the message names both kinds."""


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    """`generator`, `tokenizer`, `weights` or `unknown`, from what a loaded checkpoint holds."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict):
        if {"model", "loss"} <= set(hparams):
            return "tokenizer"
        if {"model", "sampling"} <= set(hparams):
            return "generator"
        return "unknown"
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return "weights"
    return "unknown"


def read_module_checkpoint(path: str | os.PathLike, *, expected: str, key: str, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint given as `key` without running code, and refuse one of another kind than `expected`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist ({CHECKPOINT_KINDS[expected]})")
    try:
        checkpoint = read_checkpoint(path, mmap=mmap)
    except CheckpointReadError as error:
        raise CheckpointReadError(f"{key}: {error}") from None
    kind = checkpoint_kind(checkpoint)
    if kind != expected:
        section = key.split(".")[0]
        if kind in ("generator", "tokenizer"):
            hint = f"pass it as {kind}.checkpoint=<file>"
        elif kind == "weights":
            hint = f"released weights go in {section}.upstream_weights=<file> with {section}.upstream_config=<its yaml>"
        else:
            hint = f"give {section}.checkpoint a .ckpt from <run dir>/checkpoints/ of a {expected} run"
        raise CheckpointKindError(
            f"{key}={path} is {CHECKPOINT_KINDS[kind]}, but {key} takes {CHECKPOINT_KINDS[expected]}; {hint}"
        )
    return checkpoint


class _TooManyTensors(Exception):
    """Stops building a network that registers far more tensors than the checkpoint holds."""


def check_weights_fit(build: Any, weights: dict[str, Any], *, what: str) -> None:
    """Refuse a checkpoint whose hyper-parameters describe another network than its weights, before building it.

    `build()` constructs the network the hyper-parameters describe; it runs on the meta device, so a crafted
    checkpoint that claims gigantic layers costs no memory, and it is stopped as soon as it registers far more
    tensors than the file holds, so one that claims thousands of layers costs no time. Every weight must have its
    parameter's shape.
    """
    found = {key: tuple(value.shape) for key, value in weights.items() if isinstance(value, torch.Tensor)}
    limit = 2 * len(found) + 64  # non-persistent buffers (RoPE tables) are registered but never saved
    registered = 0

    def count(*_: Any) -> None:
        nonlocal registered
        registered += 1
        if registered > limit:
            raise _TooManyTensors

    hooks = [torch.nn.modules.module.register_module_parameter_registration_hook(count),
             torch.nn.modules.module.register_module_buffer_registration_hook(count)]
    try:
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in build().state_dict().items()}
    except _TooManyTensors:
        raise CheckpointReadError(
            f"{what}: its hyper-parameters and its weights disagree (they describe a network of more than {limit} "
            f"tensors, the file holds {len(found)}); the file is damaged or was edited"
        ) from None
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointReadError(f"{what}: its hyper-parameters do not describe a network ({error})") from None
    finally:
        for hook in hooks:
            hook.remove()
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} is {found[wrong[0]]} in the weights but {expected[wrong[0]]} in the network" if wrong
                  else f"missing weights {missing[:3]}" if missing else f"unexpected weights {unexpected[:3]}")
        raise CheckpointReadError(
            f"{what}: its hyper-parameters and its weights disagree ({detail}); the file is damaged or was edited"
        )


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
