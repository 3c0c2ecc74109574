"""A non-finite loss stops training with the step number, and the last good checkpoint stays loadable."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from bar_lightning.config.schema import validate_train_config
from bar_lightning.lightning.checkpointing import read_checkpoint
from bar_lightning.lightning.loss_check import (
    NonFiniteLossCheck,
    finite_on_every_process,
    non_finite_loss_error,
)
from bar_lightning.lightning.tokenizer_module import TokenizerModule
from bar_lightning.run import build_generator_job, build_tokenizer_job, build_trainer

from .test_configs import compose_train

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null",
         "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=12",
         "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1000"]
BAD_STEP = 5


def fit_until_the_loss_turns_nan(experiment: str, build_job, output_dir, loss_owner, *overrides: str,
                                 which: str = "training"):
    """Fit with the loss made NaN at `BAD_STEP`; `loss_owner(module)` gives (object, name) of the loss callable;
    the error must name the loss as `which`."""
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
    try:
        with pytest.raises(FloatingPointError, match=rf"non-finite {which} loss nan at global step {BAD_STEP}"):
            trainer.fit(module, datamodule=datamodule)
    finally:
        setattr(owner, name, real_loss)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step never reached the weights
    return read_checkpoint(output_dir / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("fused", [False, True])
def test_generator_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, fused):
    # fused=True (the GPU default): the step is skipped on the device by the fused AdamW and the error is raised
    # when the flag has been read (before the checkpoint of step 6 here); fused=False reads it before the step.
    # build_trainer does not list the check: the module attaches it (configure_callbacks).
    kept = fit_until_the_loss_turns_nan("tiny_generator", build_generator_job, tmp_path,
                                        lambda module: (module, "_loss"), f"optim.fused={str(fused).lower()}")
    assert kept["global_step"] == 4  # the last periodic checkpoint before step 5; nothing was saved after it
    assert all(torch.isfinite(value).all() for value in kept["state_dict"].values() if value.is_floating_point())


@pytest.mark.parametrize("fused", [False, True])
def test_tokenizer_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, fused):
    # The manual G step hands its loss to the same check as the generator: fused=True skips the step on the device
    # and raises once the flag is read (before the checkpoint of step 6), with no host read per step.
    kept = fit_until_the_loss_turns_nan("tiny_tokenizer", build_tokenizer_job, tmp_path,
                                        lambda module: (module.loss, "forward"), f"optim.fused={str(fused).lower()}",
                                        which="autoencoder")
    assert kept["global_step"] == 4
    assert all(torch.isfinite(value).all() for value in kept["state_dict"].values() if value.is_floating_point())
    TokenizerModule.load_tokenizer(tmp_path / "checkpoints" / "last.ckpt")  # and it still loads


def test_tokenizer_stops_at_a_nan_discriminator_loss(tmp_path):
    import bar_lightning.lightning.tokenizer_module as tokenizer_module

    # From discriminator_start=0, G runs at even steps and D at odd ones: step 5 is a D step.
    kept = fit_until_the_loss_turns_nan("tiny_tokenizer", build_tokenizer_job, tmp_path,
                                        lambda module: (tokenizer_module, "hinge_d_loss"),
                                        "training.discriminator_start=0", which="discriminator")
    assert kept["global_step"] == 4


# The callback on its own (the Trainer paths are above): the step at which a trainer stands is all it reads from it.
AT_STEP_120 = SimpleNamespace(global_step=120)


def test_non_finite_loss_stops_before_the_optimiser_step_naming_the_step():
    # The accumulation of the check across micro-batches.
    check = NonFiniteLossCheck()
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=False)
    check.note(torch.tensor(0.7))
    check.on_before_optimizer_step(AT_STEP_120, None, plain)  # all finite: the step goes on and the check is cleared
    assert check._pending is None
    check.note(torch.tensor(0.7))
    check.note(torch.tensor(float("nan")))  # one bad micro-batch of three under gradient accumulation
    check.note(torch.tensor(0.6))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at global step 120; the last saved"):
        check.on_before_optimizer_step(AT_STEP_120, None, plain)
    assert check._pending is None


def test_a_fused_optimiser_skips_a_non_finite_step_on_the_device_and_the_error_follows():
    check = NonFiniteLossCheck()
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    check.note(torch.tensor(float("nan")))
    check.on_before_optimizer_step(AT_STEP_120, None, optimizer)  # no host read, no error yet: the flag goes to it
    assert float(optimizer.found_inf) == 1.0 and len(check._queued) == 1
    weight.grad = torch.full((3,), float("nan"))
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(3)) and float(optimizer.state[weight]["step"]) == 0.0
    bad_step = check._queued[0].step
    check.note(torch.tensor(0.5))
    with pytest.raises(FloatingPointError, match=rf"non-finite training loss nan at global step {bad_step};"):
        check.on_before_optimizer_step(AT_STEP_120, None, optimizer)  # the next step reads the arrived flag, stops
    assert check._queued == []
    check.note(torch.tensor(0.5))
    check.on_before_optimizer_step(AT_STEP_120, None, optimizer)
    assert float(optimizer.found_inf) == 0.0
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(weight.detach(), torch.ones(3))  # a finite step updates
    check.note(torch.tensor(float("inf")))
    check.on_before_optimizer_step(AT_STEP_120, None, optimizer)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss inf"):
        check.on_save_checkpoint(AT_STEP_120, None, {})  # no checkpoint after a skipped step


def _and_over_two_processes(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results[rank] = bool(finite_on_every_process(torch.tensor(rank == 0)))
    torch.distributed.destroy_process_group()


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_and_over_two_processes, args=(str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: False, 1: False}  # rank 1's loss was not finite: both skip and stop
    assert "on another process (here 0.7) at global step 3" in str(non_finite_loss_error(0.7, 3))

