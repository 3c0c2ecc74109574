"""The process group of the scripts that run outside Lightning under `torchrun` (evaluate.py, pretokenization).

Lightning joins and leaves its own process group; these scripts do it here, the same way everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator

import torch


def join_torchrun_process_group() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; with several processes, joins the default process group.

    On GPUs each process first takes the GPU of its `LOCAL_RANK` and binds NCCL to it: a collective then never
    guesses a device (two processes on one GPU make a barrier hang). The group is destroyed at exit, while the
    interpreter is still whole: a gloo or NCCL group left to interpreter shutdown can abort the process
    ("terminate called without an active exception") after its work is done.
    """
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend="nccl", device_id=device)
        else:
            torch.distributed.init_process_group(backend="gloo")
        atexit.register(leave_process_group)
    return rank, world_size


def leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def raise_on_every_rank(error: Exception | None, *, world_size: int) -> None:
    """Raise `error` (known on some ranks, None on the others) on every rank of a torchrun job.

    A check made on one rank that stops only that rank leaves the others waiting at their next collective; here
    every rank learns that one failed, and the others raise a short error pointing at its message.
    """
    if world_size > 1 and torch.distributed.is_initialized():
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl"
                  else torch.device("cpu"))
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        torch.distributed.all_reduce(failed)
        if error is None and failed.item() > 0:
            raise RuntimeError("stopped because another rank failed a check (see its message above)")
    if error is not None:
        raise error


@contextlib.contextmanager
def hold_output_folder(
    folder: str | os.PathLike, *, purpose: str, rank: int, world_size: int, recursive_cleanup: bool = False
) -> Iterator[None]:
    """The run lock of `folder` for a torchrun job: rank 0 takes it (and clears killed writers' temporary files,
    `recursive_cleanup` in sub-folders too), then every rank learns whether it did, so a refused job stops on all
    ranks instead of hanging at a collective.
    """
    from bar_lightning.io import remove_stale_temporaries
    from bar_lightning.run_lock import RunDirectoryLocked, run_lock

    with contextlib.ExitStack() as stack:
        refusal: RunDirectoryLocked | None = None
        if rank == 0:
            try:
                stack.enter_context(run_lock(folder, purpose=purpose, main_process=True))
                remove_stale_temporaries(folder, recursive=recursive_cleanup)
            except RunDirectoryLocked as error:
                refusal = error
        raise_on_every_rank(refusal, world_size=world_size)
        yield
