"""Binary finite scalar quantisation (FSQ with two levels per channel), as used by the BAR-FSQ tokenizer.

Each of the `bits_per_token` channels of `in_proj(x)` is squashed by a shifted tanh into (-1.0005, 0.0005) and
rounded to -1 or 0, i.e. a code of -1 or +1 (bit 0 or 1). The shift puts the decision threshold at
`z = -atanh(0.5 / 0.5005) = -3.8007`, not at zero. The constants are computed in float32 exactly as the official
code does: values within ~1e-5 of the threshold would otherwise round to the other bit.

Bits are never packed into an integer code: a token is a vector of `bits_per_token` independent 0/1 values.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (levels - 1) * (1 + eps) / 2 with levels = 2, eps = 1e-3, evaluated in float32 like the reference (0.5005).
_HALF_RANGE = torch.tensor(1.0, dtype=torch.float32, device="cpu") * (1 + 1e-3) / 2
# With an even number of levels the bounded range is offset by 1/2 so that rounding lands on integers; `shift`
# then places the rounding tie (bounded value -1/2) at z = -shift instead of z = 0.
_LEVEL_OFFSET = torch.tensor(0.5, dtype=torch.float32, device="cpu")
_SHIFT = (_LEVEL_OFFSET / _HALF_RANGE).atanh()


class BinaryFSQ(nn.Module):
    """Projection -> binary FSQ -> projection.

    Args:
        in_channels: width of the features to quantise (encoder width).
        out_channels: width of the dequantised features (decoder width).
        bits_per_token: number of binary channels per token (the tokenizer's `token_size`).
    """

    # Python floats holding float32 values exactly; adding them to a float32 tensor is the same operation as adding
    # the float32 tensors of the reference implementation.
    half_range: float = float(_HALF_RANGE)
    level_offset: float = float(_LEVEL_OFFSET)
    shift: float = float(_SHIFT)

    def __init__(self, in_channels: int, out_channels: int, bits_per_token: int) -> None:
        super().__init__()
        if bits_per_token < 1:
            raise ValueError(f"bits_per_token must be >= 1, got {bits_per_token}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.bits_per_token = bits_per_token
        self.in_proj = nn.Linear(in_channels, bits_per_token)
        self.out_proj = nn.Linear(bits_per_token, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # The official tokenizer leaves both projections at PyTorch's default Linear initialisation (its own init
        # pass runs before the quantiser exists); keep that so training starts from the same distribution.
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()

    @property
    def threshold(self) -> float:
        """Projected value at which a channel flips from bit 0 (below) to bit 1 (above)."""
        return -self.shift

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`in_proj` in float32 (the quantiser never runs under autocast): `[..., in] -> [..., bits]`."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.in_proj(x.float())

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash projected values into (-1.0005, 0.0005); -0.5 (the rounding tie) sits at z = threshold."""
        return torch.tanh(z + self.shift) * self.half_range - self.level_offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Projected values -> codes in {-1, +1} with a straight-through gradient (the gradient of `bound`)."""
        bounded = self.bound(z)
        # torch.round is round-half-to-even: a bounded value of exactly -0.5 becomes -0, i.e. code +1.
        rounded = torch.round(bounded)
        # Forward value: exactly `rounded` (both subtractions are exact in float32 for these ranges).
        levels = bounded + (rounded - bounded).detach()  # in {-1, 0}
        return levels * 2 + 1

    @staticmethod
    def codes_to_bits(codes: torch.Tensor) -> torch.Tensor:
        """Codes {-1, +1} -> bits {0, 1} as int64."""
        return torch.round((codes + 1) / 2).to(torch.int64).clamp_(0, 1)

    def to_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Features `[..., in_channels]` -> bits `[..., bits_per_token]` (int64, 0 or 1)."""
        self._check_features(x)
        with torch.no_grad():
            return self.codes_to_bits(self.quantize(self.project(x)))

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits `[..., bits_per_token]` in {0, 1} -> dequantised features `out_proj(2 * bits - 1)` `[..., out]`."""
        if bits.shape[-1] != self.bits_per_token:
            raise ValueError(
                f"bits must end in a dimension of {self.bits_per_token} (bits per token), got shape {tuple(bits.shape)}"
            )
        if bits.is_floating_point() or bits.is_complex():
            raise ValueError(f"bits must be an integer or bool tensor of 0/1 values, got dtype {bits.dtype}")
        invalid = (bits != 0) & (bits != 1)
        if bool(invalid.any()):
            raise ValueError(
                f"bits must be 0 or 1, found the value {int(bits[invalid][0])} "
                "(packed codes and mask ids are not accepted)"
            )
        codes = bits.to(self.out_proj.weight.dtype) * 2 - 1
        return self.out_proj(codes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features `[..., in_channels]` -> (`out_proj(codes)` `[..., out_channels]`, bits `[..., bits_per_token]`).

        The first output carries straight-through gradients to `in_proj` and the input.
        """
        self._check_features(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            codes = self.quantize(self.project(x))
            quantized = self.out_proj(codes)
        return quantized, self.codes_to_bits(codes.detach())

    def _check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"features must end in a dimension of {self.in_channels} (in_channels), got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"bits_per_token={self.bits_per_token}, threshold={self.threshold:.7f}"
