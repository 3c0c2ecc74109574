"""One process per output folder: train.py, evaluate.py and pretokenize.py each hold a lock file in theirs.

The lock file (``<folder>/run.lock``) is JSON naming its holder: host, PID, the process's start time, the command
and, under SLURM, the job. A second process that finds it stops at once with a message naming the holder, before
it reads or writes anything in the folder. A lock whose holder is gone is taken over with a warning:

* the holder ran on this host and its PID is not running (or is now another process: its start time differs);
* the holder was an earlier attempt of this SLURM job (same job id and array task, a lower
  ``SLURM_RESTART_COUNT``): a requeued job resumes in its own folder on whichever node it lands.

A holder on another host that is not a previous attempt of this job cannot be checked, so the lock is respected;
the message says how to remove it when that process is known to be gone.

Only the main process of a job takes the lock (global rank 0: ``RANK`` / ``SLURM_PROCID`` / ``LOCAL_RANK`` unset
or 0); the other ranks of a DDP or torchrun job share it. Taking over a stale lock is serialised with ``flock`` on a
guard file where the file system supports it, so two processes never both take over the same stale lock. The lock
is removed when the holder exits (normally, with an error, or on a preemption exit); a SIGKILL leaves it behind, and
the next attempt takes it over as stale.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_GUARD_NAME = ".run.lock.guard"
# Environment variables that give a process's global rank, in the order Lightning reads them.
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK")


# The locks this process holds now, by real folder path: taking a held folder again is a no-op (the Hydra callback
# takes it before Hydra writes into the run folder, the task function again), and a lock file naming this PID is
# stale only when none of these is it.
_HELD: dict[str, RunLock] = {}


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the folder; the message names it and what to do."""


def is_main_process() -> bool:
    """Whether this process is global rank 0 of its job (or not part of a multi-process job)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip():
            try:
                return int(value) == 0
            except ValueError:
                return False
    return True


def _process_start_ticks(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused PID from its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: the fields after it follow the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else job


def _slurm_restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _this_holder(purpose: str) -> dict[str, Any]:
    return {
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start_ticks": _process_start_ticks(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job": _slurm_job(),
        "slurm_restart_count": _slurm_restart_count(),
        "command": " ".join(sys.argv)[:500],
        "token": uuid.uuid4().hex,
    }


def describe_holder(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (
        f"{holder.get('purpose', 'a process')} (PID {holder.get('pid')} on {holder.get('host')}, started "
        f"{holder.get('started')}{job})"
    )


def _why_stale(holder: dict[str, Any]) -> str | None:
    """Why the holder of a lock is known to be gone, or None when it may still be running."""
    job = _slurm_job()
    holder_restarts = holder.get("slurm_restart_count")
    if (
        job is not None and holder.get("slurm_job") == job
        and (holder_restarts if isinstance(holder_restarts, int) else 0) < _slurm_restart_count()
    ):
        return f"it was an earlier attempt of this SLURM job {job} (requeued)"
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if pid == os.getpid():
        if any(lock.holder["token"] == holder.get("token") for lock in _HELD.values()):
            return None  # held right now by another part of this process
        return "it is this process (a lock left by an earlier run in the same process)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"PID {pid} is not running on this host"
    except PermissionError:
        pass  # alive, another user's
    recorded = holder.get("process_start_ticks")
    current = _process_start_ticks(pid)
    if isinstance(recorded, int) and current is not None and current != recorded:
        return f"PID {pid} is now another process (it started at another time)"
    return None


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder's guard file while a lock is checked and taken; a no-op where unsupported."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        descriptor = os.open(folder / _GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock: the lock file alone still stops a second, later process
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_new(path: Path, holder: dict[str, Any]) -> bool:
    """Create ``path`` holding ``holder`` only if it does not exist; the file is never seen half written."""
    temporary = path.with_name(f".{path.name}.{holder['token']}")
    temporary.write_text(json.dumps(holder, indent=2) + "\n", encoding="utf-8")
    try:
        os.link(temporary, path)  # atomic and exclusive
        return True
    except FileExistsError:
        return False
    except OSError:
        # A file system without hard links: create exclusively and write (a crash in between leaves an empty
        # lock, reported as unreadable).
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(holder, indent=2) + "\n")
        return True
    finally:
        temporary.unlink(missing_ok=True)


class RunLock:
    """The lock of one folder held by this process; :meth:`release` (also run at exit) removes it."""

    def __init__(self, folder: str | os.PathLike, *, purpose: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.holder = _this_holder(purpose)
        self.held = False

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        with _guard(self.folder):
            if not _write_new(self.path, self.holder):
                current = _read_holder(self.path)
                if current is None:  # removed between the two calls
                    if not _write_new(self.path, self.holder):
                        raise RunDirectoryLocked(f"{self.folder} was locked by another process just now; try again")
                else:
                    reason = _why_stale(current) if current else None
                    if reason is None:
                        raise RunDirectoryLocked(self._locked_message(current))
                    log.warning("Taking over the stale lock %s of %s: %s", self.path, describe_holder(current), reason)
                    temporary = self.path.with_name(f".{self.path.name}.{self.holder['token']}")
                    temporary.write_text(json.dumps(self.holder, indent=2) + "\n", encoding="utf-8")
                    os.replace(temporary, self.path)
        self.held = True
        _HELD[os.path.realpath(self.folder)] = self
        atexit.register(self.release)
        return self

    def _locked_message(self, holder: dict[str, Any]) -> str:
        if not holder:
            return (
                f"{self.folder} is locked by {self.path}, whose holder cannot be read; if no train/evaluate/"
                f"pretokenize run uses this folder, delete {self.path}"
            )
        return (
            f"{self.folder} is in use by {describe_holder(holder)}: one process per run folder, or they overwrite "
            f"each other's files. Wait for it, use another folder (hydra.run.dir=... / output_dir=...), or, if that "
            f"process is gone, delete {self.path}"
        )

    def release(self) -> None:
        """Remove the lock file if it is still this process's (safe to call twice; a no-op in a forked child)."""
        if not self.held or os.getpid() != self.holder["pid"]:
            return
        self.held = False
        if _HELD.get(os.path.realpath(self.folder)) is self:
            del _HELD[os.path.realpath(self.folder)]
        atexit.unregister(self.release)
        with contextlib.suppress(OSError), _guard(self.folder):
            current = _read_holder(self.path)
            if current and current.get("token") == self.holder["token"]:
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, *, purpose: str, main_process: bool | None = None) -> Iterator[RunLock | None]:
    """Hold ``folder``'s lock for the block in the main process; other ranks of the job get None and share it.

    When this process holds the folder already (taken by :class:`RunLockCallback`), the block runs under that lock.
    """
    if main_process is None:
        main_process = is_main_process()
    if not main_process:
        yield None
        return
    held = _HELD.get(os.path.realpath(folder))
    if held is not None:
        yield held
        return
    with RunLock(folder, purpose=purpose) as lock:
        yield lock


class RunLockCallback(Callback):
    """Takes a single run's folder lock before Hydra writes anything into it (``.hydra/``, the log file).

    Hydra calls ``on_run_start`` before it creates the run folder, and turns a callback's exception into a warning;
    so a refusal here ends the process itself (``SystemExit`` with the message, exit code 1). The task function
    (train.py, evaluate.py, pretokenize.py) then runs under the same lock; multirun jobs are locked by it alone.
    """

    def __init__(self) -> None:
        self._lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        try:
            folder = OmegaConf.select(config, "hydra.run.dir", throw_on_missing=True)
        except Exception:  # an interpolation only Hydra's runtime resolves: the task function locks the folder
            return
        if not folder or os.path.realpath(folder) in _HELD:
            return
        try:
            self._lock = RunLock(folder, purpose=f"{config.hydra.job.name}.py").acquire()
        except RunDirectoryLocked as error:
            raise SystemExit(f"{type(error).__name__}: {error}") from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
