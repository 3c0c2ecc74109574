"""A Hydra multirun sweep read into one table: its jobs, their overrides and metrics, as CSV and Markdown.

Hydra multirun writes ``<sweep_dir>/<job_num>/`` per job, each with ``.hydra/overrides.yaml`` (the job's
override strings, e.g. ``sampling.guidance_scale=3.0``), ``.hydra/config.yaml`` and, when the job finished,
``metrics.json`` (a flat JSON dict). A job folder without a readable ``metrics.json`` (failed or unfinished) has
status ``failed`` and, when its Hydra log (``<job>/*.log``) holds a traceback, the last error line.

Part of the sweep aggregation; :mod:`bar_lightning.eval.aggregate` (the command line) re-exports the public names.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STATUS_OK = "ok"
STATUS_FAILED = "failed"
DEFAULT_X_KEY = "sampling.guidance_scale"
# Keys of metrics.json that describe the run rather than measure it: tabulated, never plotted by default. The
# numeric ones always; tags (a list) when some job has any and they are not already an override column.
RUN_DESCRIPTION_KEYS = ("num_samples", "num_classes", "guidance_scale", "temperature", "tags")
# Known metrics come first in the table, in this order; other numeric keys follow in order of appearance.
PREFERRED_METRIC_ORDER = ("fid", "sfid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score")
# YAML 1.1 reads these as booleans; Hydra's override grammar keeps them as strings.
_YAML11_ONLY_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class AggregateError(Exception):
    """A usage error: bad sweep folder or an unknown key; the message says what to pass instead."""


@dataclass
class JobRecord:
    """One job folder of a sweep."""

    name: str  # folder name, e.g. "3"
    path: Path
    number: int | None  # Hydra's job number (hydra.job.num)
    overrides: dict[str, Any]  # parsed overrides, in the job's order
    metrics: dict[str, Any]  # metrics.json, empty for a failed job
    status: str  # STATUS_OK or STATUS_FAILED
    error: str | None = None
    _config: dict[str, Any] | None = field(default=None, repr=False)

    def parameter(self, key: str) -> Any:
        """The job's value of a dotted config key: its override, else `.hydra/config.yaml`, else None."""
        if key in self.overrides:
            return self.overrides[key]
        return _lookup_dotted(self.config(), key)

    def has_parameter(self, key: str) -> bool:
        return key in self.overrides or _lookup_dotted(self.config(), key, missing=_MISSING) is not _MISSING

    def config(self) -> dict[str, Any]:
        if self._config is None:
            config_path = self.path / ".hydra" / "config.yaml"
            loaded = _read_yaml(config_path) if config_path.is_file() else None
            self._config = loaded if isinstance(loaded, dict) else {}
        return self._config


_MISSING = object()


def _lookup_dotted(config: Any, key: str, *, missing: Any = None) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Reading a sweep
# --------------------------------------------------------------------------------------------------------------


def parse_override_value(raw: str) -> Any:
    """A Hydra override value as data: YAML (``[2,2,5,7]`` -> list, ``3.0`` -> float), strings kept as text."""
    text = raw.strip()
    if text == "":
        return ""
    if text.lower() in _YAML11_ONLY_BOOLEANS:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads "1e-4" as a string; Hydra reads it as a float.
        return float(value) if _EXPONENT_FLOAT.fullmatch(value) else value
    if value is None or isinstance(value, (bool, int, float, list, dict)):
        return value
    return text  # e.g. dates: keep what was typed


def parse_override(override: str) -> tuple[str, Any]:
    """``"+sampling.guidance_scale=3.0"`` -> ``("sampling.guidance_scale", 3.0)``; ``"~key"`` -> ``("key", None)``."""
    text = override.strip()
    key_text, separator, value_text = text.partition("=")
    key = key_text.lstrip("+~").strip()
    if not key:
        raise ValueError(f"override {override!r} has no key (expected key=value)")
    return key, (parse_override_value(value_text) if separator else None)


def _job_number(job_dir: Path) -> int | None:
    if job_dir.name.isdigit():
        return int(job_dir.name)
    hydra_config = _read_yaml(job_dir / ".hydra" / "hydra.yaml")
    number = _lookup_dotted(hydra_config, "hydra.job.num")
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def last_error_line(job_dir: Path) -> str | None:
    """The exception line of the last traceback in the job's ``*.log`` files, else the last ERROR log message."""
    error_line = None
    for log_path in sorted(job_dir.glob("*.log")):
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        traceback_starts = [index for index, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        if traceback_starts:
            # Frames are indented; the first unindented line after them is "SomeError: message".
            for line in lines[traceback_starts[-1] + 1 :]:
                if line.strip() and not line[0].isspace():
                    error_line = line.strip()
                    break
            continue
        logged_errors = [line for line in lines if "[ERROR]" in line]
        if logged_errors:
            error_line = logged_errors[-1].split("] - ", 1)[-1].strip()
    return error_line


def _read_job(job_dir: Path) -> JobRecord:
    overrides: dict[str, Any] = {}
    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        loaded = _read_yaml(overrides_path) or []
        if not isinstance(loaded, list):
            raise AggregateError(f"{overrides_path} is not a YAML list of override strings")
        for override in loaded:
            key, value = parse_override(str(override))
            overrides[key] = value
    metrics_path = job_dir / "metrics.json"
    metrics: dict[str, Any] = {}
    error = None
    if not metrics_path.is_file():
        error = last_error_line(job_dir) or "no metrics.json (the job failed or has not finished)"
    else:
        try:
            loaded_metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as exception:
            loaded_metrics, error = None, f"metrics.json is unreadable: {exception}"
        if isinstance(loaded_metrics, dict):
            metrics = loaded_metrics
        elif error is None:
            error = f"metrics.json holds a {type(loaded_metrics).__name__}, expected a flat JSON object"
    return JobRecord(
        name=job_dir.name, path=job_dir, number=_job_number(job_dir), overrides=overrides, metrics=metrics,
        status=STATUS_FAILED if error else STATUS_OK, error=error,
    )


def collect_sweep(sweep_dir: str | os.PathLike) -> list[JobRecord]:
    """Every job folder of ``sweep_dir`` (sub-folders with ``.hydra/overrides.yaml`` or a numeric name)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise AggregateError(f"sweep folder {root} does not exist (pass Hydra's multirun sweep dir)")
    job_dirs = [
        child for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".")
        and (child.name.isdigit() or (child / ".hydra" / "overrides.yaml").is_file())
    ]
    if not job_dirs and (root / ".hydra" / "overrides.yaml").is_file():
        job_dirs = [root]  # a single (non-multirun) run folder
    if not job_dirs:
        raise AggregateError(
            f"{root} has no job folders (<job_num>/.hydra/overrides.yaml); pass the sweep dir of a Hydra multirun, "
            "e.g. multirun/<date>/<time>"
        )
    jobs = [_read_job(job_dir) for job_dir in job_dirs]
    return sorted(jobs, key=lambda job: (job.number is None, job.number if job.number is not None else 0, job.name))


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sort_key(value: Any) -> tuple:
    """Numbers by value, then text, then None, so that mixed columns still sort."""
    if value is None:
        return (3, "")
    if _is_number(value):
        return (0, float(value))
    if isinstance(value, bool):
        return (1, str(value))
    if isinstance(value, (list, tuple)):
        return (2, tuple(_sort_key(item) for item in value))
    return (1, str(value))


def format_value(value: Any) -> str:
    """A cell for CSV: full precision; lists / dicts / booleans as compact JSON; None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _format_markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.5g}"
        text = text + ".0" if text.lstrip("-").isdigit() else text  # keep 3.0 recognisable as a float
    else:
        text = format_value(value)
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class SweepTable:
    """Rows of a sweep (one per job, sorted by group, x, job number) and the column layout."""

    jobs: list[JobRecord]
    parameter_keys: list[str]  # every override key (CSV columns)
    varying_keys: list[str]  # keys whose value differs between jobs, plus x / group (Markdown columns)
    fixed_overrides: dict[str, Any]  # overrides equal in every job
    metric_keys: list[str]
    x_key: str | None
    group_key: str | None

    @property
    def failed_jobs(self) -> list[JobRecord]:
        return [job for job in self.jobs if job.status != STATUS_OK]


def _ordered_union(key_lists: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(key for keys in key_lists for key in keys))


def _default_metric_keys(jobs: Sequence[JobRecord]) -> list[str]:
    keys = _ordered_union(
        [[key for key, value in job.metrics.items() if _is_number(value) or (key in RUN_DESCRIPTION_KEYS and value)]
         for job in jobs]
    )
    preferred = [key for key in PREFERRED_METRIC_ORDER if key in keys]
    return preferred + [key for key in keys if key not in preferred]


def _choose_x_key(jobs: Sequence[JobRecord], varying_keys: Sequence[str]) -> str | None:
    if any(DEFAULT_X_KEY in job.overrides for job in jobs):
        return DEFAULT_X_KEY
    for key in varying_keys:
        if all(_is_number(job.overrides.get(key)) for job in jobs):
            return key
    return varying_keys[0] if varying_keys else None


def build_table(
    jobs: Sequence[JobRecord],
    *,
    x_key: str | None = None,
    group_key: str | None = None,
    metric_keys: Sequence[str] | None = None,
) -> SweepTable:
    """Column layout and sorted rows; ``x_key=None`` picks sampling.guidance_scale or the first numeric sweep."""
    parameter_keys = _ordered_union([list(job.overrides) for job in jobs])
    varying_keys, fixed_overrides = [], {}
    for key in parameter_keys:
        # A job without the override counts as a different value (it runs with the config's default).
        values = {format_value(job.overrides[key]) if key in job.overrides else "\0absent" for job in jobs}
        if len(values) > 1:
            varying_keys.append(key)
        else:
            fixed_overrides[key] = jobs[0].overrides[key]
    if x_key is None:
        x_key = _choose_x_key(jobs, varying_keys)
    for role, key in (("--x", x_key), ("--group", group_key)):
        if key is not None and not any(job.has_parameter(key) for job in jobs):
            raise AggregateError(
                f"{role} {key}: no job overrides it and it is not in their .hydra/config.yaml; "
                f"swept parameters: {varying_keys or parameter_keys}"
            )
    for key in (x_key, group_key):
        if key is not None and key not in varying_keys:
            varying_keys.append(key)
            fixed_overrides.pop(key, None)
    if metric_keys is None:
        # A description given as an override (`tags=[a,b]`) is a parameter column already.
        metric_keys = [key for key in _default_metric_keys(jobs) if key not in parameter_keys]
    else:
        known = set(_ordered_union([list(job.metrics) for job in jobs]))
        unknown = [key for key in metric_keys if key not in known]
        if unknown and any(job.status == STATUS_OK for job in jobs):
            raise AggregateError(
                f"--metrics {unknown}: not in any metrics.json; available: {_default_metric_keys(jobs)}"
            )
    rows = sorted(
        jobs,
        key=lambda job: (
            _sort_key(job.parameter(group_key)) if group_key else (0,),
            _sort_key(job.parameter(x_key)) if x_key else (0,),
            _sort_key(job.number),
        ),
    )
    return SweepTable(
        jobs=rows, parameter_keys=parameter_keys, varying_keys=varying_keys, fixed_overrides=fixed_overrides,
        metric_keys=list(metric_keys), x_key=x_key, group_key=group_key,
    )


def _csv_columns(table: SweepTable) -> list[str]:
    extra_keys = [key for key in (table.x_key, table.group_key) if key and key not in table.parameter_keys]
    return ["job", *table.parameter_keys, *extra_keys, "status", *table.metric_keys, "error"]


def _row_values(job: JobRecord, table: SweepTable, parameter_columns: Sequence[str]) -> list[Any]:
    return [
        job.number if job.number is not None else job.name,
        *(job.parameter(key) for key in parameter_columns),
        job.status,
        *(job.metrics.get(key) for key in table.metric_keys),
        job.error,
    ]


def render_csv(table: SweepTable) -> str:
    columns = _csv_columns(table)
    parameter_columns = columns[1 : columns.index("status")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for job in table.jobs:
        writer.writerow([format_value(value) for value in _row_values(job, table, parameter_columns)])
    return buffer.getvalue()


def render_markdown_table(table: SweepTable) -> str:
    columns = ["job", *table.varying_keys, "status", *table.metric_keys]
    show_errors = bool(table.failed_jobs)
    if show_errors:
        columns.append("error")
    lines = ["| " + " | ".join(_format_markdown_cell(column) for column in columns) + " |"]
    lines.append("|" + "|".join("---:" if column not in ("status", "error") else "---" for column in columns) + "|")
    for job in table.jobs:
        values = _row_values(job, table, table.varying_keys)
        if not show_errors:
            values = values[:-1]
        lines.append("| " + " | ".join(_format_markdown_cell(value) for value in values) + " |")
    return "\n".join(lines)


def render_markdown(table: SweepTable, *, sweep_dir: Path, plot_files: Sequence[Path]) -> str:
    ok_count = len(table.jobs) - len(table.failed_jobs)
    lines = [f"# Sweep summary: `{sweep_dir}`", "", f"{len(table.jobs)} jobs: {ok_count} ok, {len(table.failed_jobs)} failed."]
    if table.fixed_overrides:
        fixed = ", ".join(f"`{key}={format_value(value)}`" for key, value in table.fixed_overrides.items())
        lines += ["", f"Fixed overrides: {fixed}."]
    lines += ["", render_markdown_table(table), ""]
    for plot_file in plot_files:
        lines += [f"![{plot_file.stem}]({plot_file.name})", ""]
    return "\n".join(lines)
