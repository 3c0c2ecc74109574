"""Bench processes started together compile together, then time their steps one at a time.

A cold compilation of the tokenizer step takes 215-350 s (ours) and 240 to more than 457 s (the official code) of a
device call's 600 s, mostly host work on the machine's CPU cores: one after the other they rarely fit in one call.
Started at once, each process compiles and warms up while the other does; before its timed steps it waits until
every other process has arrived there too (or has died: a dead process uses no device), then takes an exclusive lock
for its timed steps, held until it exits. So no timed step runs beside another process's compilation or steps, and
the ratio of the two rows is a same-call ratio. Both stay resident on the device meanwhile: bench/h200.sh runs codes
together only on a card with room for both.

Set up by the environment, so a script started alone behaves as before:
    BENCH_TURNS_DIR       a folder shared by the processes (empty at the start of the group)
    BENCH_TURNS_PARTIES   how many processes take turns
    BENCH_TURNS_DEADLINE  Unix time after which a process that has arrived stops waiting for the others and times
                          its steps anyway (recorded as `timed_beside_another_process`), so that a slow compilation
                          cannot leave both rows empty at the call's limit
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def turn_batch(warmup: int) -> int:
    """The batch before which a process waits for its turn: two warm-up batches before the timed ones, which absorb
    the device's restart after the wait."""
    return max(warmup - 2, 0)


def row_fields(turns: Turns | None, warmup_s: float) -> dict[str, Any]:
    """A row's `first_steps_s` (its warm-up batches' seconds, less the wait for the turn that one of them holds) and
    the turn's record."""
    record = dict(turns.record) if turns is not None else {}
    return {"first_steps_s": warmup_s - record.get("waited_for_turn_s", 0.0), **record}


class Turns:
    """One process's place in a group that takes turns (`from_environment()`; None when no group is set up)."""

    def __init__(self, directory: str | Path, parties: int, deadline: float, poll_s: float = 0.5) -> None:
        if parties < 1:
            raise ValueError(f"BENCH_TURNS_PARTIES={parties}: a group has at least one process")
        self.directory, self.parties, self.deadline, self.poll_s = Path(directory), parties, deadline, poll_s
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        (self.directory / f"joined.{self.pid}").touch()
        self._lock_file: Any = None
        self.record: dict[str, Any] = {}

    @classmethod
    def from_environment(cls) -> Turns | None:
        directory = os.environ.get("BENCH_TURNS_DIR")
        if not directory:
            return None
        parties = int(os.environ.get("BENCH_TURNS_PARTIES", "2"))
        deadline = float(os.environ.get("BENCH_TURNS_DEADLINE", "inf"))
        return cls(directory, parties, deadline)

    def _pids(self, kind: str) -> set[int]:
        return {int(path.suffix[1:]) for path in self.directory.glob(f"{kind}.*")}

    def _waiting_for(self) -> tuple[int, set[int]]:
        """Processes not started yet (a count) and started ones still alive that have not arrived."""
        joined, arrived = self._pids("joined"), self._pids("arrived")
        return max(self.parties - len(joined), 0), {pid for pid in joined - arrived if _alive(pid)}

    def arrive_and_take_turn(self) -> None:
        """Called before the timed steps: finish this process's queued device work, wait for the others, then hold
        the device alone until this process exits."""
        if self._lock_file is not None:  # a later run of the same process: the device is still this process's
            self.record = {"waited_for_turn_s": 0.0, "timed_beside_another_process": bool(self._waiting_for()[1])}
            return
        torch = sys.modules.get("torch")  # not imported by a process without device work (the tests)
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.time()
        (self.directory / f"arrived.{self.pid}").touch()
        not_started, compiling = self._waiting_for()
        while (not_started or compiling) and time.time() < self.deadline:
            time.sleep(self.poll_s)
            not_started, compiling = self._waiting_for()
        beside_another = bool(not_started or compiling)
        self._lock_file = open(self.directory / "device.lock", "w")  # noqa: SIM115 (held until the process exits)
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        # Another process may still have been compiling when the deadline passed; one that arrived after this one
        # waits on the lock, which is what the lock is for.
        _, compiling = self._waiting_for()
        beside_another = beside_another and bool(compiling)
        self.record = {"waited_for_turn_s": time.time() - start, "timed_beside_another_process": beside_another}
        if beside_another:
            print(f"turns: timing beside a process that has not finished compiling (deadline passed): "
                  f"{sorted(compiling)}", flush=True)
