"""What the entry scripts (train.py, evaluate.py, pretokenize.py) share around Hydra: errors a user can fix are
printed as one line (what, where, how to fix) instead of a traceback, and a misspelt override is answered with the
key that exists.

`HYDRA_FULL_ERROR=1` (Hydra's own switch) or `BAR_DEBUG=1` shows the full traceback instead.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bar_lightning.paths import config_dir as project_config_dir

log = logging.getLogger(__name__)

INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, as the preemption callback and shells use


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix: shown without a traceback."""
    from bar_lightning.compat.files import UpstreamConfigError
    from bar_lightning.config.schema import ConfigError
    from bar_lightning.data.shards import ShardDataError
    from bar_lightning.io import DiskFullError
    from bar_lightning.lightning.checkpointing import CheckpointConflictError, CheckpointReadError
    from bar_lightning.run_lock import RunDirectoryLocked

    types: list[type[BaseException]] = [
        ConfigError, FileNotFoundError, FileExistsError, CheckpointReadError, CheckpointConflictError,
        RunDirectoryLocked, ShardDataError, DiskFullError, UpstreamConfigError, FloatingPointError,
    ]
    try:
        from bar_lightning.pretokenize import PretokenizeError

        types.append(PretokenizeError)
    except ImportError:  # pragma: no cover - the module is part of the package
        pass
    return tuple(types)


def full_errors_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("BAR_DEBUG") == "1"


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _log_to_job_files(message: str) -> None:
    """The error line in the job's log file (train.log / evaluate.log), where the sweep aggregator finds it."""
    record = logging.LogRecord("bar_lightning", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task function: a user error ends the run with one line on stderr and exit code 1.

    The line is also written to the job's log file. In a multirun sweep the error is re-raised so that Hydra runs
    the other jobs and reports the failure at the end.
    """

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except user_error_types() as error:
            message = f"{type(error).__name__}: {error}"
            _log_to_job_files(message)
            if full_errors_requested() or _in_multirun():
                raise
            print(f"Error: {message}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            # Ctrl-C outside fitting (while building models, reading data, evaluating): during fitting the
            # preemption callback handles it and saves. Nothing half-written is left: files are written atomically.
            if full_errors_requested() or _in_multirun():
                raise
            _log_to_job_files("Interrupted (Ctrl-C)")
            print(f"Interrupted (Ctrl-C) outside a training step: nothing new was saved; files written before are "
                  f"kept (exit code {INTERRUPT_EXIT_CODE})", file=sys.stderr)
            raise SystemExit(INTERRUPT_EXIT_CODE) from None

    return run


# --------------------------------------------------------------------------------------------------------------
# Overrides checked before Hydra runs, so that a typo gets the key that exists
# --------------------------------------------------------------------------------------------------------------

_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")
_BRACES = re.compile(r"[{}]")


def check_overrides(config_name: str, argv: Sequence[str] | None = None, config_dir: str | Path | None = None) -> None:
    """Compose `config_name` with the command line's overrides; on a composition error print one line and exit 1.

    Only plain runs are checked (any `-` flag such as `-m`, `--cfg` or `--help` leaves everything to Hydra). The line
    says what Hydra found and, for an unknown key, the keys spelt like it at that place (or where a moved key
    went); for a value that lost its quotes in the shell (a brace pattern), how to quote it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(argument.startswith("-") for argument in arguments) or full_errors_requested():
        return
    config_dir = Path(config_dir) if config_dir is not None else project_config_dir()
    keys = [argument.split("=", 1)[0].lstrip("+~") for argument in arguments if "=" in argument]
    # `hydra.*` keys are left out: Lightning's DDP launcher starts each rank with the parent's arguments followed by
    # its own `hydra.run.dir=...`, so a run directory given on the command line appears twice there by design.
    repeated = sorted({key for key in keys if keys.count(key) > 1 and not key.startswith("hydra.")})
    if repeated:
        count = keys.count(repeated[0])
        print(
            f"Error: {repeated[0]} is given {count} times (the shell expands an unquoted brace pattern into one word per "
            f"item): quote it twice, '{repeated[0]}=\"...{{000000..000320}}.tar\"', or name the shards by the "
            "converter's index file (<prefix>.index.json) or a folder",
            file=sys.stderr,
        )
        raise SystemExit(1)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name, overrides=arguments)
        return
    except (HydraException, OmegaConfBaseException) as error:
        message = override_error_message(error, config_name, config_dir, arguments)
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(1)


def override_error_message(error: BaseException, config_name: str, config_dir: Path, arguments: list[str]) -> str:
    """One line for a composition error, with the fix."""
    text = " ".join(str(error).split()).split(" Config search path:")[0]
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        key = unknown.group(1)
        others = [argument for argument in arguments if argument.split("=", 1)[0].lstrip("+~") != key]
        return f"{key} is not a key of this config{_key_hint(key, config_name, config_dir, others)}"
    offending = [argument for argument in arguments if _BRACES.search(argument) and "'" not in argument
                 and '"' not in argument]
    if offending:
        key, _, value = offending[0].partition("=")
        return (
            f"{offending[0]!r} cannot be parsed ({text[:120]}): the shell removed its quotes. Quote it twice, "
            f"'{key}=\"{value}\"', or name the shards by the converter's index file (<prefix>.index.json) or a folder"
        )
    return text


def _key_hint(key: str, config_name: str, config_dir: Path, others: list[str]) -> str:
    from hydra import compose, initialize_config_dir

    from bar_lightning.config.schema import MOVED_KEYS

    if key in MOVED_KEYS:
        return f": it is set as {MOVED_KEYS[key]}"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            composed = compose(config_name, overrides=others)
    except Exception:  # another override fails too: no suggestion, Hydra's message stands
        return ""
    *parents, leaf = key.split(".")
    node: Any = composed
    for parent in parents:
        node = node.get(parent) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return f" ({'.'.join(parents)} is not a section of it)"
    matches = difflib.get_close_matches(leaf, [str(name) for name in node.keys()], n=2, cutoff=0.6)
    prefix = ".".join(parents) + "." if parents else ""
    if matches:
        return "; did you mean " + " or ".join(prefix + match for match in matches) + "?"
    return f"; {prefix.rstrip('.') or 'the config'} has {sorted(str(name) for name in node.keys())[:12]}"
