"""Exact resume and preemption through train.py, as a cluster runs it: kill, re-run the identical command, compare.

Each scenario launches real `python train.py` processes. A preemption drill callback
(`bar_lightning.lightning.preemption.SendSignalAtStep`) sends the signal to the process itself after a given step,
so the whole path runs: signal handler -> flag -> checkpoint at the next step boundary -> exit code -> resume.
The uninterrupted reference run and the interrupted run start together (two cores) to keep the tests short.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bar_lightning.lightning.preemption import DEFAULT_PREEMPTION_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null"]
DRILL = "+callbacks.drill._target_=bar_lightning.lightning.preemption.SendSignalAtStep"
KEY_LOG = "+callbacks.key_log._target_=bar_lightning.lightning.callbacks.BatchKeyLog"
# One thread per process: the reference and interrupted runs share the two cores, and equal thread counts keep
# the CPU kernels' reduction order equal between runs.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
            f"{KEY_LOG}", f"+callbacks.key_log.path={run_dir / 'keys.jsonl'}", *QUIET]


def start(command: list[str], environment: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment or ENVIRONMENT)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def trained_keys(run_dir: Path) -> list[tuple[int, list[str]]]:
    lines = (run_dir / "keys.jsonl").read_text().splitlines()
    return [(entry["step"], entry["keys"]) for entry in map(json.loads, lines)]


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two checkpoint trees differ; tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}/{key} (only in one)" for key in sorted(set(a) ^ set(b), key=str)]
        return found + [item for key in a if key in b for item in differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} (lengths {len(a)} vs {len(b)})"]
        return [item for index, (x, y) in enumerate(zip(a, b)) for item in differences(x, y, f"{path}[{index}]")]
    return [] if a == b else [f"{path} ({a!r} vs {b!r})"]


# The whole training state; ModelCheckpoint's own bookkeeping holds run-directory paths and is left out.
COMPARED_STATE = ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "loops")


def assert_same_training_state(reference: dict, resumed: dict) -> None:
    for key in COMPARED_STATE:
        assert not differences(reference[key], resumed[key], key), differences(reference[key], resumed[key], key)
    random_states = "RandomStateCheckpoint"
    assert random_states in reference["callbacks"], list(reference["callbacks"])
    assert not differences(reference["callbacks"][random_states], resumed["callbacks"][random_states])


def run_kill_and_resume(tmp_path: Path, overrides: list[str], kill_step: int, signal_name: str):
    """Reference run, interrupted run (signal after `kill_step`), then the identical interrupted command again."""
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    interrupted_command = train_command(
        interrupted_dir, *overrides, DRILL, f"+callbacks.drill.step={kill_step}", f"+callbacks.drill.signal={signal_name}"
    )
    reference = start(train_command(reference_dir, *overrides))
    first_attempt = start(interrupted_command)
    first_code, first_output = finish(first_attempt)
    preempted = load(interrupted_dir / "checkpoints" / "last.ckpt")
    second_code, second_output = finish(start(interrupted_command))
    reference_code, reference_output = finish(reference)
    assert reference_code == 0, reference_output[-3000:]
    assert first_code == DEFAULT_PREEMPTION_EXIT_CODE, first_output[-3000:]
    assert second_code == 0, second_output[-3000:]
    assert f"received {signal_name}" in first_output
    assert "Resuming from" in second_output and "last.ckpt" in second_output
    return {
        "reference": load(reference_dir / "checkpoints" / "last.ckpt"),
        "preempted": preempted,
        "resumed": load(interrupted_dir / "checkpoints" / "last.ckpt"),
        "reference_keys": trained_keys(reference_dir),
        "interrupted_keys": trained_keys(interrupted_dir),
    }


@pytest.fixture(scope="module")
def generator_runs(tmp_path_factory):
    # 16 batches per epoch: the kill at step 21 is mid-epoch 1, after a validation and a step checkpoint (step 16),
    # and inside the random-order anneal window (20..40).
    overrides = ["experiment=tiny_generator", "trainer.max_steps=28", "trainer.deterministic=true",
                 "trainer.val_check_interval=8", "callbacks.model_checkpoint.every_n_train_steps=8",
                 "logger=csv"]
    return run_kill_and_resume(tmp_path_factory.mktemp("generator"), overrides, kill_step=21, signal_name="SIGTERM")


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory):
    # The discriminator starts at step 5; the kill at step 17 is mid-epoch 1 with G and D alternating.
    overrides = ["experiment=tiny_tokenizer", "trainer.max_steps=20", "trainer.deterministic=true",
                 "trainer.val_check_interval=6", "callbacks.model_checkpoint.every_n_train_steps=6", "logger=csv"]
    return run_kill_and_resume(tmp_path_factory.mktemp("tokenizer"), overrides, kill_step=17, signal_name="SIGUSR1")


def test_generator_killed_with_sigterm_resumes_bit_exactly(generator_runs):
    assert generator_runs["preempted"]["global_step"] == 21
    assert generator_runs["resumed"]["global_step"] == 28
    assert_same_training_state(generator_runs["reference"], generator_runs["resumed"])
    # The last step (global step 27) drew its orders inside the anneal window 20..40.
    assert generator_runs["resumed"]["random_ratio"] == generator_runs["reference"]["random_ratio"] == 0.65
    # Data: what the interrupted run trained on before the kill plus after the resume is the reference's data.
    assert generator_runs["interrupted_keys"] == generator_runs["reference_keys"]
    assert [step for step, _ in generator_runs["reference_keys"]] == list(range(28))


def test_generator_resume_comparison_detects_a_difference(generator_runs):
    """Negative control: training changes the weights, and the comparison above would see it."""
    preempted, resumed = generator_runs["preempted"]["state_dict"], generator_runs["resumed"]["state_dict"]
    changed = differences(preempted, resumed, "state_dict")
    assert len(changed) > len(resumed) // 2, changed
    with pytest.raises(AssertionError):
        assert_same_training_state(generator_runs["reference"], generator_runs["preempted"])


def test_tokenizer_killed_after_discriminator_start_resumes_bit_exactly(tokenizer_runs):
    reference, resumed = tokenizer_runs["reference"], tokenizer_runs["resumed"]
    assert tokenizer_runs["preempted"]["global_step"] == 17
    assert_same_training_state(reference, resumed)
    # Both optimisers and schedulers (G and D), the EMA copy and its update count are part of the state compared.
    assert len(resumed["optimizer_states"]) == 2 and len(resumed["lr_schedulers"]) == 2
    assert int(resumed["state_dict"]["ema.num_updates"]) == 20
    assert any(key.startswith("discriminator.") for key in resumed["state_dict"])
    assert tokenizer_runs["interrupted_keys"] == tokenizer_runs["reference_keys"]
    assert differences(tokenizer_runs["preempted"]["state_dict"], resumed["state_dict"])  # negative control


def write_stub_scontrol(folder: Path) -> Path:
    """An `scontrol` that records its arguments, put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "scontrol_calls.txt"
    stub = folder / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return record


def test_preempted_slurm_job_requeues_and_resumes_in_the_same_run_directory(tmp_path):
    calls = write_stub_scontrol(tmp_path / "bin")
    slurm = {**ENVIRONMENT, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
             "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}
    # No hydra.run.dir: the job script's command line, whose run directory must survive the requeue.
    command = [sys.executable, str(ROOT / "train.py"), "experiment=tiny_generator", "trainer.max_steps=8",
               f"paths.root_dir={tmp_path}", "logger=csv", DRILL, "+callbacks.drill.step=3",
               "+callbacks.drill.signal=SIGUSR1", *QUIET]
    first_code, first_output = finish(start(command, slurm))
    run_dir = tmp_path / "outputs" / "tiny_generator" / "4242"
    assert first_code == DEFAULT_PREEMPTION_EXIT_CODE, first_output[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3

    second_code, second_output = finish(start(command, slurm))
    assert second_code == 0, second_output[-3000:]
    assert f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in second_output
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert calls.read_text().split() == ["requeue", "4242"]  # the finished run did not requeue again


def test_two_process_run_preempted_on_one_rank_resumes_bit_exactly(tmp_path):
    # DDP over gloo: the signal reaches rank 0 only; the ranks agree at the next step boundary, save one checkpoint
    # (holding both ranks' random streams), exit with the preemption code, and the identical command resumes it.
    overrides = ["experiment=tiny_generator", "trainer=ddp_cpu", "trainer.max_steps=12", "trainer.deterministic=true",
                 "data.batch_size=16", "callbacks.model_checkpoint.every_n_train_steps=4", "logger=csv"]
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    interrupted = train_command(interrupted_dir, *overrides, DRILL, "+callbacks.drill.step=7",
                                "+callbacks.drill.signal=SIGTERM", "+callbacks.drill.rank=0")
    reference = start(train_command(reference_dir, *overrides))
    first_code, first_output = finish(start(interrupted))
    assert first_code == DEFAULT_PREEMPTION_EXIT_CODE, first_output[-3000:]
    preempted = load(interrupted_dir / "checkpoints" / "last.ckpt")
    assert preempted["global_step"] == 7
    assert len(preempted["callbacks"]["RandomStateCheckpoint"]["ranks"]) == 2
    second_code, second_output = finish(start(interrupted))
    assert second_code == 0, second_output[-3000:]
    reference_code, reference_output = finish(reference)
    assert reference_code == 0, reference_output[-3000:]
    assert_same_training_state(load(reference_dir / "checkpoints" / "last.ckpt"),
                               load(interrupted_dir / "checkpoints" / "last.ckpt"))
    for rank in range(2):  # each rank saw the same data before plus after the kill as without it
        name = f"keys.rank{rank}.jsonl"
        reference_lines = (reference_dir / name).read_text().splitlines()
        assert len(reference_lines) == 12
        assert (interrupted_dir / name).read_text().splitlines() == reference_lines
