"""The two Vision Transformers of the BAR-FSQ tokenizer: the SigLIP2 image encoder and the pixel decoder.

Encoder: the SigLIP2 (so400m/16 by default) vision tower, written from its sizes so that no `transformers` import
is needed. It has two stacks of layers over one shared patch embedding: a *trainable* copy whose output feeds the
quantiser, and an optional *frozen* copy (the pretrained weights) whose output is the distillation target
`clip_gt`. Module names follow the SigLIP2 checkpoint layout (`layer_norm1`, `self_attn.q_proj`, ...) so weights map
one to one; `bar_lightning.compat.upstream_tokenizer` renames the containers.

Decoder: a ViT-L over the quantised tokens with a class token, followed by a 1x1 convolution to `p*p*3` values per
token, a depth-to-space rearrangement and a 3x3 output convolution.

Parity with the official code (`tests/test_parity_tokenizer.py`) depends on doing the same operations in the same
order: attention goes through `scaled_dot_product_attention` with the same tensor layouts, the decoder uses exact
GELU and LayerNorm eps 1e-5, the encoder tanh-GELU and eps 1e-6.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SIGLIP2_PATCH_SIZE = 16  # the released encoder is patch 16; the official code hard-codes it when patchifying


# ---------------------------------------------------------------------------------------------------------------
# SigLIP2 vision tower
# ---------------------------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, (H/p)*(W/p), p*p*C]`: patches in raster order, each flattened (row, col, channel)
    with the channel fastest, the layout SigLIP2's linear patch embedding was trained on."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)  # [B, C, h, i, w, j]
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, i, j, C]
    return patches.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


class SiglipEmbeddings(nn.Module):
    """Linear patch embedding plus a learned square position grid, resized to the token grid when they differ."""

    def __init__(self, *, width: int, patch_size: int, num_channels: int, num_position_rows: int) -> None:
        super().__init__()
        side = math.isqrt(num_position_rows)
        if side * side != num_position_rows:
            raise ValueError(f"num_position_rows={num_position_rows} must be a square number (a square grid)")
        self.width = width
        self.patch_size = patch_size
        self.position_grid_side = side
        self.patch_embedding = nn.Linear(num_channels * patch_size * patch_size, width)
        self.position_embedding = nn.Embedding(num_position_rows, width)

    def position_grid(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings for a `grid_height x grid_width` token grid, `[grid_height * grid_width, width]`."""
        side, weight = self.position_grid_side, self.position_embedding.weight
        grid = weight.reshape(side, side, self.width).permute(2, 0, 1).unsqueeze(0)  # [1, width, side, side]
        # Antialiased bilinear resizing is not implemented for half types on CPU, so it runs in float32 (the
        # reference does the same on CPU; on GPU the result differs from it only for half-precision weights).
        resized = F.interpolate(
            grid.float(), size=(grid_height, grid_width), mode="bilinear", align_corners=False, antialias=True
        )  # [1, width, grid_height, grid_width]; an exact identity when the sizes already match
        return resized.reshape(self.width, grid_height * grid_width).transpose(0, 1).to(weight.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` -> token embeddings `[B, (H/p)*(W/p), width]`."""
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = patchify(images, self.patch_size).to(self.patch_embedding.weight.dtype)  # [B, L0, p*p*C]
        return self.patch_embedding(patches) + self.position_grid(grid_h, grid_w)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (SigLIP naming), no mask."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"encoder width {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads_shape = (batch, length, self.num_heads, self.head_dim)
        queries = self.q_proj(x).view(heads_shape).transpose(1, 2)  # [B, heads, L, head_dim]
        keys = self.k_proj(x).view(heads_shape).transpose(1, 2)
        values = self.v_proj(x).view(heads_shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(queries, keys, values, scale=self.scale)  # [B, heads, L, hd]
        attended = attended.transpose(1, 2).contiguous().reshape(batch, length, width)  # [B, L, width]
        return self.out_proj(attended)


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation, as SigLIP was trained) -> fc2."""

    def __init__(self, width: int, hidden_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer layer of the SigLIP2 vision tower."""

    def __init__(self, *, width: int, num_heads: int, mlp_width: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.self_attn = SiglipAttention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = SiglipMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipPoolingHead(nn.Module):
    """Parameters of SigLIP's attention-pooling head.

    The tokenizer never uses the pooled embedding; the head is only held (frozen) when asked for, so that a
    checkpoint in the official layout, which contains it, can be re-exported loss-free.
    """

    def __init__(self, *, width: int, num_heads: int, mlp_width: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = SiglipMLP(width, mlp_width)


class SigLIP2Encoder(nn.Module):
    """SigLIP2 vision tower with a trainable copy of its layers and, optionally, the frozen original.

    Args:
        image_size: side of the (square) input images; a multiple of `patch_size`.
        width: hidden size (1152 for so400m).
        num_layers: transformer layers per copy (27).
        num_heads: attention heads (16).
        mlp_width: MLP hidden size (4304).
        patch_size: 16 for every released SigLIP2 naflex model.
        num_position_rows: rows of the learned position table, a square grid (256 = 16 x 16).
        layer_norm_eps: 1e-6.
        num_channels: image channels (3).
        with_frozen_branch: build the frozen layers + post-LN that produce the distillation targets.
        with_pooling_head: hold SigLIP's (unused) pooling head so checkpoints that contain it round-trip.

    The patch/position embeddings are shared by both copies and frozen, as in the official tokenizer; only
    `trainable_layers` and `trainable_post_layernorm` receive gradients.
    """

    def __init__(
        self,
        *,
        image_size: int,
        width: int = 1152,
        num_layers: int = 27,
        num_heads: int = 16,
        mlp_width: int = 4304,
        patch_size: int = SIGLIP2_PATCH_SIZE,
        num_position_rows: int = 256,
        layer_norm_eps: float = 1e-6,
        num_channels: int = 3,
        with_frozen_branch: bool = True,
        with_pooling_head: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the encoder patch_size={patch_size}")
        self.image_size = image_size
        self.width = width
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.grid_size = image_size // patch_size
        layer_kwargs = dict(width=width, num_heads=num_heads, mlp_width=mlp_width, layer_norm_eps=layer_norm_eps)

        self.embeddings = SiglipEmbeddings(
            width=width, patch_size=patch_size, num_channels=num_channels, num_position_rows=num_position_rows
        )
        self.frozen_layers: nn.ModuleList | None = None
        self.frozen_post_layernorm: nn.LayerNorm | None = None
        if with_frozen_branch:
            self.frozen_layers = nn.ModuleList(SiglipEncoderLayer(**layer_kwargs) for _ in range(num_layers))
            self.frozen_post_layernorm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.pooling_head = SiglipPoolingHead(**layer_kwargs) if with_pooling_head else None
        self.trainable_layers = nn.ModuleList(SiglipEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.trainable_post_layernorm = nn.LayerNorm(width, eps=layer_norm_eps)
        self._init_weights()
        self._freeze()

    # ------------------------------------------------------------------ init / freezing
    def _init_weights(self) -> None:
        """SigLIP-style random init (used only without a pretrained checkpoint); the trainable copy starts equal
        to the frozen one, as it would after loading pretrained weights."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # LeCun-normal patch embedding and 1/sqrt(width) position table, as SigLIP initialises them.
        patch = self.embeddings.patch_embedding
        nn.init.trunc_normal_(patch.weight, std=math.sqrt(1.0 / patch.in_features) / 0.87962566103423978)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=self.width**-0.5)
        if self.pooling_head is not None:
            nn.init.xavier_uniform_(self.pooling_head.attention.in_proj_weight)
            nn.init.zeros_(self.pooling_head.attention.in_proj_bias)
            nn.init.normal_(self.pooling_head.probe)
        self.copy_frozen_to_trainable()

    def _freeze(self) -> None:
        frozen = [self.embeddings, self.frozen_layers, self.frozen_post_layernorm, self.pooling_head]
        for module in frozen:
            if module is not None:
                module.requires_grad_(False)

    @torch.no_grad()
    def copy_frozen_to_trainable(self) -> None:
        """Start the trainable copy from the frozen (pretrained) weights."""
        if self.frozen_layers is None or self.frozen_post_layernorm is None:
            return
        self.trainable_layers.load_state_dict(self.frozen_layers.state_dict())
        self.trainable_post_layernorm.load_state_dict(self.frozen_post_layernorm.state_dict())

    def load_siglip2_vision(self, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Initialise from a SigLIP2 checkpoint (HF `model.safetensors`/`pytorch_model.bin` of a Siglip2Model or
        Siglip2VisionModel, read from a local file, or its state dict): embeddings, frozen layers and post-LN (and
        the pooling head if held) are loaded strictly, then copied into the trainable branch."""
        if not isinstance(checkpoint, Mapping):
            checkpoint = _read_tensor_file(Path(checkpoint))
        prefix = next((p for p in ("vision_model.", "") if any(k.startswith(p + "embeddings.") for k in checkpoint)), None)
        if prefix is None:
            raise ValueError("no SigLIP2 vision tower in the checkpoint (expected keys 'vision_model.embeddings.*')")
        renamed: dict[str, torch.Tensor] = {}
        for key, value in checkpoint.items():
            if not key.startswith(prefix):
                continue  # e.g. the text tower, logit scale/bias
            key = key[len(prefix) :]
            if key.startswith("encoder.layers."):
                key = "frozen_layers." + key[len("encoder.layers.") :]
            elif key.startswith("post_layernorm."):
                key = "frozen_post_layernorm." + key[len("post_layernorm.") :]
            elif key.startswith("head."):
                if self.pooling_head is None:
                    continue
                key = "pooling_head." + key[len("head.") :]
            renamed[key] = value
        expected = {k for k in self.state_dict() if not k.startswith(("trainable_layers.", "trainable_post_layernorm."))}
        missing, unexpected = sorted(expected - set(renamed)), sorted(set(renamed) - expected)
        if missing or unexpected:
            raise ValueError(
                f"SigLIP2 checkpoint does not match this encoder: missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        with torch.no_grad():
            own = self.state_dict()
            for key, value in renamed.items():
                if own[key].shape != value.shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != encoder shape {tuple(own[key].shape)}")
                own[key].copy_(value)
        self.copy_frozen_to_trainable()

    def train(self, mode: bool = True) -> SigLIP2Encoder:
        # The frozen parts never train (no dropout here today, but keep their mode fixed like the reference).
        super().train(mode)
        for module in (self.embeddings, self.frozen_layers, self.frozen_post_layernorm, self.pooling_head):
            if module is not None:
                module.eval()
        return self

    # ------------------------------------------------------------------ forward
    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.num_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"({expected[0]} channels, {self.image_size}x{self.image_size} pixels), got {tuple(images.shape)}"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Shared (frozen) token embeddings `[B, L0, width]`."""
        self.check_images(images)
        with torch.no_grad():
            return self.embeddings(images)

    def trainable_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for layer in self.trainable_layers:
            x = layer(x)
        return self.trainable_post_layernorm(x)

    @torch.no_grad()
    def frozen_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Distillation targets (`clip_gt`) from the frozen copy."""
        if self.frozen_layers is None or self.frozen_post_layernorm is None:
            raise RuntimeError("this encoder was built without the frozen branch (with_frozen_branch=False)")
        x = embeddings
        for layer in self.frozen_layers:
            x = layer(x)
        return self.frozen_post_layernorm(x)

    def forward(self, images: torch.Tensor, return_clip_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images `[B, C, H, W]` in [-1, 1] -> (trainable features `[B, L0, width]`, frozen features or None)."""
        embeddings = self.embed(images)  # [B, L0, width]
        features = self.trainable_features(embeddings)
        clip_targets = self.frozen_features(embeddings) if return_clip_targets else None
        return features, clip_targets


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        from bar_lightning.weights import fetch_hint

        raise FileNotFoundError(f"SigLIP2 checkpoint file not found: {path}.{fetch_hint(path)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a mapping of parameter names to tensors")
    return dict(loaded)


# ---------------------------------------------------------------------------------------------------------------
# Pixel decoder
# ---------------------------------------------------------------------------------------------------------------
class FusedQKVAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, no mask, no QK-norm, no RoPE: the pixel decoder's and
    the DINO discriminator's (models/discriminator.py)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # Split position-major (the projection's own layout) and view head-major only for the attention: the same
        # views as a head-major split, but the compiled backward then writes the three gradients straight into the
        # projection's gradient instead of stacking them head-major first and copying that stack (models/bar_blocks.py).
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        queries, keys, values = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, L, head_dim]
        attended = F.scaled_dot_product_attention(queries, keys, values)  # [B, heads, L, head_dim]
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class DecoderMLP(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, width: int, hidden_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-LN ViT block (LayerNorm eps 1e-5)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = FusedQKVAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = DecoderMLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTPixelDecoder(nn.Module):
    """Quantised token features `[B, L0, width]` -> images `[B, 3, H, W]` in [-1, 1] scale (not clamped).

    Args:
        image_size: side of the (square) output images.
        patch_size: pixels per token side (`vit_dec_patch_size`); the token grid is `image_size / patch_size`.
        width, num_layers, num_heads, mlp_ratio: ViT-L (1024, 24, 16, 4) in every released tokenizer.
        clip_target_width: if given, build the distillation projector (`clip_projector`, an MLP
            width -> 2048 -> 2048 -> clip_target_width) applied to the output of block `clip_align_layer_id`.
        clip_align_layer_id: 0-based index of the block whose output is projected.
        clip_hidden_width: hidden width of the projector (2048).
        use_checkpoint: activation checkpointing of every block during training.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        clip_target_width: int | None = None,
        clip_align_layer_id: int = 2,
        clip_hidden_width: int = 2048,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the decoder patch_size={patch_size}")
        if clip_target_width is not None and not 0 <= clip_align_layer_id < num_layers:
            raise ValueError(f"clip_align_layer_id={clip_align_layer_id} is not a block index (0..{num_layers - 1})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_tokens = self.grid_size**2
        self.width = width
        self.clip_align_layer_id = clip_align_layer_id
        self.use_checkpoint = use_checkpoint

        self.class_embedding = nn.Parameter(torch.zeros(1, width))
        self.positional_embedding = nn.Parameter(torch.zeros(self.num_tokens + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(DecoderBlock(width, num_heads, mlp_ratio) for _ in range(num_layers))
        self.ln_post = nn.LayerNorm(width)
        self.to_pixels = nn.Conv2d(width, patch_size * patch_size * 3, kernel_size=1)
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)
        self.clip_projector: nn.Sequential | None = None
        if clip_target_width is not None:
            self.clip_projector = nn.Sequential(
                nn.Linear(width, clip_hidden_width),
                nn.SiLU(),
                nn.Linear(clip_hidden_width, clip_hidden_width),
                nn.SiLU(),
                nn.Linear(clip_hidden_width, clip_target_width),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # Upstream: truncated normal(0.02) for linear/conv weights, zero biases, unit LayerNorms; the class and
        # position embeddings keep their N(0, 1/width) construction-time draw.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_embedding, std=self.width**-0.5)
        nn.init.normal_(self.positional_embedding, std=self.width**-0.5)

    def check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.num_tokens, self.width):
            raise ValueError(
                f"decoder input must have shape [B, {self.num_tokens}, {self.width}] (tokens, width), "
                f"got {tuple(features.shape)}"
            )

    def tokens_to_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, L0, width]` (raster order) -> `[B, 3, H, W]` via 1x1 conv and depth-to-space."""
        batch, p, side = tokens.shape[0], self.patch_size, self.grid_size
        grid = tokens.permute(0, 2, 1).reshape(batch, self.width, side, side)  # token t -> (t // side, t % side)
        pixels = self.to_pixels(grid.contiguous())  # [B, p*p*3, side, side], channel (i*p + j)*3 + c
        pixels = pixels.reshape(batch, p, p, 3, side, side).permute(0, 3, 4, 1, 5, 2)  # [B, 3, h, i, w, j]
        return self.conv_out(pixels.reshape(batch, 3, side * p, side * p))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token features `[B, L0, width]` -> (images `[B, 3, H, W]`, projected block features `[B, L0, clip]` or
        None when the model has no `clip_projector`)."""
        self.check_features(features)
        batch = features.shape[0]
        class_token = self.class_embedding.to(features.dtype).unsqueeze(0).expand(batch, -1, -1)  # [B, 1, width]
        x = torch.cat([class_token, features], dim=1) + self.positional_embedding.to(features.dtype)  # [B, L0+1, w]
        x = self.ln_pre(x)
        clip_prediction = None
        for index, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if self.clip_projector is not None and index == self.clip_align_layer_id:
                clip_prediction = self.clip_projector(x[:, 1:])  # [B, L0, clip_target_width]
        x = self.ln_post(x[:, 1:])  # drop the class position: [B, L0, width]
        return self.tokens_to_pixels(x), clip_prediction
