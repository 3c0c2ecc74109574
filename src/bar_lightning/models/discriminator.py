"""Discriminators for the tokenizer's GAN stage.

`DinoDiscriminator` is the one BAR-FSQ was trained with: a frozen DINO ViT-S/8 reads the image, and five small
trainable 1-D convolutional heads score its token maps (taken after the patch embedding and after blocks 2, 5, 8
and 11). `PatchDiscriminator` is a plain PatchGAN that needs no pretrained weights.

Both take `[B, 3, H, W]` images in [-1, 1] and return raw logits (real > 0 > fake under the hinge loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from bar_lightning.models.pretrained import (
    DINO_VIT_S8_WEIGHTS_DESCRIPTION,
    ModuleWithFrozenNetworks,
    load_state_dict_strictly,
    load_torch_weights,
    require_weights,
)
from bar_lightning.models.vit import FusedQKVAttention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Frozen DINO ViT backbone (key names of the official DINO / timm checkpoints)
# ---------------------------------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]


class _MLP(nn.Module):
    def __init__(self, *, width: int, hidden_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        # The tanh approximation, as in the discriminator BAR was trained with (DINO itself used the exact GELU).
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, *, width: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = FusedQKVAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = _MLP(width=width, hidden_width=round(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViTBackbone(nn.Module):
    """Pre-norm ViT whose parameter names match `dino_deitsmall8_pretrain.pth` / timm `vit_small_patch8_224.dino`.

    `forward` returns token maps rather than a pooled embedding: the patch tokens after the embedding and after
    each block in `tap_blocks`, each with the class token added to every patch token (a cheap global readout),
    as `[B, width, num_patches]` for 1-D convolutions. The final `norm` is loaded (so the checkpoint loads
    strictly) but never applied.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 8,
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        tap_blocks: tuple[int, ...] = (2, 5, 8, 11),
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
        if width % num_heads != 0:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}.")
        if not tap_blocks or any(not 0 <= block < depth for block in tap_blocks):
            raise ValueError(
                f"tap_blocks={tap_blocks} must be a non-empty set of block indices in [0, {depth})."
            )
        self.image_size = image_size
        self.width = width
        self.tap_blocks = tuple(sorted(set(tap_blocks)))
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.patch_embed = _PatchEmbed(patch_size=patch_size, width=width)
        # All `depth` blocks are built so the checkpoint loads strictly; `forward` stops after the last tapped one.
        self.blocks = nn.ModuleList(
            _Block(width=width, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Random ViT initialisation (timm's): only used when no checkpoint is loaded, i.e. in tests."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`[B, 3, image_size, image_size]` (already normalised) -> `1 + len(tap_blocks)` maps `[B, width, N]`."""
        tokens = self.patch_embed(images)  # [B, N, width]
        # The class token and position embedding are added in float32, as the official discriminator does.
        with torch.autocast(device_type=images.device.type, enabled=False):
            cls_token = self.cls_token.float().expand(tokens.shape[0], -1, -1)
            tokens = (
                torch.cat([cls_token, tokens.float()], dim=1) + self.pos_embed.float()
            )  # [B, 1 + N, width]
        token_maps = [self._readout(tokens)]
        for index, block in enumerate(self.blocks[: self.tap_blocks[-1] + 1]):
            tokens = block(tokens)
            if index in self.tap_blocks:
                token_maps.append(self._readout(tokens))
        return token_maps

    @staticmethod
    def _readout(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        return (tokens[:, 1:] + tokens[:, :1]).transpose(1, 2)  # [B, 1 + N, C] -> [B, C, N]


def load_dino_backbone_weights(backbone: DinoViTBackbone, path: str | Path) -> None:
    """Fill `backbone` strictly from a DINO ViT state dict, with the attention key bias set to zero.

    A key bias adds the same amount to every attention logit of a query, so softmax ignores it; the official
    discriminator zeroes it anyway and we do the same so the numbers match.
    """
    state = load_torch_weights(path)
    for name, tensor in state.items():
        if name.endswith(".attn.qkv.bias"):
            width = tensor.numel() // 3
            tensor[width : 2 * width] = 0.0  # [query | key | value] biases
    load_state_dict_strictly(backbone, state, source=path, what="DINO ViT backbone")


# ---------------------------------------------------------------------------------------------------------------
# Trainable heads
# ---------------------------------------------------------------------------------------------------------------


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches, without running statistics (identical in train and eval mode).

    The batch is split into `ceil(B / virtual_batch_size)` equal groups; each group is normalised per channel
    over its samples and positions, in float32. Small groups keep the statistics local, as with per-GPU batch norm
    on a large global batch.
    """

    def __init__(self, num_features: int, *, virtual_batch_size: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        num_groups = math.ceil(batch / self.virtual_batch_size)
        if batch % num_groups != 0:
            raise ValueError(
                f"BatchNormLocal splits a batch of {batch} into {num_groups} equal groups (virtual_batch_size="
                f"{self.virtual_batch_size}), which is impossible; use a batch size divisible by {num_groups}."
            )
        grouped = x.float().view(num_groups, batch // num_groups, channels, length)  # [G, B/G, C, L]
        mean = grouped.mean(dim=(1, 3), keepdim=True)  # [G, 1, C, 1]
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        normalised = ((grouped - mean) / torch.sqrt(var + self.eps)).view(batch, channels, length)
        return normalised * self.weight[None, :, None] + self.bias[None, :, None]


def _conv1d(in_channels: int, out_channels: int, *, kernel_size: int, use_spectral_norm: bool) -> nn.Module:
    conv = nn.Conv1d(
        in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, padding_mode="circular"
    )
    # PyTorch's default Conv1d initialisation, written out (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))),
    # as in the official heads; spectral norm then divides the weight by its largest singular value.
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(in_channels * kernel_size)
    nn.init.uniform_(conv.bias, -bound, bound)
    return spectral_norm(conv) if use_spectral_norm else conv


class _ConvNormAct(nn.Sequential):
    def __init__(
        self, channels: int, *, kernel_size: int, use_spectral_norm: bool, virtual_batch_size: int
    ) -> None:
        super().__init__(
            _conv1d(channels, channels, kernel_size=kernel_size, use_spectral_norm=use_spectral_norm),
            BatchNormLocal(channels, virtual_batch_size=virtual_batch_size),
            nn.LeakyReLU(negative_slope=0.2),
        )


class _ScaledResidual(nn.Module):
    """`(f(x) + x) / sqrt(2)`: keeps the variance of the sum near that of its inputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.inner(x) + x) * (1.0 / math.sqrt(2.0))


class DinoDiscriminatorHead(nn.Sequential):
    """`[B, C, N]` token map -> `[B, 1, N]` logits: 1x1 conv block, residual kernel-k conv block, 1x1 conv to 1."""

    def __init__(
        self, channels: int, *, kernel_size: int, use_spectral_norm: bool, virtual_batch_size: int
    ) -> None:
        block_kwargs = dict(use_spectral_norm=use_spectral_norm, virtual_batch_size=virtual_batch_size)
        super().__init__(
            _ConvNormAct(channels, kernel_size=1, **block_kwargs),
            _ScaledResidual(_ConvNormAct(channels, kernel_size=kernel_size, **block_kwargs)),
            _conv1d(channels, 1, kernel_size=1, use_spectral_norm=use_spectral_norm),
        )


class DinoDiscriminator(ModuleWithFrozenNetworks):
    """Frozen DINO ViT-S/8 features scored by trainable 1-D conv heads (the BAR-FSQ discriminator).

    Images are ImageNet-normalised and brought to `image_size`: larger images are, in training mode, randomly
    cropped to it half the time (one crop for the whole batch) and otherwise area-downsampled; smaller ones are
    upsampled bicubically. In eval mode there is no random crop, so scores are reproducible.

    The backbone is held outside the module tree: `state_dict()` and `parameters()` hold only the heads, and
    `.to(device)` still moves the backbone.

    Keep it in float32 and get lower precision from autocast: like the official discriminator, it feeds the
    backbone's embeddings and the heads float32 tensors.

    Args:
        backbone_weights: the DINO ViT-S/8 file (`dino_deitsmall8_pretrain.pth`, or BAR's
            `dino_vit_small_patch8_224.pth`).
        random_backbone: TEST-ONLY opt-in to a randomly initialised backbone, for use with
            `backbone_weights=None`; a discriminator built this way is meaningless for training.
        image_size, patch_size, width, depth, num_heads: backbone geometry (ViT-S/8 at 224 for the checkpoint).
        tap_blocks: blocks whose output gets a head, besides the patch embedding.
        head_kernel_size: kernel of the heads' residual convolution.
        use_spectral_norm: spectral-normalise every head convolution.
        virtual_batch_size: group size of the heads' `BatchNormLocal`.
    """

    def __init__(
        self,
        *,
        backbone_weights: str | Path | None,
        random_backbone: bool = False,
        image_size: int = 224,
        patch_size: int = 8,
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        tap_blocks: tuple[int, ...] = (2, 5, 8, 11),
        head_kernel_size: int = 9,
        use_spectral_norm: bool = True,
        virtual_batch_size: int = 8,
    ) -> None:
        super().__init__()
        if random_backbone and backbone_weights is not None:
            raise ValueError(
                f"random_backbone=True (a test-only option) conflicts with backbone_weights='{backbone_weights}'; "
                "drop one of them."
            )
        backbone = DinoViTBackbone(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            depth=depth,
            num_heads=num_heads,
            tap_blocks=tap_blocks,
        )
        if not random_backbone:
            path = require_weights(
                backbone_weights,
                what=DINO_VIT_S8_WEIGHTS_DESCRIPTION,
                needed_by="the DINO discriminator, i.e. the adversarial loss [argument backbone_weights]",
                how_to_disable="train without the adversarial loss (training.gan_weight=0 ~discriminator)",
            )
            load_dino_backbone_weights(backbone, path)
        self.hold_frozen("backbone", backbone)
        self.image_size = image_size
        self.heads = nn.ModuleList(
            DinoDiscriminatorHead(
                width,
                kernel_size=head_kernel_size,
                use_spectral_norm=use_spectral_norm,
                virtual_batch_size=virtual_batch_size,
            )
            for _ in range(1 + len(backbone.tap_blocks))
        )
        # [-1, 1] -> ImageNet-normalised in one affine map: ((x + 1) / 2 - mean) / std = x * 0.5/std + (0.5-mean)/std
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 0.5 / std, persistent=False)
        self.register_buffer("input_shift", (0.5 - mean) / std, persistent=False)

    @property
    def backbone(self) -> DinoViTBackbone:
        return self.frozen("backbone")  # type: ignore[return-value]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_scale * images.float() + self.input_shift
        height, width = x.shape[-2:]
        size = self.image_size
        if self.training and height > size and width > size and torch.rand(()).item() < 0.5:
            top = int(torch.randint(0, height - size + 1, ()).item())
            left = int(torch.randint(0, width - size + 1, ()).item())
            return x[:, :, top : top + size, left : left + size]
        # Area averaging when shrinking avoids aliasing; bicubic when enlarging.
        mode = "area" if height > size else "bicubic"
        return F.interpolate(x, size=(size, size), mode=mode)  # [B, 3, image_size, image_size]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [-1, 1] -> logits `[B, (1 + len(tap_blocks)) * N]`, N = patches per image."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            prepared = self._prepare(images)
        token_maps = self.backbone(prepared)  # each [B, width, N]
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits = [
                head(token_map.float()).flatten(1)
                for head, token_map in zip(self.heads, token_maps, strict=True)
            ]
        return torch.cat(logits, dim=1)  # 5 x [B, N] -> [B, 5N]


# ---------------------------------------------------------------------------------------------------------------
# PatchGAN
# ---------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming-transformers style): a map of logits, one per overlapping image patch.

    A 4x4 stride-2 stem, `num_layers - 1` more stride-2 convs doubling channels (capped at
    `base_channels * max_channel_multiplier`), one stride-1 conv, and a stride-1 conv to one channel.
    Intermediate convs are followed by a normalisation (`norm`: "batch", "group" or "none") and LeakyReLU 0.2.

    Args:
        in_channels: image channels.
        base_channels: channels of the stem.
        num_layers: number of stride-2 convolutions (each halves the resolution).
        max_channel_multiplier: cap on the channel growth.
        norm: normalisation after intermediate convs; "none" is the usual choice with spectral norm.
        use_spectral_norm: spectral-normalise every convolution.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        max_channel_multiplier: int = 8,
        norm: str = "batch",
        use_spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got num_layers={num_layers}.")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got norm='{norm}'.")
        self.use_spectral_norm = use_spectral_norm

        def conv(in_ch: int, out_ch: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=stride, padding=1, bias=bias)
            # N(0, 0.02) weights and zero bias: the DCGAN/pix2pix initialisation this architecture is tuned for.
            nn.init.normal_(layer.weight, mean=0.0, std=0.02)
            if bias:
                nn.init.zeros_(layer.bias)
            return spectral_norm(layer) if use_spectral_norm else layer

        def normalisation(channels: int) -> nn.Module:
            if norm == "batch":
                layer = nn.BatchNorm2d(channels)
            elif norm == "group":
                layer = nn.GroupNorm(num_groups=min(32, channels), num_channels=channels)
            else:
                return nn.Identity()
            nn.init.normal_(layer.weight, mean=1.0, std=0.02)
            nn.init.zeros_(layer.bias)
            return layer

        # A conv followed by a normalisation does not need its own bias.
        conv_bias = norm == "none"
        layers: list[nn.Module] = [conv(in_channels, base_channels, stride=2, bias=True), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out_channels = base_channels * min(2**index, max_channel_multiplier)
            stride = 2 if index < num_layers else 1
            layers += [
                conv(channels, out_channels, stride=stride, bias=conv_bias),
                normalisation(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(conv(channels, 1, stride=1, bias=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, in_channels, H, W]` in [-1, 1] -> logits `[B, 1, H', W']` (30 x 30 for 256 px and 3 layers)."""
        return self.layers(images)
