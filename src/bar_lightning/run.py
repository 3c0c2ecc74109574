"""What train.py does once the config is composed: validate, instantiate, fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from bar_lightning.config.schema import validate_train_config
from bar_lightning.lightning.generator_module import GeneratorModule
from bar_lightning.lightning.token_datamodule import TokenDataModule

log = logging.getLogger(__name__)


def _instantiate_all(section: DictConfig | dict | None) -> list[Any]:
    """Instantiate every `_target_` entry of a name -> config mapping (callbacks, loggers)."""
    if not section:
        return []
    return [hydra.utils.instantiate(entry) for entry in section.values() if entry and "_target_" in entry]


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(trainer_kwargs.get("strategy"), dict):
        trainer_kwargs["strategy"] = hydra.utils.instantiate(cfg.trainer.strategy)
    trainer_kwargs.update(overrides)
    return L.Trainer(
        callbacks=_instantiate_all(cfg.callbacks),
        logger=_instantiate_all(cfg.logger) or False,
        default_root_dir=cfg.paths.output_dir,
        **trainer_kwargs,
    )


def build_generator_job(cfg: DictConfig) -> tuple[GeneratorModule, TokenDataModule]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = GeneratorModule(
        model=plain["model"], optim=plain["optim"], training=plain["training"], sampling=plain["sampling"]
    )
    datamodule = TokenDataModule(**plain["data"])
    return module, datamodule


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The user's `ckpt_path`, else this run directory's `checkpoints/last.ckpt` if a previous attempt wrote it."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("Resuming from %s", last)
        return str(last)
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate `cfg`, build the job it describes and fit it; returns the final logged metrics."""
    cfg = validate_train_config(cfg)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule = build_generator_job(cfg)
    trainer = build_trainer(cfg)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    return {key: float(value) for key, value in trainer.callback_metrics.items()}
