"""BAR-FSQ tokenizer: SigLIP2 encoder -> binary FSQ -> ViT pixel decoder.

An image `[B, 3, H, W]` in [-1, 1] becomes `L0 = (H/16)^2` tokens of `bits_per_token` bits. The flat bit vector
(what the generator produces and consumes) is token-major, bit-minor: element `t * bits_per_token + n` is bit `n`
of token `t`, tokens in raster order over the latent grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from bar_lightning.models.fsq import BinaryFSQ
from bar_lightning.models.vit import SIGLIP2_PATCH_SIZE, SigLIP2Encoder, ViTPixelDecoder


class TokenizerOutput(NamedTuple):
    """What a training step needs from the tokenizer."""

    reconstruction: torch.Tensor  # [B, 3, H, W], [-1, 1] scale, not clamped
    bits: torch.Tensor  # [B, L0, bits_per_token] int64
    clip_prediction: torch.Tensor | None  # [B, L0, encoder_width] from the decoder's projector, or None
    clip_target: torch.Tensor | None  # [B, L0, encoder_width] from the frozen encoder, or None


class BarFSQTokenizer(nn.Module):
    """Image tokenizer with binary tokens.

    Args:
        image_size: side of the square images (`crop_size`, 256 or 512 for the released models).
        bits_per_token: FSQ channels per token (`token_size`: 16, or 10 for the 512 px model).
        decoder_patch_size: pixels per token side in the decoder (`vit_dec_patch_size`, 16).
        encoder_width, encoder_layers, encoder_heads, encoder_mlp_width, encoder_patch_size,
        encoder_position_rows, encoder_layer_norm_eps: SigLIP2 vision tower sizes (so400m/16 by default).
        decoder_width, decoder_layers, decoder_heads, decoder_mlp_ratio: decoder ViT sizes (ViT-L by default).
        clip_distillation: build the decoder's `clip_projector` (predicting frozen-encoder features from decoder
            block `clip_align_layer_id`); the released checkpoints have it (training used clip_loss_weight 0.7).
        clip_align_layer_id: 0-based decoder block whose output feeds the projector.
        clip_target_width: output width of the projector; None = `encoder_width` (the official code hard-codes
            1152, the so400m width, which is the same thing for every released model).
        build_encoder: False builds a decode-only tokenizer (no encoder weights needed; `in_proj` is still built so
            the quantiser loads strictly).
        with_frozen_branch: build the frozen encoder copy (distillation targets); needed for training and export.
        with_pooling_head: hold SigLIP's unused pooling head so official checkpoints re-export loss-free.
        use_checkpoint: activation checkpointing in the decoder.
    """

    def __init__(
        self,
        *,
        image_size: int = 256,
        bits_per_token: int = 16,
        decoder_patch_size: int = 16,
        encoder_width: int = 1152,
        encoder_layers: int = 27,
        encoder_heads: int = 16,
        encoder_mlp_width: int = 4304,
        encoder_patch_size: int = SIGLIP2_PATCH_SIZE,
        encoder_position_rows: int = 256,
        encoder_layer_norm_eps: float = 1e-6,
        decoder_width: int = 1024,
        decoder_layers: int = 24,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        clip_distillation: bool = False,
        clip_align_layer_id: int = 2,
        clip_target_width: int | None = None,
        build_encoder: bool = True,
        with_frozen_branch: bool = True,
        with_pooling_head: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if image_size % decoder_patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of decoder_patch_size={decoder_patch_size}")
        if image_size // encoder_patch_size != image_size // decoder_patch_size or image_size % encoder_patch_size:
            raise ValueError(
                f"encoder_patch_size={encoder_patch_size} and decoder_patch_size={decoder_patch_size} must give the "
                f"same token grid for image_size={image_size}"
            )
        self.image_size = image_size
        self.bits_per_token = bits_per_token
        self.grid_size = image_size // decoder_patch_size
        self.num_tokens = self.grid_size**2  # L0
        self.encoder_width = encoder_width

        # Registration order decoder -> encoder -> quantize mirrors the official module, so exported keys come out in
        # the same order as its state_dict.
        self.decoder = ViTPixelDecoder(
            image_size=image_size,
            patch_size=decoder_patch_size,
            width=decoder_width,
            num_layers=decoder_layers,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
            clip_target_width=(clip_target_width or encoder_width) if clip_distillation else None,
            clip_align_layer_id=clip_align_layer_id,
            use_checkpoint=use_checkpoint,
        )
        self.encoder: SigLIP2Encoder | None = None
        if build_encoder:
            self.encoder = SigLIP2Encoder(
                image_size=image_size,
                width=encoder_width,
                num_layers=encoder_layers,
                num_heads=encoder_heads,
                mlp_width=encoder_mlp_width,
                patch_size=encoder_patch_size,
                num_position_rows=encoder_position_rows,
                layer_norm_eps=encoder_layer_norm_eps,
                with_frozen_branch=with_frozen_branch,
                with_pooling_head=with_pooling_head,
            )
        self.quantize = BinaryFSQ(encoder_width, decoder_width, bits_per_token)

    # ------------------------------------------------------------------ checks
    @property
    def num_bits(self) -> int:
        """Length of the flat bit vector of one image, `L0 * bits_per_token`."""
        return self.num_tokens * self.bits_per_token

    def _require_encoder(self) -> SigLIP2Encoder:
        if self.encoder is None:
            raise RuntimeError("this tokenizer was built decode-only (build_encoder=False); it cannot encode images")
        return self.encoder

    def check_bits(self, bits_flat: torch.Tensor) -> None:
        if bits_flat.dim() != 2 or bits_flat.shape[1] != self.num_bits:
            raise ValueError(
                f"bits must have shape [B, {self.num_bits}] ({self.num_tokens} tokens x {self.bits_per_token} bits), "
                f"got {tuple(bits_flat.shape)}"
            )

    # ------------------------------------------------------------------ encode
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [-1, 1] -> trainable-branch features before FSQ `[B, L0, encoder_width]`."""
        return self._require_encoder()(images)[0]

    def clip_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features `[B, L0, encoder_width]` (the distillation targets, `clip_gt`)."""
        encoder = self._require_encoder()
        return encoder.frozen_features(encoder.embed(images))

    @torch.no_grad()
    def encode_token_bits(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> bits `[B, L0, bits_per_token]` (int64 0/1). No gradients: bits are discrete."""
        return self.quantize.to_bits(self.encode_features(images))

    @torch.no_grad()
    def encode_bits(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> flat bits `[B, L0 * bits_per_token]` (int64 0/1, token-major)."""
        bits = self.encode_token_bits(images)  # [B, L0, Cb]
        return bits.reshape(bits.shape[0], self.num_bits)

    # ------------------------------------------------------------------ decode
    def bits_to_features(self, bits_flat: torch.Tensor) -> torch.Tensor:
        """Flat bits `[B, L0 * Cb]` -> dequantised features `[B, L0, decoder_width]`."""
        self.check_bits(bits_flat)
        token_bits = bits_flat.reshape(bits_flat.shape[0], self.num_tokens, self.bits_per_token)  # [B, L0, Cb]
        return self.quantize.from_bits(token_bits)

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Dequantised features `[B, L0, decoder_width]` -> images `[B, 3, H, W]` ([-1, 1] scale, unclamped)."""
        return self.decoder(features)[0]

    def decode_bits(self, bits_flat: torch.Tensor) -> torch.Tensor:
        """Flat bits `[B, L0 * Cb]` (the generator's output) -> images `[B, 3, H, W]` ([-1, 1] scale, unclamped)."""
        return self.decode_features(self.bits_to_features(bits_flat))

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Encode -> quantise (straight-through) -> decode; distillation outputs when the projector exists."""
        encoder = self._require_encoder()
        want_clip = self.decoder.clip_projector is not None
        features, clip_target = encoder(images, return_clip_targets=want_clip)
        quantized, bits = self.quantize(features)  # [B, L0, decoder_width], [B, L0, Cb]
        reconstruction, clip_prediction = self.decoder(quantized)
        return TokenizerOutput(reconstruction, bits, clip_prediction, clip_target)
