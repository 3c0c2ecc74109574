"""Reading checkpoint files safely, with no Lightning involved: `torch.load(weights_only=True)` (no code in the file
runs), the kind of a checkpoint (generator, tokenizer, bare weights) and whether its weights fit its hyper-parameters.
The Trainer's checkpoint plugin and the resume logic (`lightning/checkpointing.py`) build on this; config
validation and the model loaders use it directly.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

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
