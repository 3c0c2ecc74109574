"""Runs that collide or die: two processes in one folder, stale locks, SIGKILL during saves, resume choices.

Each probe asserts what a user relies on: a second process stops at once naming the holder, a dead holder's lock
is taken over, a killed save never damages `last.ckpt` and its leftovers are removed at the next start, a resume
takes the most advanced checkpoint of this run, and nothing more advanced (or another run's) is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bar_lightning.io import remove_stale_temporaries
from bar_lightning.lightning.checkpointing import (
    RUN_IDENTITY_KEY,
    AtomicCheckpointIO,
    CheckpointConflictError,
    identity_hash,
    read_checkpoint,
)
from bar_lightning.run import resolve_ckpt_path
from bar_lightning.run_lock import LOCK_NAME, RunDirectoryLocked, RunLock, is_main_process, run_lock

from .conftest import ROOT

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HOLD_LOCK = (
    "import sys, time\n"
    "from bar_lightning.run_lock import RunLock\n"
    "RunLock(sys.argv[1], purpose=sys.argv[2]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def hold_lock(folder: Path, purpose: str = "train.py") -> subprocess.Popen:
    """Another process holding `folder`'s lock (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), purpose], stdout=subprocess.PIPE,
                              text=True, env=ENVIRONMENT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def tiny_train(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=tiny_generator", f"hydra.run.dir={run_dir}",
            "data.synthetic_num_samples=64", "data.val_num_samples=0", *QUIET, *overrides]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT)


# ------------------------------------------------------------------------------------------------ one process per folder


def test_a_second_training_in_a_running_run_directory_stops_at_once_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    command = tiny_train(run_dir, "trainer.max_steps=1000000", "callbacks.model_checkpoint.every_n_train_steps=1000000")
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=ENVIRONMENT)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first run holds the folder from its start to its end
        second = run(command)
    finally:
        first.send_signal(signal.SIGTERM)  # a preemption: the first saves at the next step and exits with 75
        first_output = first.communicate(timeout=300)[0]
    assert first.returncode == 75, first_output[-3000:]
    refused_output = second.stdout + second.stderr
    assert second.returncode == 1
    # The last line names the holder; no traceback; nothing was written into the folder (.hydra/, train.log).
    assert "Traceback" not in refused_output
    assert refused_output.strip().splitlines()[-1].startswith("RunDirectoryLocked: ")
    assert f"is in use by train.py (PID {first.pid} on" in refused_output
    assert socket.gethostname() in refused_output and f"delete {run_dir / LOCK_NAME}" in refused_output
    assert "experiment=tiny_generator" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] > 0  # the first run's work is kept
    assert not (run_dir / LOCK_NAME).exists()  # released by the first run's preemption exit


def test_a_locked_folder_stops_evaluate_and_pretokenize_at_once(tmp_path, tokenizer_checkpoint):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from bar_lightning.eval.evaluate import run_evaluation
    from bar_lightning.pretokenize import run_pretokenize

    folder = tmp_path / "shared"
    holder = hold_lock(folder, purpose="evaluate.py")
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            evaluate_cfg = compose("evaluate", overrides=[f"generator.checkpoint={tmp_path / 'absent.ckpt'}"])
            pretokenize_cfg = compose("pretokenize", overrides=[f"tokenizer.checkpoint={tokenizer_checkpoint}",
                                                                f"output_dir={folder}", "data.image_folder=/absent"])
        with open_dict(evaluate_cfg):
            evaluate_cfg.paths.output_dir = str(folder)
        started = time.perf_counter()
        with pytest.raises(RunDirectoryLocked, match=rf"in use by evaluate.py \(PID {holder.pid} on "):
            run_evaluation(evaluate_cfg)  # before the (missing) checkpoint is even looked at
        with pytest.raises(RunDirectoryLocked, match=rf"PID {holder.pid}.*delete .*{LOCK_NAME}"):
            run_pretokenize(pretokenize_cfg)
        assert time.perf_counter() - started < 5
    finally:
        holder.kill()
        holder.wait()
    assert sorted(path.name for path in folder.iterdir()) == [".run.lock.guard", LOCK_NAME]  # nothing was written


def test_a_killed_holder_is_taken_over_and_its_leftovers_removed_by_the_next_run(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    leftover = run_dir / "checkpoints" / ".last.ckpt.ab12cd_9.tmp"  # what a save killed mid-write leaves
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 1000)
    unrelated = run_dir / "checkpoints" / "notes.tmp"
    unrelated.write_text("mine")
    result = run(tiny_train(run_dir, "trainer.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Taking over the stale lock {run_dir / LOCK_NAME}" in log and f"PID {holder.pid} is not running" in log
    assert "Removed" in log and not leftover.exists() and unrelated.read_text() == "mine"
    assert not (run_dir / LOCK_NAME).exists()


def test_stale_and_live_holders(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    lock_path = folder / LOCK_NAME

    def plant(**fields) -> None:
        holder = {"purpose": "train.py", "host": socket.gethostname(), "pid": os.getppid(), "token": "t",
                  "started": "yesterday", **fields}
        lock_path.write_text(json.dumps(holder))

    # A live process on this host (the test runner's parent) with the recorded start time: respected.
    from bar_lightning.run_lock import _process_start_ticks

    plant(process_start_ticks=_process_start_ticks(os.getppid()))
    with pytest.raises(RunDirectoryLocked, match=rf"PID {os.getppid()} on {socket.gethostname()}"):
        RunLock(folder, purpose="train.py").acquire()
    # The same PID with another start time: the PID was reused, the holder is gone.
    plant(process_start_ticks=1)
    with caplog.at_level(logging.WARNING):
        lock = RunLock(folder, purpose="train.py").acquire()
    assert "is now another process" in caplog.text
    lock.release()
    assert not lock_path.exists()
    # Another host cannot be checked: respected, with the way out.
    plant(host="node-elsewhere", pid=4242)
    with pytest.raises(RunDirectoryLocked, match=rf"PID 4242 on node-elsewhere.*delete {lock_path}"):
        RunLock(folder, purpose="train.py").acquire()
    # ... unless it was an earlier attempt of this SLURM job, requeued onto another node.
    plant(host="node-elsewhere", pid=4242, slurm_job="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(RunDirectoryLocked):  # the same attempt (e.g. a second step of the job): respected
        RunLock(folder, purpose="train.py").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunLock(folder, purpose="train.py") as lock:
        assert json.loads(lock_path.read_text())["slurm_restart_count"] == 1
    # An unreadable lock is respected (its holder is unknown) and the message says what to do.
    lock_path.write_text("{not json")
    with pytest.raises(RunDirectoryLocked, match="holder cannot be read.*delete"):
        RunLock(folder, purpose="train.py").acquire()


def test_a_lock_held_in_this_process_is_not_taken_twice_and_other_ranks_share_it(tmp_path, monkeypatch):
    with RunLock(tmp_path, purpose="evaluate.py"):
        with pytest.raises(RunDirectoryLocked, match="in use by evaluate.py"):
            RunLock(tmp_path, purpose="evaluate.py").acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    for variable, value, main in (("RANK", "1", False), ("LOCAL_RANK", "2", False), ("SLURM_PROCID", "0", True),
                                  ("RANK", "0", True)):
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("SLURM_PROCID", raising=False)
        monkeypatch.setenv(variable, value)
        assert is_main_process() is main
        with run_lock(tmp_path / variable, purpose="train.py") as lock:
            assert (lock is not None) is main and (tmp_path / variable / LOCK_NAME).exists() is main


def test_many_processes_racing_for_one_stale_lock_give_exactly_one_holder(tmp_path):
    folder = tmp_path / "race"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17, "token": "dead"}))
    script = (
        "import sys, time\n"
        "from bar_lightning.run_lock import RunLock, RunDirectoryLocked\n"
        "time.sleep(float(sys.argv[2]) - time.time())\n"
        "try:\n"
        "    RunLock(sys.argv[1], purpose='race').acquire(); print('won', flush=True); time.sleep(3)\n"
        "except RunDirectoryLocked:\n"
        "    print('refused', flush=True)\n"
    )
    start_at = str(time.time() + 3)
    racers = [subprocess.Popen([sys.executable, "-c", script, str(folder), start_at], stdout=subprocess.PIPE,
                               text=True, env=ENVIRONMENT) for _ in range(6)]
    results = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert results == ["refused"] * 5 + ["won"]


# ------------------------------------------------------------------------------------------------ killed saves

SAVE_LOOP = (
    "import sys, time, torch\n"
    "from bar_lightning.lightning.checkpointing import AtomicCheckpointIO\n"
    "target, step, stall_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "real_save = torch.save\n"
    "def save(obj, file, *args, **kwargs):\n"
    "    if obj['global_step'] == stall_at:  # half-way through writing this one, wait to be killed\n"
    "        file.write(b'PK' + bytes(1 << 20)); file.flush(); print('mid-save', flush=True); time.sleep(60)\n"
    "    return real_save(obj, file, *args, **kwargs)\n"
    "torch.save = save\n"
    "io = AtomicCheckpointIO()\n"
    "while True:\n"
    "    step += 1\n"
    "    checkpoint = {'state_dict': {'w': torch.full((4_000_000,), float(step))}, 'global_step': step,\n"
    "                  'loops': {}, 'optimizer_states': []}\n"
    "    io.save_checkpoint(checkpoint, target)\n"
    "    print(step, flush=True)\n"
)


def test_kill_9_during_saves_never_damages_the_checkpoint_and_leftovers_go_at_the_next_start(tmp_path):
    folder = tmp_path / "checkpoints"
    target = folder / "last.ckpt"
    rng = random.Random(0)
    last_saved = 0
    for attempt in range(6):
        # Even attempts die inside a save for sure; odd ones at a random moment (often inside torch's own write).
        stall_at = last_saved + 3 if attempt % 2 == 0 else -1
        saver = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(target), str(last_saved), str(stall_at)],
                                 stdout=subprocess.PIPE, text=True, env=ENVIRONMENT)
        lines = [saver.stdout.readline().strip()]  # one save completed
        if stall_at > 0:
            while lines[-1] != "mid-save":
                lines.append(saver.stdout.readline().strip())
        else:
            time.sleep(rng.uniform(0.0, 0.2))
        os.kill(saver.pid, signal.SIGKILL)
        lines += saver.communicate()[0].split()
        completed = [int(line) for line in lines if line.isdigit()]
        saved = read_checkpoint(target)
        # The file is whole and holds the last completed save (a kill may fall between the rename and the print).
        assert saved["global_step"] >= max(completed)
        if stall_at > 0:
            assert saved["global_step"] == stall_at - 1
        assert torch.equal(saved["state_dict"]["w"], torch.full((4_000_000,), float(saved["global_step"])))
        last_saved = saved["global_step"]
    leftovers = sorted(path for path in folder.iterdir() if path.name != "last.ckpt")
    # The three saves killed for sure each left a partly written temporary file; random kills may add more.
    assert sum(path.stat().st_size >= 1 << 20 for path in leftovers) >= 3
    assert sorted(remove_stale_temporaries(folder)) == leftovers
    assert [path.name for path in folder.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------ resume choices

IDENTITY = {"task": "generator", "seed": 1, "model": {"hidden_size": 8}}


def checkpoint(step: int, identity: dict | None = IDENTITY) -> dict:
    content = {"state_dict": {"w": torch.full((2,), float(step))}, "global_step": step, "loops": {},
               "optimizer_states": []}
    if identity is not None:
        content[RUN_IDENTITY_KEY] = {"config_hash": identity_hash(identity), "identity": identity}
    return content


def run_config(run_dir: Path, ckpt_path: str | None = None, **identity):
    return OmegaConf.create({"ckpt_path": ckpt_path, "paths": {"output_dir": str(run_dir)},
                             **{**IDENTITY, **identity}})


def test_resume_takes_the_most_advanced_checkpoint_not_the_newest_file(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(20), folder / "step_00000020.ckpt")
    io.save_checkpoint(checkpoint(20), folder / "last.ckpt")
    io.save_checkpoint(checkpoint(10), folder / "step_00000010.ckpt")
    io.save_checkpoint(checkpoint(5), folder / "copied-later.ckpt")  # an old file copied in: the newest mtime
    os.utime(folder / "copied-later.ckpt", (time.time() + 100, time.time() + 100))
    with caplog.at_level(logging.INFO):
        assert resolve_ckpt_path(run_config(tmp_path)) == str(folder / "last.ckpt")  # step 20; last.ckpt on the tie
    assert f"Resuming from {folder / 'last.ckpt'} at step 20" in caplog.text
    # Without identities (checkpoints of earlier versions) the step still decides.
    legacy = tmp_path / "legacy"
    io.save_checkpoint(checkpoint(7, identity=None), legacy / "checkpoints" / "step_00000007.ckpt")
    io.save_checkpoint(checkpoint(3, identity=None), legacy / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(run_config(legacy)).endswith("step_00000007.ckpt")


def test_another_runs_checkpoint_is_never_taken_nor_overwritten(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint(checkpoint(30, {**IDENTITY, "seed": 2}), folder / "last.ckpt")
    with caplog.at_level(logging.WARNING), pytest.raises(
        CheckpointConflictError, match=r"another run \(e\.g\. last\.ckpt at step 30: seed: 1 here, 2 in the file\)"
    ):
        resolve_ckpt_path(run_config(tmp_path))
    assert "Not resuming from" in caplog.text and "written by another run" in caplog.text
    # A named file from another run may start this run, in a folder that holds nothing of another run.
    elsewhere = tmp_path / "fresh"
    assert resolve_ckpt_path(run_config(elsewhere, ckpt_path=str(folder / "last.ckpt"))) == str(folder / "last.ckpt")


def test_a_less_advanced_start_never_overwrites_later_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(10), folder / "step_00000010.ckpt")
    io.save_checkpoint(checkpoint(40), folder / "last.ckpt")
    with pytest.raises(CheckpointConflictError, match=r"last\.ckpt at step 40, later than this run's start "
                                                      r"\(ckpt_path=.*step_00000010\.ckpt, step 10\)"):
        resolve_ckpt_path(run_config(tmp_path, ckpt_path=str(folder / "step_00000010.ckpt")))
    # The checkpoint I/O itself refuses to go back, whoever calls it.
    with pytest.raises(CheckpointConflictError, match=r"not writing step 12 over .*last\.ckpt, which holds step 40"):
        io.save_checkpoint(checkpoint(12), folder / "last.ckpt")
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 40
    io.save_checkpoint(checkpoint(41), folder / "last.ckpt")  # forwards is fine
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 41


# `make test-full` only: 16-38 s of fresh processes, kept out of `make test` so that CI stays under 20 minutes.
@pytest.mark.slow
def test_train_resumes_from_the_most_advanced_checkpoint_after_an_old_one_is_copied_in(tmp_path):
    run_dir = tmp_path / "run"
    first = run(tiny_train(run_dir, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_dir / "checkpoints"
    (folder / "restored-from-backup.ckpt").write_bytes((folder / "step_00000003.ckpt").read_bytes())
    step_6 = (folder / "step_00000006.ckpt").read_bytes()
    second = run(tiny_train(run_dir, "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=3"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {folder / 'last.ckpt'} at step 6" in second.stdout + second.stderr
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 8
    assert (folder / "step_00000006.ckpt").read_bytes() == step_6
    # The same command with another seed is another run: it refuses instead of overwriting.
    third = run(tiny_train(run_dir, "trainer.max_steps=8", "seed=7"))
    assert third.returncode != 0 and "of another run" in third.stdout + third.stderr
    assert "seed: 7 here, 42 in the file" in third.stdout + third.stderr
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 8
