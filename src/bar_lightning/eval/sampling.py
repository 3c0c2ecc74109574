"""Helpers to load a generator for sampling and to lay out a class-balanced sample set."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bar_lightning.compat.upstream import load_generator
from bar_lightning.models.bar import BARGenerator


def balanced_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """`per_class` samples of every class, grouped by class (ADM order: class c fills rows c*n .. c*n + n - 1)."""
    return torch.tensor(list(classes)).repeat_interleave(per_class)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_generator_from_source(source: DictConfig) -> BARGenerator:
    """A generator in eval mode from `generator.checkpoint` (this project) or `generator.upstream_*` (released)."""
    if source.checkpoint:
        from bar_lightning.lightning.generator_module import GeneratorModule

        path = Path(source.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"generator.checkpoint={path} does not exist (a checkpoint written by train.py)")
        module = GeneratorModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        return module.generator.eval()
    config_path = Path(source.upstream_config)
    if not config_path.is_file():
        raise FileNotFoundError(f"generator.upstream_config={config_path} does not exist (the upstream yaml)")
    weights = Path(source.upstream_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"generator.upstream_weights={weights} does not exist (a released bar_*.bin)")
    return load_generator(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False), weights)
