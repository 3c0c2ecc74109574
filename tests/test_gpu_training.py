"""The compiled training step replayed as CUDA graphs (`training.compile_mode=reduce-overhead`, the one-GPU default)
against the plain compiled step and the eager step, on a GPU; and steady-state steps (eager and compiled) that never
make the host wait for the GPU.

Skipped without a GPU; bench/h200.sh runs it. Random draws inside the compiled graph use the eager generator
(`fallback_random`), so the three runs see the same masks and their weights must agree.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bar_lightning.config.schema import validate_train_config
from bar_lightning.run import build_generator_job, build_trainer

from .conftest import fit_forbidding_host_syncs
from .test_configs import compose_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TRAINER = "gpu"

COMPILE_SETTINGS = {
    "eager": ["training.compile=false"],
    "compiled": ["training.compile=true", "+training.compile_options.fallback_random=true"],
    "cuda_graphs": [
        "training.compile=true", "+training.compile_options.fallback_random=true",
        "+training.compile_options.triton.cudagraphs=true",
    ],
}


class RecordLosses(L.Callback):
    """The logged loss of every micro-batch, as a value and as the logged tensor itself."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tensors: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        logged = trainer.callback_metrics["train/loss"]
        self.tensors.append(logged)
        self.losses.append(float(logged))


def tiny_config(tmp_path, setting: str):
    return validate_train_config(compose_train(
        ["experiment=tiny_generator", f"trainer={TRAINER}", "trainer.precision=32-true", "trainer.max_steps=4",
         "logger=none", "callbacks=none", "data.num_workers=0",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *COMPILE_SETTINGS[setting]],
        tmp_path / setting,
    ))


def fit_tiny(tmp_path, setting: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RecordLosses]:
    cfg = tiny_config(tmp_path, setting)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(False)
    L.seed_everything(0)
    module, datamodule = build_generator_job(cfg)
    initial = {key: value.detach().float().cpu().clone() for key, value in module.generator.state_dict().items()}
    recorder = RecordLosses()
    trainer = build_trainer(cfg, enable_checkpointing=False)
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    state = {key: value.detach().float().cpu() for key, value in module.generator.state_dict().items()}
    return initial, state, recorder


def test_cuda_graph_training_steps_match_the_compiled_and_eager_steps(tmp_path):
    initial, eager, eager_record = fit_tiny(tmp_path, "eager")
    _, compiled, compiled_record = fit_tiny(tmp_path, "compiled")
    graphs_initial, graphs, graphs_record = fit_tiny(tmp_path, "cuda_graphs")
    losses = torch.tensor(graphs_record.losses)
    assert len(losses) == 4
    # Each logged loss is its own copy: later replays of the graph must not have overwritten it.
    assert [float(t) for t in graphs_record.tensors] == graphs_record.losses
    torch.testing.assert_close(losses, torch.tensor(compiled_record.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, torch.tensor(eager_record.losses), rtol=1e-4, atol=1e-5)
    moved = 0
    for key, start in graphs_initial.items():
        torch.testing.assert_close(start, initial[key], rtol=0, atol=0)  # same seed, same initial weights
        torch.testing.assert_close(graphs[key], compiled[key], rtol=1e-5, atol=1e-6, msg=f"{key}: graphs vs compiled")
        torch.testing.assert_close(graphs[key], eager[key], rtol=1e-4, atol=1e-5, msg=f"{key}: graphs vs eager")
        moved += int(not torch.equal(graphs[key], start))
    assert moved > len(graphs) // 2  # the updates reached the weights


@pytest.mark.parametrize("compile_setting", ["false", "true"], ids=["eager", "compiled_automatic"])
def test_tiny_generator_steps_never_wait_for_the_gpu(tmp_path, compile_setting):
    # Five steps in the steady state (after the compilation and the CUDA-graph recording of the first ten), with the
    # GPU trainer's defaults (bf16-mixed, fused AdamW, gradient clipping), the default callbacks and a CSV logger:
    # nothing in them may make the host wait for the device (torch.cuda.set_sync_debug_mode("error") raises at the
    # first such operation).
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_generator", "trainer=gpu", "trainer.max_steps=16", "trainer.gradient_clip_val=1.0",
         "trainer.log_every_n_steps=50", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "logger=csv", "data.num_workers=2", f"training.compile={compile_setting}"],
        tmp_path,
    ))
    _, trainer = fit_forbidding_host_syncs(cfg, build_generator_job, first=10, last=15)
    assert trainer.global_step == 16 and torch.isfinite(trainer.callback_metrics["train/loss"])
