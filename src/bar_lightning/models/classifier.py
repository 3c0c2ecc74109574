"""A small CNN classifier for 32x32 RGB images: the demo's stand-in for Inception.

FID needs a feature network trained on natural images (Inception-v3); its weights are not available offline and
it would be meaningless on Fashion-MNIST anyway. The demo instead trains this classifier on the same 32x32 RGB
Fashion-MNIST images the tokenizer and generator see, and measures an FID-style distance on its penultimate
activations (:meth:`SmallImageClassifier.features`) plus the class accuracy of generated images.

It is deliberately cheap: about 10 M multiply-adds per image at the default width 32, 2.6 M at width 16, which
:func:`bar_lightning.eval.demo_classifier.train_demo_classifier` uses to reach about 90% Fashion-MNIST test
accuracy in under a minute on two CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm's shift replaces it) -> 2x2 max pool (halves H and W) -> BatchNorm -> ReLU.

    Pooling before BatchNorm and ReLU runs those on a quarter of the values: about 20% faster training on CPU,
    measured. Max pooling commutes with ReLU and with BatchNorm's affine map when its scale is positive, so this
    is the usual conv-BN-ReLU-pool block up to the sign of the learnt scale.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.MaxPool2d(kernel_size=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallImageClassifier(nn.Module):
    """Images ``[B, in_channels, 32, 32]`` in [-1, 1] -> logits ``[B, num_classes]``; features ``[B, feature_dim]``.

    Three conv blocks (widths ``width``, ``2 * width``, ``4 * width``; each halves the resolution: 32 -> 16 -> 8
    -> 4), global average pooling, ``Linear(4 * width, feature_dim)`` + ReLU (the features), and
    ``Linear(feature_dim, num_classes)``. Any input side divisible by 8 works; the global pool removes the
    spatial size.
    """

    def __init__(
        self, *, in_channels: int = 3, num_classes: int = 10, width: int = 32, feature_dim: int = 128
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
            ("feature_dim", feature_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 for a classifier, got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.feature_dim = feature_dim
        self.blocks = nn.Sequential(
            _conv_block(in_channels, width),  # [B, C, 32, 32] -> [B, w, 16, 16]
            _conv_block(width, 2 * width),  # -> [B, 2w, 8, 8]
            _conv_block(2 * width, 4 * width),  # -> [B, 4w, 4, 4]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)  # -> [B, 4w, 1, 1]
        self.feature_projection = nn.Linear(4 * width, feature_dim)  # [B, 4w] -> [B, feature_dim]
        self.classifier_head = nn.Linear(feature_dim, num_classes)  # [B, feature_dim] -> [B, num_classes]
        self.reset_parameters()

    def config(self) -> dict[str, int]:
        """The constructor arguments, enough to rebuild the module before loading its weights."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Explicit init, so the weights depend only on the seed, not on torch's default-init conventions.

        Kaiming-normal (fan-out, ReLU gain) for convs and the ReLU projection keeps activation scales stable
        through the ReLU stack; BatchNorm starts as identity; the output layer starts small so the first logits
        are near-uniform (loss ~ log(num_classes)) instead of confidently wrong.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()
        nn.init.kaiming_normal_(self.feature_projection.weight, nonlinearity="relu")
        nn.init.zeros_(self.feature_projection.bias)
        nn.init.normal_(self.classifier_head.weight, std=0.01)
        nn.init.zeros_(self.classifier_head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]`` (after the ReLU) of images ``[B, C, H, W]`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must be [B, {self.in_channels}, H, W], got shape {tuple(images.shape)}; convert grey "
                "images to RGB (repeat the channel) before calling the classifier"
            )
        hidden = self.blocks(images)  # [B, 4w, H/8, W/8]
        pooled = self.pool(hidden).flatten(1)  # [B, 4w]
        return torch.relu(self.feature_projection(pooled))  # [B, feature_dim]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]`` in [-1, 1]."""
        return self.classifier_head(self.features(images))
