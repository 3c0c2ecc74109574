"""The global random streams (torch CPU and CUDA, numpy, Python) saved in every checkpoint and restored on resume.

Lightning restores weights, optimisers, schedulers and loop counters but not the random streams, so a resumed run
would draw different masks, orders and dropout than the run it continues. `RandomStateCheckpoint` stores the streams
when a checkpoint is written (at a step boundary) and puts them back just before the first training step after a
resume, so everything that happens in between (data loader start-up, a skipped validation, sanity checks) cannot
shift them. The data loaders of this package draw no global random numbers (their orders come from per-epoch
generators, see `ResumableDataLoader`), so the stream at each step depends only on the steps before it.

Per-rank streams. Every process seeds with `seed` before the model is built, so all ranks build identical weights.
When fitting starts with more than one process, rank `r` re-seeds the global streams with `rank_seed(seed, r)`:
ranks train on different data and must not also draw identical masks, orders and class dropout for it (with one
seed, a global batch of W x B samples would carry only B distinct random patterns). A one-process run is not
re-seeded. The weights stay identical on all ranks: DDP averages the gradients, so every rank takes the same step.
Checkpoints hold the streams of every rank (gathered when the checkpoint is written) and each rank restores its
own; a run resumed with a different number of processes cannot continue the old streams, so each rank then
re-seeds with `rank_seed(seed, r, global_step)` (logged as a warning).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s global random streams: a 32-bit hash of `(seed, rank, step)`.

    A hash rather than `seed + rank`, so that rank 1 of seed 42 is not rank 0 of seed 43.
    """
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint32)[0])


def seed_global_streams(seed: int) -> None:
    """Seed the torch (CPU and CUDA), numpy and Python streams of this process.

    Not `lightning.seed_everything`: that also sets `PL_GLOBAL_SEED`, which Lightning uses to seed the
    `DistributedSampler`; it must stay equal on all ranks, or the ranks shuffle differently and their shares of the
    data overlap.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
    """Per-rank global random streams: seeded per rank when fitting starts, saved in each checkpoint for every rank,
    restored (each rank its own) before the first step of a resumed fit.

    Checkpoint format: `{"ranks": [state of rank 0, state of rank 1, ...]}`; a checkpoint written before per-rank
    streams holds one state, which every rank restores.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._state_to_restore: dict[str, Any] | None = None
        self._reseed_at_step = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            seed_global_streams(rank_seed(self.seed, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is written (Trainer.save_checkpoint is collective), so the gather
        # below is entered by all ranks together; only rank 0's copy is written to disk.
        state = capture_random_state()
        rank, world_size = _distributed_rank_and_size()
        if world_size == 1:
            return {"ranks": [state]}
        states: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" not in state_dict:  # written before per-rank streams: one state for all ranks
            self._state_to_restore = state_dict
            return
        states = state_dict["ranks"]
        rank, world_size = _distributed_rank_and_size()
        if len(states) == world_size:
            self._state_to_restore = states[rank]
            return
        log.warning(
            "the checkpoint holds the random streams of %d processes, this run has %d: the data and weights resume "
            "exactly, but each rank draws new random streams (seeded from the seed, its rank and the global step)",
            len(states), world_size,
        )
        self._reseed_at_step = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._state_to_restore is not None:
            restore_random_state(self._state_to_restore)
            self._state_to_restore = None
        elif self._reseed_at_step:
            seed_global_streams(rank_seed(self.seed, trainer.global_rank, trainer.global_step))
            self._reseed_at_step = False
