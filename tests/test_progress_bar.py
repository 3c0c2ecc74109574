"""Progress: the rich bar's title counts optimiser steps (`StepProgressBar`), and `ProgressLog` writes plain lines
(step, loss, lr, img/s, ETA) when the output goes to a file, where a live bar shows nothing until the run ends."""

from __future__ import annotations

import itertools
import logging
import os
import pty
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from bar_lightning.lightning.callbacks import (
    GlobalBatchMonitor,
    ProgressLog,
    StepProgressBar,
    format_duration,
    plain_lines_wanted,
)

from .conftest import ROOT

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
PROGRESS_LINE = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[-+]\d\d) \| (\d+\.\d) img/s \| ETA (\d+:\d\d:\d\d)$"
)


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


class MetricReads(L.Callback):
    """Counts the bar's metric reads after each training batch (each a host read of the logged device tensors)."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.reads_in_batch_end: list[int] = []
        original = bar.get_metrics

        def get_metrics(*args, **kwargs):
            if bar._in_train_batch_end:
                self.reads_in_batch_end[-1] += 1
            return original(*args, **kwargs)

        bar.get_metrics = get_metrics

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.reads_in_batch_end.append(0)


@pytest.mark.parametrize(("refresh_seconds", "expected"), [(1.0, [1, 0, 0, 1, 0, 0, 1]), (0.0, [1] * 7)])
def test_the_bar_reads_the_training_metrics_at_most_every_refresh_interval(tmp_path, refresh_seconds, expected):
    # The clock advances 0.4 s per read of it: with a 1 s interval the metrics are read after batches 1, 4 and 7.
    clock = partial(next, itertools.count(0.0, 0.4))
    bar = StepProgressBar(metrics_refresh_seconds=refresh_seconds, clock=clock)
    reads = MetricReads(bar)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=[reads, bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, max_steps=7, limit_val_batches=0)
    trainer.fit(LossLoggingModel())
    assert reads.reads_in_batch_end == expected
    # The loss and lr logged without prog_bar are shown all the same, the lr in scientific notation.
    shown = bar.get_metrics(trainer, None)
    assert shown["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert shown["train/lr"] == "1.0e-01"
    with pytest.raises(ValueError, match="metrics_refresh_seconds=-1"):
        StepProgressBar(metrics_refresh_seconds=-1)


# ----------------------------------------------------------------------------- ProgressLog


def tiny_training(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=tiny_generator", "trainer.max_steps=6",
            "callbacks.progress_log.log_every_n_steps=2", "trainer.enable_model_summary=false", "logger=csv",
            f"hydra.run.dir={run_dir}", *overrides]


def progress_lines(text: str) -> list[re.Match]:
    return [match for line in text.splitlines() if (match := PROGRESS_LINE.search(line))]


def test_a_run_whose_output_goes_to_a_file_writes_progress_lines_there_and_in_train_log(tmp_path):
    run_dir, captured = tmp_path / "run", tmp_path / "slurm-1.out"
    with open(captured, "w") as output:  # as `python train.py ... > log 2>&1` or a SLURM .out file
        result = subprocess.run(tiny_training(run_dir), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                env=ENVIRONMENT, timeout=300)
    text = captured.read_text()
    assert result.returncode == 0, text[-3000:]
    lines = progress_lines(text)
    assert [(int(line[1]), int(line[2])) for line in lines] == [(2, 6), (4, 6), (6, 6)], text[-3000:]
    losses, rates = [float(line[3]) for line in lines], [float(line[4]) for line in lines]
    assert all(0 < loss < 10 for loss in losses)
    assert 0 < rates[0] < rates[1] < rates[2]  # the tiny recipe's linear warm-up
    assert all(float(line[5]) > 0 for line in lines)
    assert lines[-1][6] == "0:00:00"  # nothing left at max_steps
    assert [line[0] for line in progress_lines((run_dir / "train.log").read_text())] == [line[0] for line in lines]


def run_on_a_terminal(command: list[str]) -> int:
    """Run `command` with stdout and stderr on a pseudo-terminal, reading everything it draws there."""
    terminal, terminal_side = pty.openpty()
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal_side,
                               stderr=terminal_side, env=ENVIRONMENT)
    os.close(terminal_side)
    while True:
        try:
            if not os.read(terminal, 65536):
                break
        except OSError:  # EIO: every process that had the terminal open has ended
            break
    os.close(terminal)
    return process.wait(timeout=300)


@pytest.mark.parametrize(("bar", "expected_steps"), [("true", []), ("false", [2, 4, 6])])
def test_on_a_terminal_lines_are_written_only_when_the_bar_is_off(tmp_path, bar, expected_steps):
    run_dir = tmp_path / "run"
    assert run_on_a_terminal(tiny_training(run_dir, f"trainer.enable_progress_bar={bar}")) == 0
    lines = progress_lines((run_dir / "train.log").read_text())
    assert [int(line[1]) for line in lines] == expected_steps


class LossLoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"])  # as the modules log it: no prog_bar (a host read per step)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return output


def test_lines_follow_the_step_and_time_triggers_with_rate_and_eta_from_the_interval(tmp_path, caplog):
    # The clock advances 20 s per optimiser step: the 60 s trigger fires 3 steps after the previous line, the step
    # trigger at multiples of 4, whichever comes first.
    clock = partial(next, itertools.count(0.0, 20.0))
    progress = ProgressLog(log_every_n_steps=4, log_every_n_seconds=60, plain_lines="always", clock=clock)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=9, logger=False,
                        callbacks=[progress, GlobalBatchMonitor(per_process_batch_size=2)], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    with caplog.at_level(logging.INFO, logger="bar_lightning.lightning.callbacks"):
        trainer.fit(LossLoggingModel())
    lines = [re.sub(r"loss \d+\.\d{4}", "loss L", record.getMessage()) for record in caplog.records
             if record.getMessage().startswith("step ")]
    # img/s = global batch 2 x steps / seconds since the previous line; ETA = steps left / that step rate.
    assert lines == [
        "step 3/9 | loss L | lr 1.00e-01 | 0.1 img/s | ETA 0:02:00",  # 60 s: 3 steps at 20 s
        "step 4/9 | loss L | lr 1.00e-01 | 0.1 img/s | ETA 0:01:40",  # step 4: 5 steps left at 20 s
        "step 7/9 | loss L | lr 1.00e-01 | 0.1 img/s | ETA 0:00:40",
        "step 8/9 | loss L | lr 1.00e-01 | 0.1 img/s | ETA 0:00:20",
    ]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0:00:00"), (59.6, "0:01:00"), (24492, "6:48:12"), (191222, "53:07:02"), (-3, "0:00:00"),
])
def test_eta_is_hours_minutes_seconds_with_unbounded_hours(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("mode", "terminal", "bar", "wanted"), [
    ("auto", False, True, True),    # SLURM .out, `> log`, `| tee`: the bar shows nothing there until the end
    ("auto", True, True, False),    # the live bar is drawn: no lines in between
    ("auto", True, False, True),    # trainer.enable_progress_bar=false on a terminal
    ("never", False, True, False),
    ("always", True, True, True),
])
def test_plain_lines_are_written_unless_a_live_bar_is_drawn(mode, terminal, bar, wanted):
    assert plain_lines_wanted(mode, stdout_is_terminal=terminal, progress_bar_shown=bar) is wanted


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plain_lines": "sometimes"}, "plain_lines='sometimes' must be one of auto, always, never"),
    ({"log_every_n_steps": 0}, "log_every_n_steps=0 must be positive, or null"),
    ({"log_every_n_seconds": -1}, "log_every_n_seconds=-1 must be positive, or null"),
])
def test_progress_log_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ProgressLog(**kwargs)
