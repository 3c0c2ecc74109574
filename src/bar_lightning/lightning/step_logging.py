"""Logging host numbers from a training step without stalling it.

Lightning's `self.log` turns a Python number into a device tensor with `torch.tensor(value, device=...)`: a blocking
host-to-device copy, which on CUDA waits for every kernel queued so far (`cudaStreamSynchronize`). One such number
per step (the learning rate, a counter) stops the host from queueing the next step while the device runs this
one, so the device idles for the host's loop between steps. `torch.full` writes the number with a kernel instead:
queued like any other, no wait.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def device_number(value: float | int | bool, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor holding `value` on `device`, written by a kernel (no blocking host-to-device copy)."""
    return torch.full((), float(value), dtype=torch.float32, device=device)


def log_number(module: L.LightningModule, name: str, value: float | int | bool, **kwargs: Any) -> None:
    """`module.log(name, value, **kwargs)` for a host number, without the stream synchronisation Lightning's own
    conversion costs on a GPU."""
    module.log(name, device_number(value, module.device), **kwargs)
