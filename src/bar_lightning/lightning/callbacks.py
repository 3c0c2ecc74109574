"""Callbacks used by the training configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision


class GeneratorPreview(L.Callback):
    """Every `every_n_steps` steps, sample one image's bits per class in `classes` and log them.

    The bits are logged as an image grid (one tile per class, one row of tokens per grid row, bits side by side),
    and their mean as a scalar; a decoded preview needs a tokenizer, which the evaluation path provides.
    """

    def __init__(self, every_n_steps: int, classes: list[int], seed: int = 1234) -> None:
        self.every_n_steps = every_n_steps
        self.classes = list(classes)
        self.seed = seed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        # Sampling uses its own generator so previews never disturb the training random stream.
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        labels = torch.tensor(self.classes, device=pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        bits = pl_module.sample(labels, generator=generator)  # [B, L0 * Cb]
        pl_module.train(was_training)
        model = pl_module.generator
        side = model.latent_height
        tiles = bits.reshape(len(self.classes), side, side * model.bits_per_token).float()  # [B, H, W*Cb]
        grid = torchvision.utils.make_grid(tiles.unsqueeze(1), nrow=min(len(self.classes), 5), pad_value=0.5)
        pl_module.log("preview/bit_mean", bits.float().mean(), rank_zero_only=True)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("preview/bits", grid, global_step=step)


class BatchKeyLog(L.Callback):
    """Appends the sample keys of every training batch to a JSON-lines file: `{"step": s, "keys": [...]}`.

    An audit of which data each optimiser step saw (e.g. to check that a resumed run continued exactly where the
    interrupted one stopped). `step` is the global step the batch is trained in, counted from 0. Under DDP each rank
    writes `<path stem>.rank<r><suffix>`. Lines are flushed one by one, so a killed run keeps every line it wrote.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"])}) + "\n")
