"""Training losses of the BAR-FSQ tokenizer.

The generator objective of the released tokenizer (`bar_fsq_16bits`) is

    0.1 * L1 + 1.0 * L2 + 1.1 * perceptual + 10 * Gram + 0.7 * distillation  (+ 0.05 * adversarial, from step 100k)

with perceptual = (1.0 * LPIPS-VGG + 0.1 * ConvNeXt-S logit MSE) / 1.1. `TokenizerReconstructionLoss` computes
everything except the adversarial term: that one needs the discriminator, its start step and its optimiser, which
belong to the training step (`generator_adversarial_loss` and `hinge_d_loss` are the two GAN objectives, and
`quantize_to_uint8_grid` prepares the reconstructions the discriminator is trained on).

All images are `[B, 3, H, W]` in [-1, 1]. Pretrained networks come from local files (see `pretrained.py`); a loss
whose weight is 0 builds no network and needs no file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bar_lightning.models.pretrained import (
    CONVNEXT_SMALL_WEIGHTS_DESCRIPTION,
    LPIPS_VGG_WEIGHTS_DESCRIPTION,
    VGG16_WEIGHTS_DESCRIPTION,
    FrozenPretrainedNetwork,
    ModuleWithFrozenNetworks,
    build_convnext_small,
    build_vgg16_features,
    freeze,
    load_torch_weights,
    require_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LPIPS's own input scaling for [-1, 1] images (the ImageNet statistics expressed on that scale).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Where the five LPIPS stages end in torchvision's VGG16 `features`: after relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3. The last max-pool (index 30) is not used.
LPIPS_VGG_STAGE_ENDS = (4, 9, 16, 23, 30)
LPIPS_VGG_CHANNELS = (64, 128, 256, 512, 512)

LOSS_OFF = "set that loss's weight to 0 to disable it"  # the alternative to a missing pretrained file


def _channel_constant(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


def _imagenet_normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the [0, 1] ImageNet-standardised input torchvision classifiers were trained on."""
    return ((images + 1.0) / 2.0 - mean) / std


def _check_same_shape(reconstructions: torch.Tensor, targets: torch.Tensor) -> None:
    if reconstructions.shape != targets.shape:
        raise ValueError(
            f"reconstructions {tuple(reconstructions.shape)} and targets {tuple(targets.shape)} must have the "
            "same shape [B, 3, H, W]."
        )


class LPIPS(FrozenPretrainedNetwork):
    """LPIPS v0.1 with a VGG16 backbone: per-image perceptual distance between two batches in [-1, 1].

    Each of five VGG stages gives unit-normalised (over channels) features; their squared difference is weighted
    per channel by a learned 1x1 head, averaged over space, and the five stage values are summed.

    Args:
        vgg16_weights: torchvision `vgg16-397923af.pth` (or its `features.*` subset).
        lpips_weights: LPIPS v0.1 `vgg.pth` (a.k.a. `vgg_lpips.pth`), keys `lin0.model.1.weight` ...
            `lin4.model.1.weight`.
    """

    def __init__(self, *, vgg16_weights: str | Path, lpips_weights: str | Path) -> None:
        super().__init__()
        vgg16_path = require_weights(vgg16_weights, what=VGG16_WEIGHTS_DESCRIPTION, needed_by="LPIPS",
                                     how_to_disable=LOSS_OFF)
        lpips_path = require_weights(lpips_weights, what=LPIPS_VGG_WEIGHTS_DESCRIPTION, needed_by="LPIPS",
                                     how_to_disable=LOSS_OFF)
        vgg_features = build_vgg16_features(vgg16_path)
        stage_starts = (0, *LPIPS_VGG_STAGE_ENDS[:-1])
        self.stages = nn.ModuleList(
            vgg_features[start:end] for start, end in zip(stage_starts, LPIPS_VGG_STAGE_ENDS, strict=True)
        )
        self.linear_heads = nn.ModuleList(
            nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in LPIPS_VGG_CHANNELS
        )
        self._load_linear_heads(lpips_path)
        self.register_buffer("shift", _channel_constant(LPIPS_SHIFT), persistent=False)
        self.register_buffer("scale", _channel_constant(LPIPS_SCALE), persistent=False)
        freeze(self)

    def _load_linear_heads(self, path: Path) -> None:
        # The official file names each head `lin{k}.model.1` (index 0 is a dropout that is never active at eval).
        state = load_torch_weights(path)
        expected = {f"lin{k}.model.1.weight": k for k in range(len(LPIPS_VGG_CHANNELS))}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"'{path}' is not an LPIPS v0.1 VGG linear-head file: missing keys {missing}, unexpected keys "
                f"{unexpected[:5]}; expected exactly {sorted(expected)}."
            )
        for key, stage in expected.items():
            head_weight = self.linear_heads[stage].weight
            if state[key].shape != head_weight.shape:
                raise ValueError(
                    f"'{path}': {key} has shape {tuple(state[key].shape)}, expected {tuple(head_weight.shape)}."
                )
            with torch.no_grad():
                head_weight.copy_(state[key])

    @staticmethod
    def _unit_normalise(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))  # [B, 1, h, w]
        return features / (norm + eps)

    def forward(self, images: torch.Tensor, other_images: torch.Tensor) -> torch.Tensor:
        """Distances `[B]` between `images` and `other_images`, both `[B, 3, H, W]` in [-1, 1]."""
        _check_same_shape(images, other_images)
        features = (images - self.shift) / self.scale
        other_features = (other_images - self.shift) / self.scale
        distance = images.new_zeros(images.shape[0])
        for stage, head in zip(self.stages, self.linear_heads, strict=True):
            features = stage(features)  # [B, C_k, H_k, W_k]
            other_features = stage(other_features)
            squared_difference = (self._unit_normalise(features) - self._unit_normalise(other_features)) ** 2
            distance = distance + head(squared_difference).mean(dim=(1, 2, 3))  # [B, 1, H_k, W_k] -> [B]
        return distance


class ConvNeXtLogitLoss(FrozenPretrainedNetwork):
    """MSE between the ImageNet logits a ConvNeXt-Small gives two batches of images.

    Images are resized to `input_size` (bicubic with antialiasing) and ImageNet-normalised first.

    Args:
        convnext_weights: torchvision `convnext_small-0c510722.pth`.
        input_size: side the classifier sees. 224, its training resolution, is the recipe; tests use less.
    """

    def __init__(self, *, convnext_weights: str | Path, input_size: int = 224) -> None:
        super().__init__()
        path = require_weights(
            convnext_weights,
            what=CONVNEXT_SMALL_WEIGHTS_DESCRIPTION,
            needed_by="the ConvNeXt perceptual loss",
            how_to_disable=LOSS_OFF,
        )
        if input_size < 32:
            raise ValueError(
                f"ConvNeXt needs input_size >= 32 (its total stride), got input_size={input_size}."
            )
        self.input_size = input_size
        self.classifier = build_convnext_small(path)
        self.register_buffer("imagenet_mean", _channel_constant(IMAGENET_MEAN), persistent=False)
        self.register_buffer("imagenet_std", _channel_constant(IMAGENET_STD), persistent=False)
        freeze(self)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits `[B, 1000]` of `[B, 3, H, W]` images in [-1, 1]."""
        resized = F.interpolate(
            images, size=self.input_size, mode="bicubic", align_corners=False, antialias=True
        )  # [B, 3, input_size, input_size]
        return self.classifier(_imagenet_normalise(resized, self.imagenet_mean, self.imagenet_std))

    def forward(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_same_shape(reconstructions, targets)
        return F.mse_loss(self.logits(reconstructions), self.logits(targets))


class GramLoss(FrozenPretrainedNetwork):
    """Style (Gram-matrix) loss on torchvision VGG16 features, as the BAR-FSQ recipe computes it.

    Images are resized to `input_size` (bilinear, no antialiasing) and ImageNet-normalised. For a layer output
    `f` of shape `[B, C, h, w]`, `G = f f^T / (C h w)` is `[B, C, C]`; the loss sums, over layers, the mean
    squared difference of the two images' Gram matrices.

    Which layers count, and how often, reproduces the official code exactly. It records every layer output of
    `vgg16.features` in turn, but torchvision's ReLUs work in place, so each recorded convolution output is
    overwritten by the ReLU that follows. The sum is therefore: every ReLU output twice (13 x 2 terms) plus every
    max-pool output once (5 terms). The loss weight of 10 was tuned with this sum.

    Args:
        vgg16_weights: torchvision `vgg16-397923af.pth` (or its `features.*` subset).
        input_size: side VGG sees. 224 is the recipe; tests use less.
    """

    def __init__(self, *, vgg16_weights: str | Path, input_size: int = 224) -> None:
        super().__init__()
        path = require_weights(vgg16_weights, what=VGG16_WEIGHTS_DESCRIPTION, needed_by="the Gram loss",
                               how_to_disable=LOSS_OFF)
        if input_size < 32:
            raise ValueError(f"VGG16 needs input_size >= 32 (its total stride), got input_size={input_size}.")
        self.input_size = input_size
        self.vgg_features = build_vgg16_features(path)
        self.layer_counts = tuple(self._times_counted(layer) for layer in self.vgg_features)
        self.register_buffer("imagenet_mean", _channel_constant(IMAGENET_MEAN), persistent=False)
        self.register_buffer("imagenet_std", _channel_constant(IMAGENET_STD), persistent=False)
        freeze(self)

    @staticmethod
    def _times_counted(layer: nn.Module) -> int:
        if isinstance(layer, nn.ReLU):
            return 2  # its own output, plus the preceding convolution's output that it overwrote in place
        if isinstance(layer, nn.MaxPool2d):
            return 1
        if isinstance(layer, nn.Conv2d):
            return 0  # counted through the ReLU that follows
        raise ValueError(f"Unexpected layer {layer!r} in VGG16 features.")

    @staticmethod
    def gram_matrix(features: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` -> `[B, C, C]`, normalised by `C * h * w`, computed in float32."""
        batch, channels, height, width = features.shape
        flat = features.float().reshape(batch, channels, height * width)  # [B, C, h*w]
        # Outside autocast: each entry sums h*w products, which bfloat16 would round far too coarsely.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return flat @ flat.transpose(1, 2) / (channels * height * width)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(
            images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
        )
        return _imagenet_normalise(resized, self.imagenet_mean, self.imagenet_std)

    def forward(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_same_shape(reconstructions, targets)
        features = self._prepare(reconstructions)  # [B, 3, input_size, input_size]
        target_features = self._prepare(targets)
        loss = reconstructions.new_zeros((), dtype=torch.float32)
        for layer, times_counted in zip(self.vgg_features, self.layer_counts, strict=True):
            features = layer(features)
            target_features = layer(target_features)
            if times_counted:
                gram_difference = self.gram_matrix(features) - self.gram_matrix(target_features)
                loss = loss + times_counted * gram_difference.pow(2).mean()
        return loss


class PerceptualLoss(FrozenPretrainedNetwork):
    """Weighted mean `(a * LPIPS + b * ConvNeXt logit MSE) / (a + b)`; a network whose weight is 0 is not built.

    Args:
        lpips_weight, convnext_weight: `a` and `b` (the recipe's `lpips-convnext_s-1.0-0.1`).
        vgg16_weights, lpips_weights: files for LPIPS (needed when `lpips_weight > 0`).
        convnext_weights: file for ConvNeXt-S (needed when `convnext_weight > 0`).
        convnext_input_size: side ConvNeXt sees (224 in the recipe).
    """

    def __init__(
        self,
        *,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.1,
        vgg16_weights: str | Path | None = None,
        lpips_weights: str | Path | None = None,
        convnext_weights: str | Path | None = None,
        convnext_input_size: int = 224,
    ) -> None:
        super().__init__()
        for name, value in (("lpips_weight", lpips_weight), ("convnext_weight", convnext_weight)):
            _check_loss_weight(name, value)
        if lpips_weight + convnext_weight <= 0:
            raise ValueError(
                f"PerceptualLoss needs lpips_weight or convnext_weight > 0, got {lpips_weight} and "
                f"{convnext_weight}; to drop the perceptual term set its own weight (perceptual_weight) to 0."
            )
        self.lpips_weight = lpips_weight
        self.convnext_weight = convnext_weight
        self.lpips = (
            LPIPS(vgg16_weights=vgg16_weights, lpips_weights=lpips_weights) if lpips_weight > 0 else None
        )
        self.convnext = (
            ConvNeXtLogitLoss(convnext_weights=convnext_weights, input_size=convnext_input_size)
            if convnext_weight > 0
            else None
        )
        freeze(self)

    def forward_with_terms(
        self, reconstructions: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The combined loss (a scalar) and its unweighted parts `{"lpips": ..., "convnext": ...}`."""
        weighted_sum = reconstructions.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        if self.lpips is not None:
            terms["lpips"] = self.lpips(reconstructions, targets).mean()
            weighted_sum = weighted_sum + self.lpips_weight * terms["lpips"]
        if self.convnext is not None:
            terms["convnext"] = self.convnext(reconstructions, targets)
            weighted_sum = weighted_sum + self.convnext_weight * terms["convnext"]
        return weighted_sum / (self.lpips_weight + self.convnext_weight), terms

    def forward(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.forward_with_terms(reconstructions, targets)[0]


def _check_loss_weight(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 disables the term), got {name}={value}.")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss `0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial term `-mean(D(fake))`: lower when the discriminator scores fakes as real."""
    return -fake_logits.mean()


def quantize_to_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """Snap `[-1, 1]` images to the 256 levels of a saved uint8 image, detached.

    The discriminator step trains on these instead of the raw reconstructions, so D cannot tell real from fake
    by off-grid or out-of-range values that a real image never has.
    """
    clamped = images.detach().clamp(-1.0, 1.0)
    return torch.round((clamped + 1.0) * 127.5) / 127.5 - 1.0


class TokenizerReconstructionLoss(ModuleWithFrozenNetworks):
    """The tokenizer's generator loss without the adversarial term (see the module docstring).

    `forward` returns `(total, terms)`: `total` is the weighted sum to backpropagate, `terms` the detached,
    unweighted value of each enabled term (keys among "l1", "l2", "perceptual", "lpips", "convnext", "gram",
    "distill") for logging.

    Only the networks of terms with a weight > 0 are built, and all their files are checked before any is
    loaded. The frozen networks are held outside the module tree (see `pretrained.py`): `state_dict()` stays
    empty and `parameters()` yields nothing, while `.to(device)` still moves them.

    Args:
        l1_weight, l2_weight: pixel L1 and L2 (mean squared error) weights.
        perceptual_weight: weight of `PerceptualLoss`; `lpips_weight` and `convnext_weight` mix it.
        gram_weight: weight of `GramLoss`.
        distill_weight: weight of the MSE between `distill_pred` and `distill_target` (the decoder's prediction of
            the frozen SigLIP2 features and those features; `clip_loss_weight` upstream).
        vgg16_weights: torchvision `vgg16-397923af.pth`; needed by LPIPS and the Gram loss.
        lpips_weights: LPIPS v0.1 `vgg.pth` (`vgg_lpips.pth`); needed by LPIPS.
        convnext_weights: torchvision `convnext_small-0c510722.pth`; needed by the ConvNeXt term.
        imagenet_input_size: side that ConvNeXt and the Gram VGG see (224 in the recipe; tests use less).
    """

    def __init__(
        self,
        *,
        l1_weight: float = 0.1,
        l2_weight: float = 1.0,
        perceptual_weight: float = 1.1,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.1,
        gram_weight: float = 10.0,
        distill_weight: float = 0.7,
        vgg16_weights: str | Path | None = None,
        lpips_weights: str | Path | None = None,
        convnext_weights: str | Path | None = None,
        imagenet_input_size: int = 224,
    ) -> None:
        super().__init__()
        weights = {
            "l1_weight": l1_weight,
            "l2_weight": l2_weight,
            "perceptual_weight": perceptual_weight,
            "lpips_weight": lpips_weight,
            "convnext_weight": convnext_weight,
            "gram_weight": gram_weight,
            "distill_weight": distill_weight,
        }
        for name, value in weights.items():
            _check_loss_weight(name, value)
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.perceptual_weight = perceptual_weight
        self.gram_weight = gram_weight
        self.distill_weight = distill_weight
        use_lpips = perceptual_weight > 0 and lpips_weight > 0
        use_convnext = perceptual_weight > 0 and convnext_weight > 0
        use_gram = gram_weight > 0
        if perceptual_weight > 0 and not (use_lpips or use_convnext):
            raise ValueError(
                f"perceptual_weight={perceptual_weight} but lpips_weight and convnext_weight are both 0; set one of "
                "them > 0, or set perceptual_weight=0 to drop the perceptual term."
            )

        # Check every needed file first, so a misconfigured run fails in seconds rather than after loading VGG.
        lpips_user = f"LPIPS (perceptual_weight={perceptual_weight}, lpips_weight={lpips_weight})"
        gram_user = f"the Gram loss (gram_weight={gram_weight})"
        vgg16_users = [user for user, used in ((lpips_user, use_lpips), (gram_user, use_gram)) if used]
        if vgg16_users:
            require_weights(
                vgg16_weights,
                what=VGG16_WEIGHTS_DESCRIPTION,
                needed_by=f"{' and '.join(vgg16_users)} [argument vgg16_weights]",
                how_to_disable=LOSS_OFF,
            )
        if use_lpips:
            require_weights(
                lpips_weights,
                what=LPIPS_VGG_WEIGHTS_DESCRIPTION,
                needed_by=f"{lpips_user} [argument lpips_weights]",
                how_to_disable=LOSS_OFF,
            )
        if use_convnext:
            require_weights(
                convnext_weights,
                what=CONVNEXT_SMALL_WEIGHTS_DESCRIPTION,
                needed_by=f"the ConvNeXt perceptual term (perceptual_weight={perceptual_weight}, "
                f"convnext_weight={convnext_weight}) [argument convnext_weights]",
                how_to_disable=LOSS_OFF,
            )

        if perceptual_weight > 0:
            self.hold_frozen(
                "perceptual",
                PerceptualLoss(
                    lpips_weight=lpips_weight,
                    convnext_weight=convnext_weight,
                    vgg16_weights=vgg16_weights,
                    lpips_weights=lpips_weights,
                    convnext_weights=convnext_weights,
                    convnext_input_size=imagenet_input_size,
                ),
            )
        if use_gram:
            self.hold_frozen("gram", GramLoss(vgg16_weights=vgg16_weights, input_size=imagenet_input_size))

    def forward(
        self,
        reconstructions: torch.Tensor,
        targets: torch.Tensor,
        distill_pred: torch.Tensor | None = None,
        distill_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`reconstructions`, `targets`: `[B, 3, H, W]` in [-1, 1]; `distill_*`: `[B, L, D]` (needed iff
        `distill_weight > 0`)."""
        _check_same_shape(reconstructions, targets)
        targets = targets.detach()
        total = reconstructions.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            total = total + weight * value
            terms[name] = value.detach()

        if self.l1_weight > 0:
            add("l1", self.l1_weight, F.l1_loss(reconstructions, targets))
        if self.l2_weight > 0:
            add("l2", self.l2_weight, F.mse_loss(reconstructions, targets))
        if self.perceptual_weight > 0:
            perceptual, perceptual_parts = self.frozen("perceptual").forward_with_terms(
                reconstructions, targets
            )
            add("perceptual", self.perceptual_weight, perceptual)
            terms.update({name: value.detach() for name, value in perceptual_parts.items()})
        if self.gram_weight > 0:
            add("gram", self.gram_weight, self.frozen("gram")(reconstructions, targets))
        if self.distill_weight > 0:
            if distill_pred is None or distill_target is None:
                raise ValueError(
                    f"distill_weight={self.distill_weight} needs distill_pred and distill_target (the decoder's "
                    "feature prediction and the frozen encoder's features); pass both or set distill_weight=0."
                )
            if distill_pred.shape != distill_target.shape:
                raise ValueError(
                    f"distill_pred {tuple(distill_pred.shape)} and distill_target {tuple(distill_target.shape)} "
                    "must have the same shape."
                )
            # The targets are teacher features: never a path for gradients.
            add("distill", self.distill_weight, F.mse_loss(distill_pred, distill_target.detach()))
        return total, terms
