"""What the training steps of both modules share: the learning-rate and generation-order schedules, the official
no-weight-decay rule and parameter groups, the fused-AdamW rule and global-norm gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch


def random_order_ratio(step: int, anneal_start: int, anneal_end: int) -> float:
    """Probability of a random generation order at `step`: 1 before the anneal window, 0 after, linear inside.

    A window with negative bounds (e.g. -1, -1) means raster-only training.
    """
    if step < anneal_start:
        return 1.0
    if step > anneal_end or anneal_end == anneal_start:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, base_lr: float, end_lr: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then half a cosine down to `end_lr / base_lr`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return (end_lr + (base_lr - end_lr) * cosine) / base_lr


def upstream_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """The official script's rule: no weight decay for 1-D tensors, biases and names with norm/ln/embed.

    The test is on the lower-cased name, so every `adaLN_modulation` weight (it contains "ln") is excluded too.
    """
    lowered = name.lower()
    return parameter.ndim < 2 or "bias" in name or "norm" in lowered or "ln" in lowered or "embed" in lowered


def fused_adamw_wanted(module: L.LightningModule, setting: bool | None) -> bool:
    """`optim.fused`, with None resolved: fused AdamW on CUDA, except under 16-mixed precision (fused AdamW unscales
    fp16 gradients itself, so clipping could not run between unscale and step)."""
    if setting is not None:
        return bool(setting)
    precision = str(module.trainer.precision) if module._trainer is not None else ""
    return module.device.type == "cuda" and precision != "16-mixed"


def clip_gradient_norm(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float
) -> torch.Tensor | None:
    """Clip the global gradient norm of `optimizer`'s parameters ourselves: Lightning refuses to clip for a fused
    AdamW under bf16 autocast (it assumes the optimiser unscales fp16 gradients) and for FSDP; FSDP computes the norm
    over all shards. Under 16-mixed Lightning's own clipping unscales first.

    Returns the global L2 norm of the gradients before clipping, the one the clipping computed (a device tensor, no
    host read), or None under 16-mixed, where Lightning's clipping does not return it.
    """
    if str(module.trainer.precision) == "16-mixed":
        module.clip_gradients(optimizer, max_norm, "norm")
        return None
    model = module.trainer.model
    if hasattr(model, "clip_grad_norm_"):  # FullyShardedDataParallel
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


def parameter_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, rule: str
) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        (no_decay if rule == "upstream" and upstream_no_decay(name, parameter) else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
