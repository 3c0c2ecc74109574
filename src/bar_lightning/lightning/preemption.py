"""Preemption: a signal sets a flag; the next step boundary saves `last.ckpt` through the Trainer, then the process
exits with a distinct code (and asks SLURM to requeue the job).

Saving inside a signal handler can deadlock or corrupt a checkpoint (the handler interrupts arbitrary code, e.g. a
collective or a half-done optimiser step; Lightning issue #21406), so the handler below only records the signal.
`PreemptionCheckpoint.on_train_batch_end` checks the flag after each optimiser step, all ranks agree on it (one
boolean all-reduce), and only then `trainer.save_checkpoint` writes the checkpoint, which an identical re-run of the
command resumes from.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

# The signals a run can treat as "save and stop": SLURM sends SIGTERM at the time limit and on preemption,
# `#SBATCH --signal=USR1@<seconds>` sends SIGUSR1 ahead of the limit, and the submitit launcher
# (hydra/launcher=slurm) asks for SIGUSR2 ahead of it.
PREEMPTION_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2,
                      "SIGINT": signal.SIGINT}
# sysexits.h EX_TEMPFAIL, "temporary failure, try again": distinct from 0 (done) and 1 (an error).
DEFAULT_PREEMPTION_EXIT_CODE = 75
_SLURM_JOB_ID_PATTERN = re.compile(r"^[0-9]+(_[0-9]+)?$")


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is written; its `code` is the process exit status."""


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for an array task, else `SLURM_JOB_ID`; None off SLURM."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def request_slurm_requeue(job_id: str) -> bool:
    """Run `scontrol requeue <job_id>`; True when it succeeded. Failures are logged, never raised: the checkpoint is
    already written, and the exit code still tells the scheduler (or a wrapper script) that the run is unfinished."""
    if not _SLURM_JOB_ID_PATTERN.match(job_id):
        log.error("not requeueing: SLURM job id %r is not of the form <digits> or <digits>_<digits>", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("requeueing SLURM job %s failed: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.error("`scontrol requeue %s` failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class PreemptionCheckpoint(L.Callback):
    """Save `checkpoint_path` at the first step boundary after one of `signals`, then raise `Preempted(exit_code)`.

    `requeue=True` also runs `scontrol requeue` (global rank 0) when the process runs under SLURM. Handlers are
    installed when training starts (after Lightning installs its own, which they replace for these signals) and the
    previous ones are restored when fitting ends. With gradient accumulation the save waits for the optimiser step,
    so no accumulated gradient is lost.
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        exit_code: int = DEFAULT_PREEMPTION_EXIT_CODE,
        requeue: bool = True,
    ) -> None:
        unknown = sorted(set(signals) - set(PREEMPTION_SIGNALS))
        if unknown:
            raise ValueError(f"preemption.signals has unknown signal(s) {unknown}; use some of {sorted(PREEMPTION_SIGNALS)}")
        if not 2 <= exit_code <= 125:
            raise ValueError(
                f"preemption.exit_code={exit_code} must be in 2..125: 0 and 1 mean success and error, 126+ are "
                "reserved by shells for 'not executable' and 'killed by a signal'"
            )
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = [PREEMPTION_SIGNALS[name] for name in signals]
        self.exit_code = exit_code
        self.requeue = requeue
        self.received_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._global_step_at_last_check = 0

    # ----------------------------------------------------------------- signal side: set the flag, nothing else
    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received_signal is None:
            self.received_signal = signum

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption handlers not installed: training does not run in the main thread")
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self.handle_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # ----------------------------------------------------------------- trainer side: save at a step boundary
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received_signal = None
        self._global_step_at_last_check = trainer.global_step
        self._install_handlers()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._global_step_at_last_check:
            return  # no optimiser step in this batch (gradient accumulation): its gradients are not saved
        self._global_step_at_last_check = trainer.global_step
        # Every rank must take the same branch: save_checkpoint is collective under DDP/FSDP.
        if not trainer.strategy.reduce_boolean_decision(self.received_signal is not None, all=False):
            return
        name = signal.Signals(self.received_signal).name if self.received_signal is not None else "a signal on another rank"
        log.warning("received %s: saving %s at global step %d", name, self.checkpoint_path, trainer.global_step)
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # the full training state
        if self.requeue and trainer.is_global_zero and (job_id := slurm_job_id()) is not None:
            request_slurm_requeue(job_id)
        log.warning("stopping after preemption with exit code %d; re-run the same command to resume", self.exit_code)
        raise Preempted(self.exit_code)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()


class SendSignalAtStep(L.Callback):
    """Preemption drill: the process sends itself `signal` once global step `step` is done (rank `rank` only).

    It goes through the real signal path, so it tests the whole preemption contract on a cluster or in CI:
    `+callbacks.drill._target_=bar_lightning.lightning.preemption.SendSignalAtStep +callbacks.drill.step=20`.
    A resumed run starts after `step`, so re-running the same command does not fire it again.
    """

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int = 0) -> None:
        if signal not in PREEMPTION_SIGNALS:
            raise ValueError(f"signal={signal!r} is not one of {sorted(PREEMPTION_SIGNALS)}")
        self.step = step
        self.signum = PREEMPTION_SIGNALS[signal]
        self.rank = rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
