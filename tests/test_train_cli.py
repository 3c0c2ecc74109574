"""train.py end to end through Hydra, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null"]


def run_train(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_tiny_generator_trains_writes_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = run_train("experiment=tiny_generator", "trainer.max_steps=10", f"hydra.run.dir={run_dir}", *QUIET)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (run_dir / "config.yaml").is_file() and last.is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 10

    # The identical command with a larger budget continues from last.ckpt in the same run directory.
    second = run_train("experiment=tiny_generator", "trainer.max_steps=15", f"hydra.run.dir={run_dir}", *QUIET)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout + second.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 15


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.tokens_allocation=[1,1,1]", "sampling.tokens_allocation"),
        ("+model.num_layer=3", "num_layer"),
    ],
)
def test_invalid_config_stops_before_building_anything(tmp_path, override, message):
    result = run_train("experiment=tiny_generator", override, f"hydra.run.dir={tmp_path}", *QUIET)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_full_size_bar_b_trains_one_step_on_cpu(tmp_path):
    """The 415M-parameter BAR-B at batch 2 fits in 24 GiB and trains one optimiser step on CPU (~2-3 min)."""
    result = run_train(
        "experiment=bar_b", "trainer=cpu", "allow_large_model_on_cpu=true", "trainer.max_steps=1",
        "data=synthetic_tokens", "data.batch_size=2", "data.synthetic_num_samples=4", f"hydra.run.dir={tmp_path}", *QUIET, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True,
                            mmap=True)
    assert checkpoint["global_step"] == 1
    assert checkpoint["state_dict"]["generator.embeddings.weight"].shape == (1004, 768)
