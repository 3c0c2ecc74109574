"""Masked Bit Modeling (MBM) head: predicts the bits of one AR step by iterative masked bit prediction.

Memory and compute grow with the number of bits per step, not with the codebook size `2^bits` (the point of the
paper's head versus a linear softmax over all codes, see `linear_head.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bar_lightning.models.layers import (
    AlignedSwiGLUWeights,
    GaussianFourierEmbedding,
    RMSNorm,
    SwiGLU,
    init_linear_and_embedding_,
    modulate,
    swiglu_hidden_width,
    zero_init_,
)

MASK_ID = 2  # bit values are 0 and 1; 2 marks a masked bit (the MBM mask id)
MASKED_BIT_WEIGHT = 1.0
VISIBLE_BIT_WEIGHT = 0.1
MASK_RATIO_LOGIT_STD = 0.8


def validate_tokens_allocation(tokens_allocation: Sequence[int], bits_per_step: int) -> list[int]:
    """Return `tokens_allocation` as a list of ints, or raise ValueError saying what is wrong and how to fix it."""
    allocation = [int(a) for a in tokens_allocation]
    if len(allocation) == 0:
        raise ValueError("tokens_allocation is empty; give the bits fixed per head iteration, e.g. [2, 2, 5, 7]")
    if any(a != b for a, b in zip(allocation, tokens_allocation)):
        raise ValueError(f"tokens_allocation={list(tokens_allocation)} must contain integers")
    if any(a <= 0 for a in allocation):
        raise ValueError(f"tokens_allocation={allocation} has a non-positive entry; every entry must be >= 1")
    if sum(allocation) != bits_per_step:
        raise ValueError(
            f"tokens_allocation={allocation} sums to {sum(allocation)} but each AR step has {bits_per_step} bits "
            f"(bits_per_token * patch_size^2); make the entries sum to {bits_per_step}"
        )
    if any(b < a for a, b in zip(allocation, allocation[1:])):
        raise ValueError(f"tokens_allocation={allocation} must be non-decreasing (e.g. [2, 2, 5, 7])")
    return allocation


def gumbel_noise(shape_like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise; the clamped logs keep it finite so that `0 * noise` is exactly 0."""
    uniform = torch.empty_like(shape_like).uniform_(0, 1, generator=generator)
    return -torch.log((-torch.log(uniform.clamp(min=1e-20))).clamp(min=1e-20))


class ResidualAdaLNBlock(nn.Module):
    """`x + gate * SwiGLU(modulate(RMS(x), shift, scale))` with `(shift, scale, gate)` from the condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden_width(width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor, aligned_mlp: AlignedSwiGLUWeights | None = None
    ) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale), aligned_mlp)


class FinalAdaLN(nn.Module):
    """RMSNorm followed by a 2-way adaLN modulation; the modulation output is ordered (scale, shift)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(condition).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class MaskBitModelingHead(nn.Module):
    """MBM head over `bits_per_step` bits, conditioned on a latent condition of width `width`.

    Args:
        bits_per_step: bits predicted per AR step (`bits_per_token * patch_size**2`).
        width: head width (2048 in the released models); also the width of the latent condition.
        num_layers: residual adaLN SwiGLU blocks (3 in the released models).
    """

    def __init__(self, *, bits_per_step: int, width: int = 2048, num_layers: int = 3) -> None:
        super().__init__()
        self.bits_per_step = bits_per_step
        self.width = width
        self.num_layers = num_layers
        bit_embed_width = -(-width // bits_per_step)  # ceil(width / bits): the concatenation covers `width`

        self.input_embed = nn.Embedding(3, bit_embed_width)  # rows: bit 0, bit 1, mask
        self.input_proj = nn.Linear(bits_per_step * bit_embed_width, width)
        self.ln_pre = RMSNorm(width)
        self.transformer = nn.ModuleList(ResidualAdaLNBlock(width) for _ in range(num_layers))
        self.output_embed = nn.Linear(width, 2 * bits_per_step)
        self.t_embedder = GaussianFourierEmbedding(width)
        self.adaln_before_head = FinalAdaLN(width)
        self.reset_parameters()

    max_bits_per_step = None

    @classmethod
    def build(cls, *, bits_per_step: int, width: int, num_layers: int) -> MaskBitModelingHead:
        return cls(bits_per_step=bits_per_step, width=width, num_layers=num_layers)

    def reset_parameters(self) -> None:
        self.apply(init_linear_and_embedding_)
        self.zero_init_modulations()

    def zero_init_modulations(self) -> None:
        """adaLN-Zero: every block starts as the identity."""
        for block in self.transformer:
            zero_init_(block.adaLN_modulation[-1])
        zero_init_(self.adaln_before_head.adaLN_modulation[-1])

    def init_non_persistent_buffers(self, device: torch.device) -> None:
        """No buffers outside the checkpoint."""

    @staticmethod
    def sampling_allocation(tokens_allocation: Sequence[int], bits_per_step: int) -> list[int]:
        """The allocation this head samples a step of `bits_per_step` bits with (`ValueError` naming the fix)."""
        return validate_tokens_allocation(tokens_allocation, bits_per_step)

    def check_tokens_allocation(self, tokens_allocation: Sequence[int]) -> list[int]:
        return self.sampling_allocation(tokens_allocation, self.bits_per_step)

    def decode_logits(self) -> Callable[..., torch.Tensor]:
        """`logits` compiled for the sampler's decode step (static shapes)."""
        return torch.compile(self.logits, dynamic=False)

    def aligned_mlp_weights(self) -> list[AlignedSwiGLUWeights] | None:
        """Padded MLP weights of every block for `logits(..., aligned_mlps=...)` (None if already aligned)."""
        weights = [block.mlp.aligned_weights() for block in self.transformer]
        return None if any(w is None for w in weights) else weights

    def logits(
        self,
        bit_ids: torch.Tensor,
        conditions: torch.Tensor,
        mask_ratio: torch.Tensor,
        aligned_mlps: list[AlignedSwiGLUWeights] | None = None,
    ) -> torch.Tensor:
        """Per-bit logits `[N, C, 2]` (index 0: bit = 0, index 1: bit = 1).

        Args:
            bit_ids: `[N, C]` values in {0, 1, 2}, 2 = masked.
            conditions: `[N, 1, W]` latent conditions from the backbone.
            mask_ratio: `[N]` fraction of masked bits, embedded with Fourier features.
            aligned_mlps: `aligned_mlp_weights()` (the GPU sampler computes them once per batch).
        """
        x = self.input_embed(bit_ids).flatten(1)  # [N, C * e]
        x = self.input_proj(x)  # [N, W]
        t_emb = self.t_embedder(mask_ratio).unsqueeze(1)  # [N, 1, W]
        condition = F.silu(t_emb + conditions).squeeze(1)  # [N, W]
        x = self.ln_pre(x)
        for index, block in enumerate(self.transformer):
            x = block(x, condition, None if aligned_mlps is None else aligned_mlps[index])
        x = self.adaln_before_head(x, condition)
        return self.output_embed(x).unflatten(-1, (self.bits_per_step, 2))  # [N, C, 2]

    def mask_bits(
        self, target_bits: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-time masking: ratio `1 - sigmoid(N(0, 0.8^2))` per row, at least one masked bit.

        Returns `(masked_ids [N, C], is_masked [N, C] bool, mask_ratio [N])`. The random draws (one randn, then one
        rand of `[N, C]`) follow the official order, so the same seed gives the same masks.
        """
        num_rows, bits = target_bits.shape
        device = target_bits.device
        z = torch.randn((num_rows,), device=device, generator=generator) * MASK_RATIO_LOGIT_STD
        mask_ratio = torch.clamp(1.0 - torch.sigmoid(z), min=1 / bits, max=1.0)
        num_masked = (bits * mask_ratio).round().clamp(min=1)
        ranks = torch.rand(num_rows, bits, device=device, generator=generator).argsort(dim=-1)
        is_masked = ranks < num_masked[:, None]
        masked_ids = torch.where(is_masked, torch.full_like(target_bits, MASK_ID), target_bits)
        return masked_ids, is_masked, mask_ratio

    @staticmethod
    def weighted_bit_loss(logits: torch.Tensor, target_bits: torch.Tensor, is_masked: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per bit in float32, weight 1.0 on masked and 0.1 on visible bits, normalised by the weights."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce = F.cross_entropy(logits.float().transpose(1, 2), target_bits, reduction="none")  # [N, C]
            is_masked = is_masked.to(ce.dtype)
            weights = (1.0 - is_masked) * VISIBLE_BIT_WEIGHT + is_masked * MASKED_BIT_WEIGHT
            return (ce * weights).sum() / (weights.sum() + 1e-8)

    def loss(
        self,
        target_bits: torch.Tensor,
        conditions: torch.Tensor,
        generator: torch.Generator | None = None,
        align_matmuls: bool = False,
    ) -> torch.Tensor:
        """Training loss for `target_bits [N, C]` given `conditions [N, 1, W]`.

        `align_matmuls` runs the MLPs on zero-padded copies of their weights (`aligned_mlp_weights`): the same
        function, with aligned matrix products on GPUs; the gradients flow back through the padding to the weights.
        """
        masked_ids, is_masked, mask_ratio = self.mask_bits(target_bits, generator)
        logits = self.logits(masked_ids, conditions, mask_ratio, self.aligned_mlp_weights() if align_matmuls else None)
        return self.weighted_bit_loss(logits, target_bits, is_masked)

    # The loss is the module's forward, so that an FSDP unit wrapping the head gathers its weights for it.
    forward = loss

    @torch.no_grad()
    def sample(
        self,
        conditions: torch.Tensor,
        *,
        guidance_scale: float | torch.Tensor = 1.0,
        temperature: float = 1.0,
        tokens_allocation: Sequence[int],
        use_cfg: bool = False,
        generator: torch.Generator | None = None,
        logits_fn: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Sample the bits of one AR step for each row, fixing `tokens_allocation[i]` bits at iteration i.

        Runs without host synchronisation (the re-mask count stays on the device), so it can be captured in a CUDA
        graph.

        Args:
            conditions: `[N, 1, W]`, or `[2N, 1, W]` with `use_cfg` (rows N..2N-1 unconditional).
            guidance_scale: logit-level CFG scale `s` in `uncond + s * (cond - uncond)` (used with `use_cfg`).
            temperature: Gumbel temperature T; iteration i uses `T * (1 - i / len(tokens_allocation))`.
            logits_fn: replacement for `self.logits` with the same arguments (its compiled version).
        Returns:
            `[N, C]` int64 bits in {0, 1}.
        """
        # Validated where the settings were made (the config, `SamplingSettings.checked`): trusted here.
        allocation = list(tokens_allocation)
        logits_fn = logits_fn or self.logits
        bits = self.bits_per_step
        num_iterations = len(allocation)
        batch = conditions.shape[0] // 2 if use_cfg else conditions.shape[0]
        device = conditions.device
        cumulative = [0]
        for count in allocation:
            cumulative.append(cumulative[-1] + count)

        ids = torch.full((batch, bits), MASK_ID, dtype=torch.long, device=device)
        for i in range(num_iterations):
            mask_ratio = 1.0 - cumulative[i] / bits
            step_temperature = temperature * (1.0 - i / num_iterations)
            mask_ratio_rows = torch.full(
                (conditions.shape[0],), mask_ratio, dtype=conditions.dtype, device=device
            )
            if use_cfg:
                cond_logits, uncond_logits = logits_fn(
                    torch.cat([ids, ids], dim=0), conditions, mask_ratio_rows
                ).split(batch, dim=0)
                logits = uncond_logits + guidance_scale * (cond_logits - uncond_logits)  # [N, C, 2]
            else:
                logits = logits_fn(ids, conditions, mask_ratio_rows)

            chosen = (logits + step_temperature * gumbel_noise(logits, generator)).argmax(dim=-1)  # [N, C]
            chosen_logit = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # [N, C]
            is_masked = ids == MASK_ID
            chosen = torch.where(is_masked, chosen, ids)
            if i == num_iterations - 1:
                ids = chosen
                break
            # MaskGIT-style re-masking: keep the most confident new bits, fixed bits are never re-masked.
            confidence = torch.where(is_masked, chosen_logit, torch.inf).float()
            confidence = confidence + step_temperature * gumbel_noise(confidence, generator)
            # Python's round() is round-half-even, like the official np.round.
            num_to_mask = round(bits * (1.0 - cumulative[i + 1] / bits))
            # As upstream, the count is clipped with the masked count of row 0 (all rows have the same count):
            # max(1, min(masked_in_row_0 - 1, num_to_mask)), kept on the device to avoid a host sync.
            still_masked = is_masked[:1].sum(dim=-1, keepdim=True)  # [1, 1]
            count = (still_masked - 1).clamp(max=num_to_mask).clamp(min=1)  # [1, 1]
            cut_off = confidence.sort(dim=-1).values.gather(-1, (count - 1).expand(batch, 1))  # [N, 1]
            ids = torch.where(confidence <= cut_off, torch.full_like(chosen, MASK_ID), chosen)
        return ids
