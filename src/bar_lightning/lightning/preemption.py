"""Preemption: a signal sets a flag; the next step boundary saves `last.ckpt` through the Trainer, then the process
exits with a distinct code (and asks SLURM to requeue the job).

Saving inside a signal handler can deadlock or corrupt a checkpoint (the handler interrupts arbitrary code, e.g. a
collective or a half-done optimiser step; Lightning issue #21406), so the handler below only records the signal.
`PreemptionCheckpoint.on_train_batch_end` checks the flag after each optimiser step, all ranks agree on it (one
boolean all-reduce), and only then `trainer.save_checkpoint` writes the checkpoint, which an identical re-run of the
command resumes from.

Ctrl-C (SIGINT, `interrupt=True`) takes the same path with three differences: the first one is acknowledged at once,
the process exits with 130 (128 + SIGINT, what shells expect from an interrupted program) and never requeues, and a
second Ctrl-C before the save is done stops at once without saving.

The handlers never log themselves: a Python signal handler runs between two bytecodes of the main thread, which may
be inside a logging handler's write to the same stream, and a second write from the handler fails there
("reentrant call inside <_io.BufferedWriter>", printed as a logging error with the message twice). Their lines are
logged by a short-lived thread, which waits for the logging lock the main thread holds and writes after it.
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
from typing import Any, NoReturn

import lightning as L

from bar_lightning.config.schema import PREEMPTION_SIGNALS

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, try again": distinct from 0 (done) and 1 (an error).
DEFAULT_PREEMPTION_EXIT_CODE = 75
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT
_SLURM_JOB_ID_PATTERN = re.compile(r"^[0-9]+(_[0-9]+)?$")


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is written; its `code` is the process exit status."""


class Interrupted(SystemExit):
    """Raised after a Ctrl-C: once its checkpoint is written, or at once on a second Ctrl-C; code 130."""


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

    `interrupt=True` handles SIGINT too: the first one saves at the next step boundary like a preemption signal but
    exits with `Interrupted(130)` and never requeues (a preemption signal on any rank wins: 75 and requeue); a second
    one raises `Interrupted(130)` from the handler, so nothing more is saved. Its handler is installed when fitting
    starts, before the DataLoader workers are forked: they inherit it and ignore SIGINT (a terminal's Ctrl-C reaches
    them too, and a worker that stopped would fail the next batch before the step boundary).
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        exit_code: int = DEFAULT_PREEMPTION_EXIT_CODE,
        requeue: bool = True,
        interrupt: bool = True,
    ) -> None:
        unknown = sorted(set(signals) - set(PREEMPTION_SIGNALS))
        if unknown:
            raise ValueError(f"preemption.signals has unknown signal(s) {unknown}; use some of {sorted(PREEMPTION_SIGNALS)}")
        if interrupt and "SIGINT" in signals:
            raise ValueError(
                "preemption.signals lists SIGINT while preemption.interrupt=true handles it (save, exit 130, no "
                "requeue); remove SIGINT from preemption.signals, or set preemption.interrupt=false to treat it as a "
                "preemption signal"
            )
        if not 2 <= exit_code <= 125:
            raise ValueError(
                f"preemption.exit_code={exit_code} must be in 2..125: 0 and 1 mean success and error, 126+ are "
                "reserved by shells for 'not executable' and 'killed by a signal'"
            )
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = [PREEMPTION_SIGNALS[name] for name in signals]
        self.exit_code = exit_code
        self.requeue = requeue
        self.interrupt = interrupt
        self.received_signal: int | None = None
        self.interrupts = 0
        self._previous_handlers: dict[int, Any] = {}
        self._global_step_at_last_check = 0
        # Set when the handlers are installed: the process that trains, and whether it logs (global rank 0).
        self._training_pid: int | None = None
        self._is_global_zero = True
        self._messages: list[threading.Thread] = []

    # ----------------------------------------------------------------- signal side: set the flag, nothing else
    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received_signal is None:
            self.received_signal = signum

    def handle_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._training_pid:
            return  # a forked DataLoader worker: the training process decides, the worker keeps serving batches
        self.interrupts += 1
        if self.interrupts == 1:
            if self._is_global_zero:
                self._log_outside_the_handler("Ctrl-C: saving a checkpoint at the end of this step; press Ctrl-C "
                                              "again to stop at once without saving")
            return
        # From here a further Ctrl-C kills the process outright, e.g. one that hangs while unwinding.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._is_global_zero:
            self._log_outside_the_handler(f"second Ctrl-C: stopping at once without saving (exit code "
                                          f"{INTERRUPT_EXIT_CODE})")
        raise Interrupted(INTERRUPT_EXIT_CODE)

    def _log_outside_the_handler(self, message: str) -> None:
        # See the module docstring: the main thread may be inside this very logging call's stream.
        thread = threading.Thread(target=log.warning, args=("%s", message), name="ctrl-c-message")
        thread.start()
        self._messages.append(thread)

    def join_messages(self, timeout: float | None = None) -> None:
        """Wait until the lines the signal handlers asked for are logged (in order before what follows them)."""
        for thread in self._messages:
            thread.join(timeout)
        self._messages = [thread for thread in self._messages if thread.is_alive()]

    def _install_handlers(self, signals: list[int], handler: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption handlers not installed: training does not run in the main thread")
            return
        for signum in signals:
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # ----------------------------------------------------------------- trainer side: save at a step boundary
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupts = 0
        self._is_global_zero = trainer.is_global_zero
        self._training_pid = os.getpid()
        if self.interrupt:
            self._install_handlers([signal.SIGINT], self.handle_interrupt)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own SIGTERM handler (installed after on_fit_start), which ours replace.
        self.received_signal = None
        self._global_step_at_last_check = trainer.global_step
        self._install_handlers(self.signals, self.handle_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._global_step_at_last_check:
            return  # no optimiser step in this batch (gradient accumulation): its gradients are not saved
        self._global_step_at_last_check = trainer.global_step
        self.join_messages(timeout=10.0)  # the Ctrl-C acknowledgement comes before the "Saved" line
        # Every rank must take the same branch: save_checkpoint is collective under DDP/FSDP.
        stop = self.received_signal is not None or self.interrupts > 0
        if not trainer.strategy.reduce_boolean_decision(stop, all=False):
            return
        # Reached by every rank once one of them has a signal; a preemption signal anywhere wins over a Ctrl-C.
        if not trainer.strategy.reduce_boolean_decision(self.received_signal is not None, all=False):
            self._save_after_interrupt(trainer)
        name = signal.Signals(self.received_signal).name if self.received_signal is not None else "a signal on another rank"
        log.warning("received %s: saving %s at global step %d", name, self.checkpoint_path, trainer.global_step)
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # the full training state
        if self.requeue and trainer.is_global_zero and (job_id := slurm_job_id()) is not None:
            request_slurm_requeue(job_id)
        log.warning("stopping after preemption with exit code %d; re-run the same command to resume", self.exit_code)
        raise Preempted(self.exit_code)

    def _save_after_interrupt(self, trainer: L.Trainer) -> NoReturn:
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # a second Ctrl-C here stops it unwritten
        if trainer.is_global_zero:
            log.warning("Saved %s at step %d; run the same command to resume from it", self.checkpoint_path,
                        trainer.global_step)
        raise Interrupted(INTERRUPT_EXIT_CODE)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        self.join_messages(timeout=5.0)


class SendSignalAtStep(L.Callback):
    """Preemption drill: the process sends itself `signal` once global step `step` is done (rank `rank` only).

    It goes through the real signal path, so it tests the whole preemption contract on a cluster or in CI:
    `+callbacks.drill._target_=bar_lightning.lightning.preemption.SendSignalAtStep +callbacks.drill.step=20`.
    A resumed run starts after `step`, so re-running the same command does not fire it again. `again_during_save`
    sends the signal a second time while the checkpoint of that step is being assembled (before a byte of it is
    written): `+callbacks.drill.signal=SIGINT +callbacks.drill.again_during_save=true` is an impatient Ctrl-C.
    """

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int = 0, again_during_save: bool = False) -> None:
        if signal not in PREEMPTION_SIGNALS:
            raise ValueError(f"signal={signal!r} is not one of {sorted(PREEMPTION_SIGNALS)}")
        self.step = step
        self.signum = PREEMPTION_SIGNALS[signal]
        self.rank = rank
        self.again_during_save = again_during_save
        self.signals_sent = 0

    def _fires(self, trainer: L.Trainer) -> bool:
        return trainer.global_step == self.step and trainer.global_rank == self.rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._fires(trainer) and self.signals_sent == 0:
            self.signals_sent = 1
            os.kill(os.getpid(), self.signum)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.again_during_save and self._fires(trainer) and self.signals_sent == 1:
            self.signals_sent = 2
            os.kill(os.getpid(), self.signum)
