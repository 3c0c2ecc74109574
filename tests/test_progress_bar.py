"""`StepProgressBar`: the title of a step-based run (`max_epochs=-1`) counts optimiser steps, not "Epoch 0/-2"."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from bar_lightning.lightning.callbacks import StepProgressBar


class TitleLog(L.Callback):
    """Records the bar's title after each batch (runs after the bar: callbacks run in list order)."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.titles = bar, []

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        task = next(t for t in self.bar.progress.tasks if t.id == self.bar.train_progress_bar_id)
        self.titles.append(task.description.strip())


def fit(tmp_path, **limits) -> list[str]:
    bar = StepProgressBar()
    log = TitleLog(bar)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=[bar, log], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_train_batches=2,
                        limit_val_batches=0, **limits)
    trainer.fit(BoringModel())
    return log.titles


def test_a_step_based_run_is_titled_with_its_optimiser_steps(tmp_path):
    titles = fit(tmp_path, max_epochs=-1, max_steps=3)
    assert titles == ["Epoch 0 · 1/3 steps", "Epoch 0 · 2/3 steps", "Epoch 1 · 3/3 steps"]


def test_an_epoch_based_run_keeps_the_epoch_count(tmp_path):
    titles = fit(tmp_path, max_epochs=2)
    assert titles == ["Epoch 0/1", "Epoch 0/1", "Epoch 1/1", "Epoch 1/1"]
