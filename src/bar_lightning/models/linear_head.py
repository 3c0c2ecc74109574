"""The paper's baseline head: one linear softmax over all `2^bits` codes of an AR step.

Same interface as `MaskBitModelingHead` so the backbone can switch heads by config. Its output layer has
`width * 2^bits` weights and its logits `N * 2^bits` values: this is the O(C) memory the MBM head avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bar_lightning.models.layers import RMSNorm, init_linear_and_embedding_
from bar_lightning.models.mbm_head import gumbel_noise

MAX_LINEAR_HEAD_BITS = 24  # 2^24 classes; beyond that the output layer alone no longer fits on one GPU


class LinearSoftmaxHead(nn.Module):
    """Predicts the code of an AR step (its bits read as a little-endian integer) with one softmax.

    Args:
        bits_per_step: bits per AR step C; the softmax has `2^C` classes.
        width: width of the latent condition from the backbone.
    """

    def __init__(self, *, bits_per_step: int, width: int) -> None:
        super().__init__()
        if not 1 <= bits_per_step <= MAX_LINEAR_HEAD_BITS:
            raise ValueError(
                f"the linear head needs 1 <= bits_per_step <= {MAX_LINEAR_HEAD_BITS} (2^bits classes), got "
                f"bits_per_step={bits_per_step}; use head=mbm for larger steps"
            )
        self.bits_per_step = bits_per_step
        self.width = width
        self.norm = RMSNorm(width)
        self.output = nn.Linear(width, 2**bits_per_step)
        self.register_buffer("bit_weights", 2 ** torch.arange(bits_per_step), persistent=False)
        self.reset_parameters()

    max_bits_per_step = MAX_LINEAR_HEAD_BITS

    @classmethod
    def build(cls, *, bits_per_step: int, width: int, num_layers: int) -> LinearSoftmaxHead:
        """The head of a generator's settings (`num_layers` is the MBM head's and does not apply here)."""
        return cls(bits_per_step=bits_per_step, width=width)

    def reset_parameters(self) -> None:
        self.apply(init_linear_and_embedding_)

    def init_non_persistent_buffers(self, device: torch.device) -> None:
        self.bit_weights = 2 ** torch.arange(self.bits_per_step, device=device)

    def zero_init_modulations(self) -> None:
        """No adaLN modulation in this head."""

    @staticmethod
    def sampling_allocation(tokens_allocation: Sequence[int], bits_per_step: int) -> list[int]:
        """All bits of a step are sampled at once: whatever allocation is asked for, it is `[bits_per_step]`."""
        return [bits_per_step]

    def check_tokens_allocation(self, tokens_allocation: Sequence[int]) -> list[int]:
        return self.sampling_allocation(tokens_allocation, self.bits_per_step)

    def decode_logits(self) -> None:
        """The decode step calls `logits` as it is (one small matrix product)."""
        return None

    def aligned_mlp_weights(self) -> None:
        return None

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return (bits * self.bit_weights).sum(-1)  # [N]

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes[:, None] // self.bit_weights) % 2  # [N, C]

    def logits(self, conditions: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(conditions.squeeze(1)))  # [N, 2^C]

    def loss(
        self, target_bits: torch.Tensor, conditions: torch.Tensor, generator: torch.Generator | None = None,
        align_matmuls: bool = False,
    ) -> torch.Tensor:
        """Cross-entropy of the step's code; `align_matmuls` is the MBM head's and does not apply here."""
        logits = self.logits(conditions)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return F.cross_entropy(logits.float(), self.bits_to_codes(target_bits))

    # The loss is the module's forward, so that an FSDP unit wrapping the head gathers its weights for it.
    forward = loss

    @torch.no_grad()
    def sample(
        self,
        conditions: torch.Tensor,
        *,
        guidance_scale: float | torch.Tensor = 1.0,
        temperature: float = 1.0,
        tokens_allocation: Sequence[int] | None = None,
        use_cfg: bool = False,
        generator: torch.Generator | None = None,
        logits_fn: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One-shot sampling of all bits; `tokens_allocation` does not apply to this head and is ignored.

        `logits_fn` replaces `self.logits` (the generator passes its compiled version, if any).
        """
        logits = (logits_fn or self.logits)(conditions).float()
        if use_cfg:
            cond_logits, uncond_logits = logits.chunk(2, dim=0)
            logits = uncond_logits + guidance_scale * (cond_logits - uncond_logits)
        codes = (logits + temperature * gumbel_noise(logits, generator)).argmax(dim=-1)  # [N]
        return self.codes_to_bits(codes)
