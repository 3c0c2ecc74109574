"""Helpers for Lightning's distributed strategies, referenced from conf/trainer/*.yaml."""

from __future__ import annotations

from torch import nn

from bar_lightning.models.bar import Block
from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MaskBitModelingHead


def generator_block_wrap_policy() -> set[type[nn.Module]]:
    """FSDP units of the generator: each transformer block, and the head as one unit."""
    return {Block, MaskBitModelingHead, LinearSoftmaxHead}
