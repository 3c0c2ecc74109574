"""Ctrl-C (SIGINT) during training: the first saves `last.ckpt` at the step boundary and exits with 130 (never
requeueing), a second stops at once without saving; in-process with the real handlers, then through train.py."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bar_lightning.lightning import preemption
from bar_lightning.lightning.preemption import (
    DEFAULT_PREEMPTION_EXIT_CODE,
    INTERRUPT_EXIT_CODE,
    Interrupted,
    Preempted,
    PreemptionCheckpoint,
)

from .conftest import ROOT

ACKNOWLEDGED = ("Ctrl-C: saving a checkpoint at the end of this step; press Ctrl-C again to stop at once without "
                "saving")
SAVED = re.compile(r"Saved (\S+) at step (\d+); run the same command to resume from it")
DRILL = "+callbacks.drill._target_=bar_lightning.lightning.preemption.SendSignalAtStep"
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- in process, real signal handlers


class RecordingTrainer(SimpleNamespace):
    def save_checkpoint(self, path, weights_only=False):
        self.saved.append((Path(path), self.global_step))


def started(callback: PreemptionCheckpoint, step: int) -> RecordingTrainer:
    """A one-process trainer at `step` on which `callback` has installed its handlers."""
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    trainer = RecordingTrainer(global_step=step, strategy=strategy, is_global_zero=True, saved=[])
    callback.on_fit_start(trainer, None)
    callback.on_train_start(trainer, None)
    return trainer


@pytest.fixture
def requeues(monkeypatch) -> list[str]:
    """SLURM job 4242, with `scontrol requeue` recorded instead of run."""
    calls: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(preemption, "request_slurm_requeue", calls.append)
    return calls


def test_first_ctrl_c_is_acknowledged_at_once_and_the_step_boundary_saves_exits_130_without_requeue(
    tmp_path, caplog, requeues
):
    handler_before = signal.getsignal(signal.SIGINT)
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=6)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the real handler runs here, and returns
        callback.join_messages(timeout=10)
        assert [record.getMessage() for record in caplog.records] == [ACKNOWLEDGED]
        assert trainer.saved == []
        trainer.global_step = 7
        with pytest.raises(Interrupted) as stopped:
            callback.on_train_batch_end(trainer, None)
    finally:
        callback.teardown(trainer, None, "fit")
    assert stopped.value.code == INTERRUPT_EXIT_CODE == 130
    assert trainer.saved == [(tmp_path / "last.ckpt", 7)]
    assert caplog.records[-1].getMessage() == (
        f"Saved {tmp_path / 'last.ckpt'} at step 7; run the same command to resume from it"
    )
    assert requeues == []
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler of before the run is back


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path, caplog):
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=3)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)  # raised from the handler, before any step boundary
        # A third Ctrl-C would now end the process outright, e.g. one stuck while unwinding.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        callback.teardown(trainer, None, "fit")  # waits for the handler's lines
    assert stopped.value.code == 130
    assert trainer.saved == []
    assert caplog.records[-1].getMessage() == "second Ctrl-C: stopping at once without saving (exit code 130)"


class StreamThatIsInterrupted(io.StringIO):
    """A console stream that receives Ctrl-C in the middle of flushing a line, as a rank did in CI, and records any
    write that arrives while it is still inside that flush (a real BufferedWriter raises there)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushing = False
        self.reentrant_writes: list[str] = []
        self.interrupt_next_flush = False

    def write(self, text: str) -> int:
        if self.flushing:
            self.reentrant_writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushing = True
        try:
            if self.interrupt_next_flush:
                self.interrupt_next_flush = False
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # bytecodes inside the flush: the Python-level handler runs among them
                    pass
        finally:
            self.flushing = False
        super().flush()


def test_ctrl_c_arriving_inside_a_log_write_is_logged_once_after_it(tmp_path):
    stream = StreamThatIsInterrupted()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("bar_lightning")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=3)
    try:
        stream.interrupt_next_flush = True
        logger.info("step 3/200 | loss 1.0")  # the progress line being written when Ctrl-C arrives
        callback.join_messages(timeout=10)
    finally:
        callback.teardown(trainer, None, "fit")
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert stream.reentrant_writes == []
    assert stream.getvalue().splitlines() == ["step 3/200 | loss 1.0", ACKNOWLEDGED]
    assert callback.interrupts == 1


def test_a_preemption_signal_wins_over_ctrl_c(tmp_path, requeues):
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=6)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler wants the job back: it must come back requeued
        trainer.global_step = 7
        with pytest.raises(Preempted) as stopped:
            callback.on_train_batch_end(trainer, None)
    finally:
        callback.teardown(trainer, None, "fit")
    assert stopped.value.code == DEFAULT_PREEMPTION_EXIT_CODE
    assert trainer.saved == [(tmp_path / "last.ckpt", 7)]
    assert requeues == ["4242"]


def test_a_rank_without_the_signal_saves_with_the_others_and_exits_130(tmp_path):
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=6)
    callback.teardown(trainer, None, "fit")
    # Another rank got the Ctrl-C: the first all-reduce says stop, the second says nobody was preempted.
    decisions = iter([True, False])
    trainer.strategy.reduce_boolean_decision = lambda decision, all=True: next(decisions)
    trainer.is_global_zero = False
    trainer.global_step = 7
    with pytest.raises(Interrupted):
        callback.on_train_batch_end(trainer, None)
    assert trainer.saved == [(tmp_path / "last.ckpt", 7)]  # save_checkpoint is collective: every rank calls it


def test_a_forked_data_loader_worker_ignores_ctrl_c(tmp_path):
    callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
    trainer = started(callback, step=0)
    try:
        child = os.fork()
        if child == 0:  # as a DataLoader worker: forked after fitting started, so it inherits the handler
            try:
                os.kill(os.getpid(), signal.SIGINT)
                os._exit(10 + callback.interrupts)
            except BaseException:
                os._exit(99)
        _, status = os.waitpid(child, 0)
    finally:
        callback.teardown(trainer, None, "fit")
    assert os.waitstatus_to_exitcode(status) == 10  # alive, and the Ctrl-C was left to the training process
    assert callback.interrupts == 0


def test_sigint_is_either_a_ctrl_c_or_a_preemption_signal(tmp_path):
    with pytest.raises(ValueError, match="preemption.signals lists SIGINT while preemption.interrupt=true"):
        PreemptionCheckpoint(tmp_path / "last.ckpt", signals=["SIGTERM", "SIGINT"])
    assert PreemptionCheckpoint(tmp_path / "last.ckpt", signals=["SIGINT"], interrupt=False).signals == [signal.SIGINT]


# ----------------------------------------------------------------------------- through train.py


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=tiny_generator", *overrides, *QUIET,
            f"hydra.run.dir={run_dir}"]


def run(command: list[str], environment: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment or ENVIRONMENT, timeout=300)
    return result.returncode, result.stdout


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_ctrl_c_saves_at_the_step_boundary_exits_130_and_the_same_command_resumes(tmp_path):
    # Under SLURM (a stub `scontrol` records any call): a Ctrl-C is the user's, so the job is never requeued.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, scontrol = tmp_path / "scontrol_calls.txt", bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {**ENVIRONMENT, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
             "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    command = train_command(run_dir, "trainer.max_steps=8", DRILL, "+callbacks.drill.step=3",
                            "+callbacks.drill.signal=SIGINT")

    code, output = run(command, slurm)
    assert code == 130, output[-3000:]
    assert ACKNOWLEDGED in output
    assert f"Saved {last} at step 3; run the same command to resume from it" in output
    assert global_step(last) == 3
    assert not calls.exists()

    code, output = run(command, slurm)
    assert code == 0, output[-3000:]
    assert f"Resuming from {last} at step 3" in output
    assert global_step(last) == 8
    assert not calls.exists()


def test_a_second_ctrl_c_during_the_save_stops_without_writing_it(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    # The periodic save at step 4 writes step_00000004.ckpt and last.ckpt; the Ctrl-C after step 5 is repeated
    # while the checkpoint of step 5 is being assembled.
    code, output = run(train_command(run_dir, "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=4",
                                     DRILL, "+callbacks.drill.step=5", "+callbacks.drill.signal=SIGINT",
                                     "+callbacks.drill.again_during_save=true"))
    assert code == 130, output[-3000:]
    assert ACKNOWLEDGED in output
    assert "second Ctrl-C: stopping at once without saving (exit code 130)" in output
    assert not SAVED.search(output)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step_00000004.ckpt"]  # no temporary
    assert global_step(checkpoints / "last.ckpt") == 4


# ddp_cpu once printed the acknowledgement twice: the SIGINT arrived while rank 0 was flushing a progress line and
# the handler logged into the same stream (test_ctrl_c_arriving_inside_a_log_write_is_logged_once_after_it).
@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_a_terminal_ctrl_c_reaching_every_process_saves_one_checkpoint(tmp_path, trainer):
    # A terminal sends Ctrl-C to the whole foreground process group: every DDP rank and every DataLoader worker.
    run_dir = tmp_path / "run"
    command = train_command(run_dir, f"trainer={trainer}", "trainer.max_steps=200", "data.batch_size=16",
                            "data.num_workers=1", "callbacks.progress_log.log_every_n_steps=1")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=ENVIRONMENT, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "step 3/200 |" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=300)
    output = "".join(lines) + rest
    assert process.returncode == 130, output[-3000:]
    saved = SAVED.findall(output)
    assert len(saved) == 1 and output.count(ACKNOWLEDGED) == 1, output[-3000:]  # global rank 0 speaks
    path, step = saved[0]
    assert path == str(run_dir / "checkpoints" / "last.ckpt")
    assert [entry.name for entry in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert 3 <= global_step(Path(path)) == int(step) < 200


def test_sigint_listed_as_a_preemption_signal_with_interrupt_on_is_refused_before_training(tmp_path):
    code, output = run(train_command(tmp_path / "run", "preemption.signals=[SIGTERM,SIGINT]"))
    assert code == 1
    assert ("Error: ConfigError: preemption.signals lists SIGINT while preemption.interrupt=true handles it; remove "
            "it from preemption.signals, or set preemption.interrupt=false") in output


def test_ctrl_c_outside_fitting_is_one_line_and_exit_130(monkeypatch, capsys):
    from bar_lightning.cli import report_user_errors

    def building_the_model(cfg):
        raise KeyboardInterrupt

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("BAR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stopped:
        report_user_errors(building_the_model)(None)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "Interrupted (Ctrl-C) outside a training step: nothing new was saved; files written before are kept "
        "(exit code 130)"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback on request
    with pytest.raises(KeyboardInterrupt):
        report_user_errors(building_the_model)(None)
