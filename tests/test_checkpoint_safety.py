"""Checkpoint files and signals in-process: atomic saves, resume selection, untrusted files, the preemption flag."""

from __future__ import annotations

import logging
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from bar_lightning.compat.files import load_state_dict_file
from bar_lightning.lightning.checkpointing import (
    AtomicCheckpointIO,
    CheckpointReadError,
    newest_valid_checkpoint,
    read_checkpoint,
)
from bar_lightning.lightning.preemption import Preempted, PreemptionCheckpoint, slurm_job_id
from bar_lightning.lightning.random_state import capture_random_state, restore_random_state
from bar_lightning.lightning.tokenizer_module import TokenizerModule
from bar_lightning.run import resolve_ckpt_path


def training_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step, "loops": {},
            "optimizer_states": []}


def run_config(run_dir: Path, ckpt_path: str | None = None):
    return OmegaConf.create({"ckpt_path": ckpt_path, "paths": {"output_dir": str(run_dir)}})


class CodeExecutingPayload:
    """Unpickling this would create `marker`: the crafted file of an attacker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- atomic saves


def test_checkpoint_save_goes_through_an_fsynced_temporary_file_in_the_destination(tmp_path, monkeypatch):
    destination = tmp_path / "checkpoints" / "last.ckpt"
    renames, fsyncs = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda source, target: (renames.append((source, target)),
                                                               real_replace(source, target)))
    monkeypatch.setattr(os, "fsync", lambda descriptor: (fsyncs.append(descriptor), real_fsync(descriptor)))
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(3), destination)
    [(source, target)] = renames
    assert Path(source).parent == destination.parent and Path(target) == destination
    assert len(fsyncs) == 2  # the file before the rename, the folder after it
    assert read_checkpoint(destination)["global_step"] == 3
    assert oct(destination.stat().st_mode & 0o777) != oct(0o600)  # not left private like a mkstemp file


def test_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    destination = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(training_checkpoint(1), destination)

    def dies_half_way(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(training_checkpoint(2), destination)
    assert read_checkpoint(destination)["global_step"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------- choosing the resume checkpoint


def test_truncated_newest_checkpoint_is_reported_and_the_previous_valid_one_is_used(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint(training_checkpoint(8), folder / "step_00000008.ckpt")
    io.save_checkpoint(training_checkpoint(12), folder / "last.ckpt")
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # a disk-full or killed copy
    with caplog.at_level(logging.WARNING):
        chosen = resolve_ckpt_path(run_config(tmp_path))
    assert chosen == str(folder / "step_00000008.ckpt")
    assert f"Not resuming from {folder / 'last.ckpt'}" in caplog.text and "truncated or corrupt" in caplog.text


def test_a_run_directory_whose_checkpoints_are_all_damaged_does_not_restart_from_scratch(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match=r"(?s)no checkpoint in .*checkpoints can be loaded.*last\.ckpt.*not a plain checkpoint"):
        newest_valid_checkpoint(folder)


def test_resume_reads_only_this_run_directory_checkpoints_or_the_named_file(tmp_path):
    run_dir = tmp_path / "run"
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(5), tmp_path / "elsewhere" / "last.ckpt")
    AtomicCheckpointIO().save_checkpoint(training_checkpoint(5), run_dir / "last.ckpt")  # not in checkpoints/
    assert resolve_ckpt_path(run_config(run_dir)) is None
    named = str(tmp_path / "elsewhere" / "last.ckpt")
    assert resolve_ckpt_path(run_config(run_dir, ckpt_path=named)) == named


def test_a_weights_only_file_is_not_taken_for_a_training_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.ckpt")
    with pytest.raises(CheckpointReadError, match=r"weights\.ckpt is not a training checkpoint.*lacks"):
        resolve_ckpt_path(run_config(tmp_path / "run", ckpt_path=str(tmp_path / "weights.ckpt")))


# ----------------------------------------------------------------------------- untrusted files


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_crafted_pickles_are_refused_everywhere_without_running(tmp_path, writer):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted.ckpt"
    payload = {"state_dict": {"w": CodeExecutingPayload(marker)}, "global_step": 1, "loops": {},
               "optimizer_states": []}
    if writer == "torch.save":
        torch.save(payload, crafted)
    else:
        with open(crafted, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    message = r"refusing to load .*crafted\.ckpt.*run arbitrary code"
    with pytest.raises(CheckpointReadError, match=message):  # resume from a named checkpoint
        resolve_ckpt_path(run_config(tmp_path / "run", ckpt_path=str(crafted)))
    with pytest.raises(CheckpointReadError, match=message):  # Lightning's checkpoint I/O
        AtomicCheckpointIO().load_checkpoint(crafted)
    with pytest.raises(CheckpointReadError, match=message):  # a tokenizer checkpoint for pretokenize/evaluate
        TokenizerModule.load_tokenizer(crafted)
    with pytest.raises(ValueError, match="refusing to load"):  # released .bin / .pt weights
        load_state_dict_file(crafted)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.replace(crafted, tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointReadError, match="run arbitrary code"):  # automatic resume
        resolve_ckpt_path(run_config(tmp_path / "run"))
    assert not marker.exists()


# ----------------------------------------------------------------------------- preemption flag and save


class RecordingTrainer(SimpleNamespace):
    def save_checkpoint(self, path, weights_only=False):
        self.saved.append((Path(path), self.global_step))


def recording_trainer(step: int) -> RecordingTrainer:
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    return RecordingTrainer(global_step=step, strategy=strategy, is_global_zero=True, saved=[])


def test_preemption_signal_only_sets_a_flag_and_the_next_step_boundary_saves_and_exits(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt", exit_code=75)
    trainer = recording_trainer(step=6)
    callback.on_train_start(trainer, None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # the real handler runs here
        assert callback.received_signal == signal.SIGUSR1 and trainer.saved == []  # nothing saved in the handler
        trainer.global_step = 7
        with pytest.raises(Preempted) as stopped:
            callback.on_train_batch_end(trainer, None)
    finally:
        callback.teardown(trainer, None, "fit")
    assert stopped.value.code == 75
    assert trainer.saved == [(tmp_path / "last.ckpt", 7)]
    assert signal.getsignal(signal.SIGUSR1) is not callback.handle_signal  # handlers restored


def test_preemption_waits_for_the_optimiser_step_under_gradient_accumulation(tmp_path):
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = recording_trainer(step=4)
    callback.on_train_start(trainer, None)
    callback.teardown(trainer, None, "fit")
    callback.handle_signal(signal.SIGTERM, None)
    callback.on_train_batch_end(trainer, None)  # an accumulation batch: global_step did not move
    assert trainer.saved == []
    trainer.global_step = 5
    with pytest.raises(Preempted):
        callback.on_train_batch_end(trainer, None)
    assert trainer.saved == [(tmp_path / "last.ckpt", 5)]


def test_requeue_targets_the_array_task_or_the_job():
    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    assert slurm_job_id({"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3"}) == "9_3"
    assert slurm_job_id({}) is None


@pytest.mark.parametrize("kwargs, message", [({"exit_code": 1}, "exit_code=1 must be in 2..125"),
                                             ({"signals": ["SIGHUP"]}, r"unknown signal\(s\) \['SIGHUP'\]")])
def test_preemption_settings_are_checked(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreemptionCheckpoint(tmp_path / "last.ckpt", **kwargs)


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = capture_random_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    AtomicCheckpointIO().save_checkpoint({"rng": state}, tmp_path / "rng.ckpt")
    torch.rand(5), np.random.rand(5), random.random()  # move every stream on
    restore_random_state(read_checkpoint(tmp_path / "rng.ckpt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 16, 16)])
def test_tokenizer_names_a_wrong_image_size_or_channel_count_and_the_expected_one(shape):
    from bar_lightning.models.conv_tokenizer import ConvFSQTokenizer

    tokenizer = ConvFSQTokenizer(image_size=16, bits_per_token=6, base_channels=16, encoder_width=32,
                                 decoder_width=32)
    with pytest.raises(ValueError, match=rf"\[B, 3, 16, 16\].*got \({', '.join(map(str, shape))}\)"):
        tokenizer.encode_bits(torch.zeros(shape))
