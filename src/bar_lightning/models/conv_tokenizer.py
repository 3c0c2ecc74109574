"""A small convolutional binary-FSQ tokenizer for small images and CPU runs (demo, tests).

Same interface and bit layout as `BarFSQTokenizer` (flat bits token-major, raster tokens), so the generator,
pretokenization and evaluation code paths are shared. The decode path (`quantize.out_proj` + `decoder`) needs no
encoder weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bar_lightning.models.fsq import BinaryFSQ
from bar_lightning.models.tokenizer import TokenizerOutput


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) if channels >= 8 else 1, num_channels=channels, eps=1e-6)


class ResidualConvBlock(nn.Module):
    """`x + conv(SiLU(GN(conv(SiLU(GN(x))))))`, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class ConvEncoder(nn.Module):
    """Images `[B, C, H, W]` -> features `[B, (H/f)*(W/f), width]`, f = patch_size * 2^(len(channel_multipliers) - 1)."""

    def __init__(self, *, in_channels: int, base_channels: int, channel_multipliers: tuple[int, ...],
                 blocks_per_level: int, width: int, patch_size: int = 1) -> None:
        super().__init__()
        # A patchifying stem (kernel = stride = patch_size) keeps every later conv at low resolution: cheap on CPU.
        self.conv_in = (
            nn.Conv2d(in_channels, base_channels, 3, padding=1) if patch_size == 1
            else nn.Conv2d(in_channels, base_channels, patch_size, stride=patch_size)
        )
        levels: list[nn.Module] = []
        channels = base_channels
        for level, multiplier in enumerate(channel_multipliers):
            out_channels = base_channels * multiplier
            blocks: list[nn.Module] = []
            for _ in range(blocks_per_level):
                blocks.append(ResidualConvBlock(channels, out_channels))
                channels = out_channels
            if level < len(channel_multipliers) - 1:
                blocks.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))  # halve the resolution
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.levels(self.conv_in(images))  # [B, c, h, w]
        x = self.conv_out(F.silu(self.norm_out(x)))  # [B, width, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, h*w, width], raster token order


class ConvDecoder(nn.Module):
    """Features `[B, h*w, width]` -> images `[B, C, h*f, w*f]` in the [-1, 1] scale (not clamped)."""

    def __init__(self, *, out_channels: int, base_channels: int, channel_multipliers: tuple[int, ...],
                 blocks_per_level: int, width: int, grid_size: int, patch_size: int = 1) -> None:
        super().__init__()
        self.grid_size = grid_size
        channels = base_channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(width, channels, 3, padding=1)
        levels: list[nn.Module] = []
        for level, multiplier in reversed(list(enumerate(channel_multipliers))):
            level_channels = base_channels * multiplier
            blocks: list[nn.Module] = []
            for _ in range(blocks_per_level):
                blocks.append(ResidualConvBlock(channels, level_channels))
                channels = level_channels
            if level > 0:
                blocks.extend([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)])
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = _group_norm(channels)
        # Patch stem mirrored: a 1x1 conv to p*p*C values per position and a pixel shuffle, then a 3x3 conv to
        # smooth patch seams (the BAR-FSQ decoder's head has the same shape).
        # At full resolution only a few channels are kept (channels // 4): the 32x32 maps dominate the CPU cost.
        pixel_channels = channels if patch_size == 1 else max(8, channels // 4)
        self.to_pixels = (
            nn.Sequential(nn.Conv2d(channels, pixel_channels * patch_size**2, 1), nn.PixelShuffle(patch_size))
            if patch_size > 1 else nn.Identity()
        )
        self.conv_out = nn.Conv2d(pixel_channels, out_channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = features.shape
        x = features.transpose(1, 2).reshape(batch, width, self.grid_size, self.grid_size)  # [B, width, h, w]
        x = self.levels(self.conv_in(x))
        x = self.to_pixels(F.silu(self.norm_out(x)))  # [B, c, H, W]
        return self.conv_out(x)  # [B, C, H, W]


class ConvFSQTokenizer(nn.Module):
    """Convolutional encoder -> binary FSQ -> convolutional decoder.

    Args:
        image_size: side of the square input images.
        in_channels: image channels (3; grey images are converted to RGB by the data pipeline).
        bits_per_token: FSQ channels (bits) per token.
        base_channels, channel_multipliers, blocks_per_level: convolution widths; the token grid is
            `image_size / (patch_size * 2^(len(channel_multipliers) - 1))` on a side.
        patch_size: side of the patchifying stem (1 = a 3x3 stem at full resolution).
        encoder_width, decoder_width: widths around the quantiser (`in_proj: encoder_width -> bits`,
            `out_proj: bits -> decoder_width`).
        build_encoder: False builds a decode-only tokenizer.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        bits_per_token: int = 12,
        base_channels: int = 64,
        channel_multipliers: tuple[int, ...] | list[int] = (1, 2, 2),
        blocks_per_level: int = 1,
        encoder_width: int = 128,
        decoder_width: int = 128,
        patch_size: int = 1,
        build_encoder: bool = True,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(int(m) for m in channel_multipliers)
        downsample = patch_size * 2 ** (len(channel_multipliers) - 1)
        if image_size % downsample:
            raise ValueError(
                f"image_size={image_size} is not divisible by the encoder's downsampling factor {downsample} "
                f"(channel_multipliers={list(channel_multipliers)})"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.bits_per_token = bits_per_token
        self.grid_size = image_size // downsample
        self.num_tokens = self.grid_size**2
        self.encoder: ConvEncoder | None = None
        if build_encoder:
            self.encoder = ConvEncoder(in_channels=in_channels, base_channels=base_channels,
                                       channel_multipliers=channel_multipliers, blocks_per_level=blocks_per_level,
                                       width=encoder_width, patch_size=patch_size)
        self.quantize = BinaryFSQ(encoder_width, decoder_width, bits_per_token)
        self.decoder = ConvDecoder(out_channels=in_channels, base_channels=base_channels,
                                   channel_multipliers=channel_multipliers, blocks_per_level=blocks_per_level,
                                   width=decoder_width, grid_size=self.grid_size, patch_size=patch_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Centre the projected values on the FSQ decision threshold (about -3.8, not 0): otherwise every bit starts at
        # 1 on the flat part of the tanh, where the straight-through gradient is ~0.002 and bits never flip.
        nn.init.constant_(self.quantize.in_proj.bias, self.quantize.threshold)
        # The last conv of each residual branch starts at zero: every block starts as the identity.
        for module in self.modules():
            if isinstance(module, ResidualConvBlock):
                nn.init.zeros_(module.conv2.weight)

    @property
    def num_bits(self) -> int:
        return self.num_tokens * self.bits_per_token

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"({expected[0]} channels, {self.image_size}x{self.image_size} pixels), got {tuple(images.shape)}"
            )

    def check_bits(self, bits_flat: torch.Tensor) -> None:
        if bits_flat.dim() != 2 or bits_flat.shape[1] != self.num_bits:
            raise ValueError(
                f"bits must have shape [B, {self.num_bits}] ({self.num_tokens} tokens x {self.bits_per_token} bits), "
                f"got {tuple(bits_flat.shape)}"
            )

    def _require_encoder(self) -> ConvEncoder:
        if self.encoder is None:
            raise RuntimeError("this tokenizer was built decode-only (build_encoder=False); it cannot encode images")
        return self.encoder

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self._require_encoder()(images)  # [B, L0, encoder_width]

    @torch.no_grad()
    def encode_token_bits(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.to_bits(self.encode_features(images))  # [B, L0, Cb]

    @torch.no_grad()
    def encode_bits(self, images: torch.Tensor) -> torch.Tensor:
        bits = self.encode_token_bits(images)
        return bits.reshape(bits.shape[0], self.num_bits)  # [B, L0 * Cb]

    def bits_to_features(self, bits_flat: torch.Tensor) -> torch.Tensor:
        self.check_bits(bits_flat)
        return self.quantize.from_bits(bits_flat.reshape(bits_flat.shape[0], self.num_tokens, self.bits_per_token))

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(features)

    def decode_bits(self, bits_flat: torch.Tensor) -> torch.Tensor:
        return self.decode_features(self.bits_to_features(bits_flat))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        quantized, bits = self.quantize(self.encode_features(images))  # [B, L0, decoder_width], [B, L0, Cb]
        return TokenizerOutput(self.decoder(quantized), bits, None, None)
