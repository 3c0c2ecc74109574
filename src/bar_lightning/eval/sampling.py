"""Class-balanced sampling of bit tokens from a trained generator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from bar_lightning.compat.upstream import load_generator
from bar_lightning.config.schema import ConfigError
from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.mbm_head import validate_tokens_allocation

log = logging.getLogger(__name__)


def balanced_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
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


@torch.no_grad()
def sample_balanced(
    model: BARGenerator,
    labels: torch.Tensor,
    *,
    guidance_scale: float,
    temperature: float,
    tokens_allocation: Sequence[int],
    random_order: bool,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Generate bits for every label, batch by batch; batch `i` uses the random stream seeded with `(seed, i)`."""
    outputs = []
    batches = labels.split(batch_size)
    with Progress() as progress:
        task = progress.add_task("sampling", total=len(labels))
        for index, batch in enumerate(batches):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            bits = model.generate(
                batch.to(device), guidance_scale=guidance_scale, temperature=temperature,
                tokens_allocation=tokens_allocation, random_order=random_order, generator=generator,
            )
            outputs.append(bits.cpu())
            progress.advance(task, len(batch))
    return torch.cat(outputs)


def run_sampling(cfg: DictConfig) -> Path:
    """Sample a class-balanced set and write `<output_dir>/samples_bits.npz` (`bits` uint8, `labels` int64)."""
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    device = resolve_device(cfg.device)
    model = load_generator_from_source(cfg.generator).to(device)
    if model.head_type == "mbm":
        try:
            allocation = validate_tokens_allocation(list(cfg.sampling.tokens_allocation), model.bits_per_step)
        except ValueError as error:
            raise ConfigError(f"sampling.tokens_allocation: {error}") from error
    else:
        allocation = [model.bits_per_step]
    classes = list(cfg.classes) if cfg.classes is not None else list(range(model.num_classes))
    if any(not 0 <= c < model.num_classes for c in classes):
        raise ConfigError(f"classes={classes} has a class outside 0..{model.num_classes - 1}")
    labels = balanced_labels(classes, cfg.num_samples_per_class)
    bits = sample_balanced(
        model, labels, guidance_scale=cfg.sampling.guidance_scale, temperature=cfg.sampling.temperature,
        tokens_allocation=allocation, random_order=cfg.sampling.random_order, batch_size=cfg.batch_size,
        seed=cfg.seed, device=device,
    )
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "samples_bits.npz"
    tmp = output / ".samples_bits.tmp.npz"
    np.savez_compressed(tmp, bits=bits.numpy().astype(np.uint8), labels=labels.numpy())
    tmp.replace(path)
    log.info("wrote %d samples to %s", len(labels), path)
    return path
