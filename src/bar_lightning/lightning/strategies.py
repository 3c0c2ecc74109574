"""Helpers for Lightning's distributed strategies, referenced from conf/trainer/*.yaml and run.py."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from bar_lightning.models.bar_blocks import Block
from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MaskBitModelingHead

# Under DDP every parameter that needs a gradient must receive one in every backward pass, unless DDP is told to
# look for unused ones. The tokenizer's G steps leave the discriminator without gradients and its D steps leave
# the autoencoder without them, so it needs the search (one graph traversal per step); the generator does not.
TOKENIZER_DDP_STRATEGY = "ddp_find_unused_parameters_true"


def automatic_compile_mode(strategy: Any, cuda_graphs_allowed: bool = True) -> str:
    """The torch.compile mode that `training.compile_mode: null` resolves to under `strategy`: CUDA graphs
    ("reduce-overhead") on one device, where they are measured and tested; "default" under a multi-process strategy
    (DDP's gradient hooks around replayed backward graphs are neither), or where the caller rules graphs out."""
    return "reduce-overhead" if cuda_graphs_allowed and isinstance(strategy, SingleDeviceStrategy) else "default"


def generator_block_wrap_policy() -> set[type[nn.Module]]:
    """FSDP units of the generator: each transformer block, and the head as one unit."""
    return {Block, MaskBitModelingHead, LinearSoftmaxHead}


def strategy_for_task(strategy: Any, task: str) -> Any:
    """The Lightning strategy a `task` runs with when the config asks for `strategy`.

    `trainer=ddp` means plain `"ddp"`; for the tokenizer (G and D steps alternate, each training part of the
    parameters) that becomes `"ddp_find_unused_parameters_true"`. Anything else is returned unchanged.
    """
    if task == "tokenizer" and strategy == "ddp":
        return TOKENIZER_DDP_STRATEGY
    return strategy
