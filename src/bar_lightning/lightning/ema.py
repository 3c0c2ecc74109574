"""Exponential moving average of a module's parameters, with the official warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(update: int, max_decay: float) -> float:
    """Decay used at the `update`-th update (1-based): 0 for the first two, then `(1 + s) / (10 + s)` capped.

    `s = update - 1`; this warm-up lets the average follow the fast early changes of a fresh model.
    """
    step = max(0, update - 1)
    if step <= 0:
        return 0.0
    return min((1 + step) / (10 + step), max_decay)


class EMA(nn.Module):
    """Holds an averaged copy of `model`; the copy and the update count are saved in the state dict.

    Frozen parameters (requires_grad False) are copied rather than averaged. Buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        self.num_updates += 1
        decay = ema_decay(int(self.num_updates), self.decay)
        averaged = dict(self.averaged.named_parameters())
        for name, parameter in model.named_parameters():
            target = averaged[name]
            if parameter.requires_grad:
                target.lerp_(parameter.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(parameter)
        averaged_buffers = dict(self.averaged.named_buffers())
        for name, buffer in model.named_buffers():
            if name in averaged_buffers:
                averaged_buffers[name].copy_(buffer)
        return decay
