"""Random-weight stand-ins for the pretrained files a full-size BAR-FSQ tokenizer run reads.

Speed and memory do not depend on the values of weights, so a benchmark, a GPU test or a rehearsal of a cluster
job can run the real code path (the same loaders, the same frozen networks, the same losses) without the
downloads: this writes, for a composed tokenizer config, one file of the right architecture and key layout at
each configured path (`loss.vgg16_weights`, `loss.lpips_weights`, `loss.convnext_weights`,
`discriminator.backbone_weights`, `training.encoder_init_weights`). Every file is read back by the loader a real
run uses, so a stand-in that the loader would refuse fails here.

    python -m bar_lightning.stand_in_weights experiment=bar_fsq_16bits paths.pretrained_dir=/tmp/stand_ins

Never point a real run at these files: a model trained with random VGG/DINO/SigLIP2 networks learns nothing
useful. The files are written only where nothing exists yet (an existing file is never replaced).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig

from bar_lightning.models.discriminator import DinoViTBackbone, load_dino_backbone_weights
from bar_lightning.models.losses import LPIPS, LPIPS_VGG_CHANNELS
from bar_lightning.models.pretrained import build_convnext_small, build_vgg16_features


def vgg16_state() -> dict[str, torch.Tensor]:
    features = torchvision.models.vgg16(weights=None).features  # torchvision's own initialisation
    return {f"features.{key}": value for key, value in features.state_dict().items()}


def lpips_heads_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # LPIPS heads are non-negative channel weights (the official ones are clamped at 0).
    return {f"lin{k}.model.1.weight": torch.rand(1, channels, 1, 1, generator=generator) / channels
            for k, channels in enumerate(LPIPS_VGG_CHANNELS)}


def dino_state(discriminator: DictConfig) -> dict[str, torch.Tensor]:
    backbone = DinoViTBackbone(
        image_size=discriminator.get("image_size", 224), patch_size=discriminator.get("patch_size", 8),
        width=discriminator.get("width", 384), depth=discriminator.get("depth", 12),
        num_heads=discriminator.get("num_heads", 6), tap_blocks=tuple(discriminator.get("tap_blocks", (2, 5, 8, 11))),
    )
    return backbone.state_dict()


def siglip2_state(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The encoder's frozen SigLIP2 branch under the Hugging Face `Siglip2VisionModel` key names."""
    from omegaconf import OmegaConf

    from bar_lightning.models.registry import build_tokenizer

    encoder = build_tokenizer(OmegaConf.to_container(cfg.model, resolve=True)).encoder
    renamed = {}
    for key, value in encoder.state_dict().items():
        if key.startswith(("trainable_layers.", "trainable_post_layernorm.")):
            continue
        if key.startswith("frozen_layers."):
            key = "encoder.layers." + key.removeprefix("frozen_layers.")
        elif key.startswith("frozen_post_layernorm."):
            key = "post_layernorm." + key.removeprefix("frozen_post_layernorm.")
        elif key.startswith("pooling_head."):
            key = "head." + key.removeprefix("pooling_head.")
        renamed["vision_model." + key] = value.contiguous()
    return renamed


def _save(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(temporary))
    else:
        torch.save(state, temporary)
    temporary.replace(path)


def write_stand_in_weights(cfg: DictConfig) -> dict[str, Path]:
    """Write a random stand-in at every pretrained path `cfg` (a composed tokenizer config) reads, where no file
    exists yet; return `{config key: path}` of the files written. Each is checked with the real loader."""
    plans: list[tuple[str, Any, Callable[[], dict[str, torch.Tensor]], Callable[[Path], Any]]] = []
    loss = cfg.get("loss") or {}
    if loss.get("lpips_weight", 0) or loss.get("gram_weight", 0):
        plans.append(("loss.vgg16_weights", loss.get("vgg16_weights"), vgg16_state, build_vgg16_features))
    if loss.get("lpips_weight", 0):
        plans.append(("loss.lpips_weights", loss.get("lpips_weights"), lpips_heads_state,
                      lambda path: LPIPS(vgg16_weights=loss.vgg16_weights, lpips_weights=path)))
    if loss.get("convnext_weight", 0):
        plans.append(("loss.convnext_weights", loss.get("convnext_weights"),
                      lambda: torchvision.models.convnext_small(weights=None).state_dict(), build_convnext_small))
    discriminator = cfg.get("discriminator") or {}
    if discriminator.get("kind") == "dino" and not discriminator.get("random_backbone", False):
        plans.append(("discriminator.backbone_weights", discriminator.get("backbone_weights"),
                      lambda: dino_state(discriminator),
                      lambda path: load_dino_backbone_weights(DinoViTBackbone(), path)))
    encoder_init = (cfg.get("training") or {}).get("encoder_init_weights")
    if encoder_init:
        plans.append(("training.encoder_init_weights", encoder_init, lambda: siglip2_state(cfg), None))
    written: dict[str, Path] = {}
    for key, location, make_state, read_back in plans:
        if not location:
            raise ValueError(f"{key} is not set: nothing to write a stand-in to")
        path = Path(str(location)).expanduser()
        if path.exists():
            continue
        _save(path, make_state())
        if read_back is not None:
            read_back(path)
        written[key] = path
    return written


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    from bar_lightning.config.schema import validate_train_config
    from bar_lightning.paths import config_dir

    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = validate_train_config(compose("train", overrides=overrides))
    for key, path in write_stand_in_weights(cfg).items():
        print(f"{key}: wrote random stand-in {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
