"""Shared test settings and helpers: deterministic CPU execution, the fixture folder, tiny trained checkpoints, a
recorder of the sampling loop's steps, a recorder of what a module logs and a callback that forbids host-device waits
in a window of training steps (GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    # Parity with the recorded tensors needs one thread and deterministic kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A torch-fidelity Inception-v3 state dict with random weights, made without any download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)  # the constructor loads this; the patched load_state_dict ignores it
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    # PyTorch's default init shrinks activations ~1e-8 after 20 layers; He init keeps features O(1) so that
    # distances between image sets are well above rounding.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def record_sampling_steps(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> dict[str, list]:
    """What the eager sampling loop of `model` hands its head at every AR step, appended while this test runs:
    `step_conditions` (the latent condition `[rows, W]`, CFG null rows included), `step_cfg_scale` (the guidance
    scale) and `step_bits` (the head's sampled bits `[B, C]`). Wraps the head's `sample` instead of asking the
    production loop to record; a CUDA graph would record only its capture."""
    recorded: dict[str, list] = {"step_conditions": [], "step_cfg_scale": [], "step_bits": []}
    sample = model.lm_head.sample

    def recording_sample(conditions: torch.Tensor, *, guidance_scale, **options) -> torch.Tensor:
        recorded["step_conditions"].append(conditions[:, 0].clone())
        recorded["step_cfg_scale"].append(guidance_scale)
        bits = sample(conditions, guidance_scale=guidance_scale, **options)
        recorded["step_bits"].append(bits.clone())
        return bits

    monkeypatch.setattr(model.lm_head, "sample", recording_sample)
    return recorded


def train_tiny(run_dir: Path, *overrides: str) -> Path:
    """Run train.py quietly into `run_dir`; returns its last.ckpt."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "logger=csv", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tokenizer_checkpoint(tmp_path_factory) -> Path:
    """A tiny tokenizer trained for 6 steps by train.py (shared by the pretokenization tests)."""
    return train_tiny(tmp_path_factory.mktemp("tok"), "experiment=tiny_tokenizer", "trainer.max_steps=6")


@pytest.fixture(scope="session")
def generator_checkpoint(tmp_path_factory) -> Path:
    """A tiny generator trained for 2 steps by train.py (for the checkpoint-kind and provenance probes)."""
    return train_tiny(tmp_path_factory.mktemp("gen"), "experiment=tiny_generator", "trainer.max_steps=2",
                      "data.val_num_samples=0")


@pytest.fixture(scope="session")
def generator_of_tiny_tokenizer(tmp_path_factory) -> Path:
    """A tiny generator of the tiny tokenizer's 6-bit tokens (2 training steps): a pair that decodes to images
    (evaluation and the sampler page)."""
    return train_tiny(tmp_path_factory.mktemp("gen6"), "experiment=tiny_generator", "model.bits_per_token=6",
                      "sampling.tokens_allocation=[2,2,2]", "trainer.max_steps=2", "data.val_num_samples=0")


def record_logged_values(module) -> list[tuple[str, object, dict]]:
    """Wrap `module.log` to record every (name, value, keyword arguments) handed to it, then log as before. On a GPU,
    a training step that logs a host number makes Lightning copy it to the device with a blocking copy, and one
    logged with `prog_bar=True` is read back to the host after the step (both a stream synchronisation)."""
    logged: list[tuple[str, object, dict]] = []
    original = module.log

    def log(name, value, *args, **kwargs):
        logged.append((name, value, dict(kwargs)))
        return original(name, value, *args, **kwargs)

    module.log = log
    return logged


class ForbidHostSyncs(L.Callback):
    """Turns on torch's CUDA sync debug mode in "error" from the start of batch `first` to the start of batch `last`:
    any operation in between that makes the host wait for the GPU (`.item()`, a blocking copy, a stream
    synchronisation) raises, naming itself in the traceback. The window holds whole training steps and everything
    Lightning does between them (hooks, logging, fetching and moving the next batch)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.checked_batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.first:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif batch_idx == self.last:
            torch.cuda.set_sync_debug_mode("default")
        if self.first <= batch_idx < self.last:
            self.checked_batches.append(batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception) -> None:  # noqa: ANN001
        torch.cuda.set_sync_debug_mode("default")


def fit_forbidding_host_syncs(cfg, build_job, first: int = 10, last: int = 15):
    """Seed, build the job of `cfg` with `build_job` (`build_tokenizer_job` or `build_generator_job`) and fit it with
    `ForbidHostSyncs(first, last)`, checking that the window covered batches `first` to `last - 1`; returns
    `(module, trainer)`."""
    from bar_lightning.run import build_trainer

    forbid = ForbidHostSyncs(first, last)
    L.seed_everything(0)
    module, datamodule = build_job(cfg)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(forbid)
    trainer.fit(module, datamodule=datamodule)
    assert forbid.checked_batches == list(range(first, last))
    return module, trainer
