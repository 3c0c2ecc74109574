"""A non-finite loss stops training with the step number, and the last good checkpoint stays loadable."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bar_lightning.config.schema import validate_train_config
from bar_lightning.lightning.checkpointing import read_checkpoint
from bar_lightning.lightning.tokenizer_module import TokenizerModule
from bar_lightning.run import build_generator_job, build_tokenizer_job, build_trainer

from .test_configs import compose_train

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null",
         "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=12",
         "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1000"]
BAD_STEP = 5


def fit_until_the_loss_turns_nan(experiment: str, build_job, output_dir, loss_owner, *overrides: str):
    """Fit with the loss made NaN at `BAD_STEP`; `loss_owner(module)` gives (object, name) of the loss callable."""
    cfg = validate_train_config(compose_train([f"experiment={experiment}", *QUIET, *overrides], output_dir))
    L.seed_everything(cfg.seed)
    module, datamodule = build_job(cfg)
    owner, name = loss_owner(module)
    real_loss = getattr(owner, name)

    def loss_that_turns_nan(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        poison = float("nan") if module.global_step == BAD_STEP else 0.0
        return (loss[0] + poison, *loss[1:]) if isinstance(loss, tuple) else loss + poison

    setattr(owner, name, loss_that_turns_nan)
    trainer = build_trainer(cfg)
    with pytest.raises(FloatingPointError, match=rf"non-finite .*loss nan at global step {BAD_STEP}"):
        trainer.fit(module, datamodule=datamodule)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step never reached the weights
    return read_checkpoint(output_dir / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("fused", [False, True])
def test_generator_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, fused):
    # fused=True (the GPU default): the step is skipped on the device by the fused AdamW and the error is raised
    # when the flag has been read (before the checkpoint of step 6 here); fused=False reads it before the step.
    kept = fit_until_the_loss_turns_nan("tiny_generator", build_generator_job, tmp_path,
                                        lambda module: (module, "_loss"), f"optim.fused={str(fused).lower()}")
    assert kept["global_step"] == 4  # the last periodic checkpoint before step 5; nothing was saved after it
    assert all(torch.isfinite(value).all() for value in kept["state_dict"].values() if value.is_floating_point())


def test_tokenizer_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    kept = fit_until_the_loss_turns_nan("tiny_tokenizer", build_tokenizer_job, tmp_path,
                                        lambda module: (module.loss, "forward"))
    assert kept["global_step"] == 4
    assert all(torch.isfinite(value).all() for value in kept["state_dict"].values() if value.is_floating_point())
    TokenizerModule.load_tokenizer(tmp_path / "checkpoints" / "last.ckpt")  # and it still loads
