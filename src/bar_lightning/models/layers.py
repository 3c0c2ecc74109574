"""Building blocks shared by the BAR backbone and its heads.

Every numerical convention here (RMSNorm in float32, `x * (1 + scale) + shift`, SwiGLU split order, RoPE pair
layout) follows the official code bit for bit; `tests/test_parity_generator.py` checks them against golden tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMS normalisation with a learned weight and no bias, always computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        # Autocast must not lower the precision of the statistics; do the whole op in float32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * self.weight.float()).to(input_dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; the `1 + scale` form keeps a zero-initialised modulation an identity."""
    return x * (1 + scale) + shift


def swiglu_hidden_width(width: int) -> int:
    """Hidden width of the SwiGLU MLP: two thirds of a 4x MLP, truncated as upstream does."""
    return int(2 / 3 * int(width * 4.0))


class SwiGLU(nn.Module):
    """`w3(SiLU(a) * b)` with `(a, b)` the two halves of one fused projection `w12`."""

    def __init__(self, width: int, hidden_width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden_width)
        self.w3 = nn.Linear(hidden_width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, aligned: AlignedSwiGLUWeights | None = None) -> torch.Tensor:
        if aligned is not None:
            gate, value = F.linear(x, aligned.w12, aligned.b12).chunk(2, dim=-1)
            return F.linear(self.drop(F.silu(gate) * value), aligned.w3, self.w3.bias)
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(gate) * value))

    def aligned_weights(self, multiple: int = 8) -> AlignedSwiGLUWeights | None:
        """Copies of the weights with the hidden width zero-padded to a multiple of `multiple`, or None if aligned.

        An odd hidden width (5461 in the MBM head) makes every row of the hidden activations start at an unaligned
        address, so cuBLAS falls back to slow unaligned kernels. The padded gate/value rows are zero, SiLU(0) * 0 = 0,
        and the padded columns of w3 are zero: the same function, computed with aligned matrix products.
        """
        hidden = self.w3.in_features
        pad = (-hidden) % multiple
        if pad == 0:
            return None
        gate_weight, value_weight = self.w12.weight.chunk(2, dim=0)  # [hidden, width] each
        gate_bias, value_bias = self.w12.bias.chunk(2, dim=0)
        return AlignedSwiGLUWeights(
            w12=torch.cat([F.pad(gate_weight, (0, 0, 0, pad)), F.pad(value_weight, (0, 0, 0, pad))]),
            b12=torch.cat([F.pad(gate_bias, (0, pad)), F.pad(value_bias, (0, pad))]),
            w3=F.pad(self.w3.weight, (0, pad)),
        )


class AlignedSwiGLUWeights(NamedTuple):
    w12: torch.Tensor  # [2 * padded hidden, width]
    b12: torch.Tensor  # [2 * padded hidden]
    w3: torch.Tensor  # [width, padded hidden]


def rope_2d_tables(
    head_dim: int, grid_side: int, num_prefix: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables `[num_prefix + grid_side**2, head_dim]` of the 2-D rotary embedding.

    The first `num_prefix` rows are identity rotations (class prefix). Cell `(h, w)` of the AR-step grid gets the
    angles `[h * f, w * f]`, each frequency `f_k = theta^(-2k/d)` (d = head_dim / 2) repeated for the two channels
    of a rotation pair.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))
    # `i / S * S` rather than `i`: the official table is built this way, and for grids that are not powers of two
    # it differs from `i` in the last float32 bit.
    positions = torch.arange(grid_side).float() / grid_side * grid_side
    axis_angles = torch.einsum("p,f->pf", positions, freqs).repeat_interleave(2, dim=-1)  # [S, d]
    rows = axis_angles[:, None, :].expand(grid_side, grid_side, axis_dim)
    cols = axis_angles[None, :, :].expand(grid_side, grid_side, axis_dim)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_side * grid_side, head_dim)  # [S*S, head_dim]
    cos = torch.cat([torch.ones(num_prefix, head_dim), angles.cos()], dim=0)
    sin = torch.cat([torch.zeros(num_prefix, head_dim), angles.sin()], dim=0)
    return cos, sin


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """`(x0, x1) -> (-x1, x0)` for every adjacent channel pair `(2i, 2i+1)`."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [..., hd]` with per-position tables broadcastable to it; float32 like upstream."""
    input_dtype = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        return (x * cos + rotate_pairs(x) * sin).to(input_dtype)


class GaussianFourierEmbedding(nn.Module):
    """Embeds a scalar in [0, 1] (the MBM mask ratio) with fixed random Fourier features and a 2-layer MLP.

    The 256 frequencies `W` are fixed at construction and stored in the state dict (as upstream does), so a loaded
    model must read them from its checkpoint: they are not reproducible from a seed.
    """

    def __init__(self, width: int, num_frequencies: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(num_frequencies) * scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W[None, :] * 2 * math.pi  # [N, F]
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))  # [N, width]


def init_linear_and_embedding_(module: nn.Module, std: float = 0.02) -> None:
    """Upstream initialisation: truncated normal(0.02) for Linear/Embedding weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, RMSNorm | nn.LayerNorm):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def zero_init_(linear: nn.Linear) -> None:
    """adaLN-Zero: a zero modulation makes each residual branch start as the identity."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
