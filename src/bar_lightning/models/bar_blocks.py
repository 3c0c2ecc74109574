"""The transformer block of BAR's backbone: causal self-attention with QK RMSNorm and target-aware 2-D RoPE, a SwiGLU
MLP, adaLN-Zero modulation. Split in two halves around the attention so that the sampler can compile both halves of
a one-position decode step while the attention over the growing KV cache stays outside (`models/sampler.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bar_lightning.models.layers import RMSNorm, SwiGLU, apply_rope, modulate, swiglu_hidden_width

if TYPE_CHECKING:
    from bar_lightning.models.sampler import StaticKVCache


class RotaryRows(NamedTuple):
    """Cos/sin tables gathered for one forward, position-major like the projected heads: queries `[B, N, 2, 1, hd]`
    (own / target half of the heads), keys `[B, N, 1, hd]`."""

    q_cos: torch.Tensor
    q_sin: torch.Tensor
    k_cos: torch.Tensor
    k_sin: torch.Tensor


class Attention(nn.Module):
    """Causal self-attention with QK RMSNorm and target-aware 2-D RoPE (half of the query heads)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"hidden_size={width} must be divisible by num_heads={num_heads}")
        if num_heads % 2 != 0:
            raise ValueError(f"target-aware RoPE splits the query heads in two halves; num_heads={num_heads} is odd")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor, rope: RotaryRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values `[B, H, N, hd]`, normalised and rotated."""
        batch, length, _ = x.shape
        # Normalised and rotated position-major, `[B, N, H, hd]`, the projection's own layout, and only then viewed
        # head-major: the backward then stacks the three gradients straight into the projection's gradient
        # `[B, N, 3, H, hd]`, where a head-major stack needs a transposing copy of it in every layer's backward
        # (2.6% of the BAR-B training step on an H100, docs/benchmarks.md 5l). The arithmetic, element by element,
        # is unchanged.
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [B, N, H, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        # First half of the query heads rotate by their own location, second half by the location predicted next.
        q = apply_rope(q.unflatten(2, (2, self.num_heads // 2)), rope.q_cos, rope.q_sin).flatten(2, 3)
        k = apply_rope(k, rope.k_cos, rope.k_sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each [B, H, N, hd]

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """`[B, H, N, hd]` attention result -> `[B, N, D]` after the output projection."""
        batch, _, length, _ = attended.shape
        out = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        # As upstream, attention-probability dropout is not applied; only the output projection drops.
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (6 vectors per position)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden_width(width), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention_inputs(
        self, x: torch.Tensor, condition: torch.Tensor, rope: RotaryRows
    ) -> tuple[torch.Tensor, ...]:
        """First half of the block, up to attention: `(q, k, v, gate1, shift2, scale2, gate2)`.

        Split from `finish` so that the single-position decode step can run both halves compiled while the
        attention over a growing KV cache (a new length every step) stays outside the compiled code.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(condition).chunk(6, dim=-1)
        q, k, v = self.attn.project(modulate(self.norm1(x), shift1, scale1), rope)
        return q, k, v, gate1, shift2, scale2, gate2

    def finish(
        self,
        x: torch.Tensor,
        attended: torch.Tensor,
        gate1: torch.Tensor,
        shift2: torch.Tensor,
        scale2: torch.Tensor,
        gate2: torch.Tensor,
    ) -> torch.Tensor:
        """Second half: output projection, both residual branches and the MLP."""
        x = x + gate1 * self.attn.output(attended)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def forward(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        rope: RotaryRows,
        attn_mask: torch.Tensor | None,
        kv_cache: StaticKVCache | None = None,
        layer: int = 0,
        is_causal: bool = False,
    ) -> torch.Tensor:
        q, k, v, *modulation = self.attention_inputs(x, condition, rope)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)  # [B, H, cached + N, hd]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, N, hd]
        return self.finish(x, attended, *modulation)
