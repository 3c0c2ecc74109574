"""Exponential moving average of a module's parameters, with the official warm-up of the decay."""

from __future__ import annotations

import copy
from typing import Any

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

    Only trainable parameters are copied: the averaged model *shares* the frozen parameters (requires_grad False)
    of `model`, which never change while training, so a large frozen branch (the tokenizer's 400M-parameter SigLIP2
    half, 1.6 GB in float32) is held once, not twice, and never copied. The state dict still names every weight of
    the averaged model (`averaged.*`, loadable as a whole model); a shared tensor is stored once by torch.save.
    Trainable parameters are averaged in one multi-tensor `lerp` per update (one kernel launch per few hundred
    tensors instead of one per tensor); buffers are copied.

    The update count lives in the `num_updates` buffer (saved, on the model's device) and, for the decay's warm-up,
    in a host copy read from the buffer once, at the first update after construction or a load: reading a CUDA
    buffer at every update would make each training step wait for the device.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, frozen_copy_interval: int = 1000) -> None:
        super().__init__()
        self.decay = decay
        self.frozen_copy_interval = frozen_copy_interval
        # deepcopy's memo maps each frozen parameter to itself: the copy refers to the live tensors.
        shared = {id(parameter): parameter for parameter in model.parameters() if not parameter.requires_grad}
        self.averaged = copy.deepcopy(model, shared).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_num_updates: int | None = None  # None: read from the buffer at the next update

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A loaded count replaces the host copy, read again at the next update.
        self._host_num_updates = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        if self._host_num_updates is None:
            self._host_num_updates = int(self.num_updates)  # the one host read, after construction or a load
        self._host_num_updates += 1
        updates = self._host_num_updates
        self.num_updates.fill_(updates)  # a kernel on the device; no wait
        decay = ema_decay(updates, self.decay)
        averaged = dict(self.averaged.named_parameters())
        targets, sources = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                targets.append(averaged[name])
                sources.append(parameter.detach().to(averaged[name].dtype))
        if targets:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
        averaged_buffers = dict(self.averaged.named_buffers())
        for name, buffer in model.named_buffers():
            if name in averaged_buffers:
                averaged_buffers[name].copy_(buffer)
        if updates == 1 or updates % self.frozen_copy_interval == 0:
            self.copy_frozen_from(model)
        return decay

    @torch.no_grad()
    def copy_frozen_from(self, model: nn.Module) -> None:
        """Copy the frozen parameters of `model` into the averaged copy where they are not shared with it (a
        model other than the one the EMA was made from, or sharing undone by a strategy's parameter copies)."""
        averaged = dict(self.averaged.named_parameters(remove_duplicate=False))
        for name, parameter in model.named_parameters():
            target = averaged[name]
            if not parameter.requires_grad and target.data_ptr() != parameter.data_ptr():
                target.copy_(parameter)
