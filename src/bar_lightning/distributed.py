"""The process group of the scripts that run outside Lightning under `torchrun` (evaluate.py, pretokenization).

Lightning joins and leaves its own process group; these scripts do it here, the same way everywhere.
"""

from __future__ import annotations

import atexit
import os

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
