"""The global random streams (torch CPU and CUDA, numpy, Python) saved in every checkpoint and restored on resume.

Lightning restores weights, optimisers, schedulers and loop counters but not the random streams, so a resumed run
would draw different masks, orders and dropout than the run it continues. `RandomStateCheckpoint` stores the streams
when a checkpoint is written (at a step boundary) and puts them back just before the first training step after a
resume, so everything that happens in between (data loader start-up, a skipped validation, sanity checks) cannot
shift them. The data loaders of this package draw no global random numbers (their orders come from per-epoch
generators, see `ResumableDataLoader`), so the stream at each step depends only on the steps before it.

Under DDP the checkpoint holds rank 0's streams and every rank restores them; the ranks start from the same seed
and draw the same amounts, so their streams are equal in an uninterrupted run too.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_random_state() -> dict[str, Any]:
    """The current torch / CUDA / numpy / Python random states, as tensors and plain types (`weights_only`-safe)."""
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_cached_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": numpy_kind,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": int(numpy_position),
            "has_gauss": int(numpy_has_gauss),
            "cached_gauss": float(numpy_cached_gauss),
        },
        "python": {"version": python_version, "internal": list(python_internal), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_random_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gauss"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise RuntimeError(
                f"the checkpoint holds CUDA random states of {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}; resume with the same number of visible GPUs per process"
            )
        torch.cuda.set_rng_state_all(cuda_states)


class RandomStateCheckpoint(L.Callback):
    """Saves the global random states in each checkpoint; restores them before the first step of a resumed fit."""

    def __init__(self) -> None:
        self._state_to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state_to_restore = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._state_to_restore is not None:
            restore_random_state(self._state_to_restore)
            self._state_to_restore = None
