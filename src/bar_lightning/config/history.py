"""A run's record of its configuration: `config.yaml` as first started, and every later change in
`config_history.yaml`.

A resumed attempt whose config differs from the one in force (a longer `trainer.max_steps`, another learning rate,
more devices) does not overwrite `config.yaml`: the changed keys, their values before and after, the step the
attempt resumed from and the time are appended to `config_history.yaml`. Keys that change the optimisation from
that step on (the learning-rate schedule, the effective batch, the random-order annealing) are also warned about.
Model-shape changes never get here: the run's checkpoints refuse them (`RunIdentity`).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from bar_lightning.io import atomic_write

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"
HISTORY_FILENAME = "config_history.yaml"
# Keys whose change alters the optimisation from the resumed step on (prefixes end with a dot).
SCHEDULE_KEYS = (
    "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes",
    "data.batch_size", "optim.", "training.randomness_anneal_start", "training.randomness_anneal_end",
    "training.class_label_dropout", "training.discriminator_start", "loss.",
)
# Keys that name where this attempt runs, not what it computes.
IGNORED_KEYS = ("ckpt_path", "paths.output_dir", "paths.log_dir")


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {`a.b.c`: leaf}; lists are leaves."""
    if not isinstance(values, dict):
        return {prefix.rstrip("."): values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else
                    {f"{prefix}{key}": value})
    return flat


def changes_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [before, after]} for every leaf that differs (absent on one side: null there)."""
    old, new = flatten(before), flatten(after)
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(IGNORED_KEYS)
    }


def changes_the_schedule(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in SCHEDULE_KEYS)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILENAME
    if not path.is_file():
        return []
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a list of changes; move it away to start a new history")
    return entries


def config_in_force(run_dir: Path) -> dict[str, Any] | None:
    """The run's config as its latest attempt ran it: config.yaml with every recorded change applied."""
    path = run_dir / CONFIG_FILENAME
    if not path.is_file():
        return None
    flat = flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    for entry in read_history(run_dir):
        for key, (_, after) in (entry.get("changes") or {}).items():
            flat[key] = after
    return flat


def record_config(cfg: DictConfig, run_dir: str | Path, *, resumed_step: int | None) -> dict[str, list[Any]]:
    """Write config.yaml on a run's first attempt; on a later one, record what changed. Returns the changes."""
    run_dir = Path(run_dir)
    current = OmegaConf.to_container(cfg, resolve=True)
    in_force = config_in_force(run_dir)
    if in_force is None or resumed_step is None:
        # A first attempt (or one starting from scratch in a folder without checkpoints): its config is the record.
        atomic_write(run_dir / CONFIG_FILENAME, lambda file: file.write(OmegaConf.to_yaml(cfg, resolve=True).encode()))
        return {}
    changes = changes_between(_unflatten(in_force), current)
    if not changes:
        return {}
    for key, (before, after) in changes.items():
        if changes_the_schedule(key):
            log.warning("%s: %s -> %s from step %d on: the optimisation differs from the run so far (recorded in "
                        "%s; config.yaml keeps the first value)", key, before, after, resumed_step, HISTORY_FILENAME)
        else:
            log.info("%s: %s -> %s from step %d on (recorded in %s)", key, before, after, resumed_step,
                     HISTORY_FILENAME)
    entries = read_history(run_dir)
    entries.append({
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_at_step": resumed_step,
        "changes": changes,
    })
    text = yaml.safe_dump(entries, sort_keys=False, default_flow_style=None)
    atomic_write(run_dir / HISTORY_FILENAME, lambda file: file.write(text.encode()))
    return changes


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested
