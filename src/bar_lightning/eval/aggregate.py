"""Collect a Hydra multirun sweep into one table and plots.

Hydra multirun writes ``<sweep_dir>/<job_num>/`` per job, each with ``.hydra/overrides.yaml`` (the job's
override strings, e.g. ``sampling.guidance_scale=3.0``), ``.hydra/config.yaml`` and, when the job finished,
``metrics.json`` (a flat JSON dict). This module turns them into:

* ``summary.csv``: one row per job (job number, every override, status, every metric, error), full precision;
* ``summary.md``: the same as a Markdown table (parameters that vary across jobs, fixed overrides listed above
  it) with the plots embedded;
* ``<metric>_vs_<x>.png``: each plotted metric (FID and IS by default) against the x parameter, one line per
  group value (matplotlib with the Agg backend when installed, otherwise drawn with Pillow).

A job folder without a readable ``metrics.json`` (failed or unfinished) appears with status ``failed`` and, when
its Hydra log (``<job>/*.log``) holds a traceback, the last error line. The CLI lists such jobs and exits with
code 1 after writing the outputs, unless ``--allow-failed``; usage errors exit with code 2.

Usage::

    python -m bar_lightning.eval.aggregate multirun/2025-01-01/12-00-00 \\
        --x sampling.guidance_scale --group sampling.tokens_allocation --metrics fid isc
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bar_lightning.io import atomic_write

STATUS_OK = "ok"
STATUS_FAILED = "failed"
DEFAULT_X_KEY = "sampling.guidance_scale"
# Keys of metrics.json that describe the run rather than measure it: tabulated, never plotted by default. The
# numeric ones always; tags (a list) when some job has any and they are not already an override column.
RUN_DESCRIPTION_KEYS = ("num_samples", "num_classes", "guidance_scale", "temperature", "tags")
# Known metrics come first in the table, in this order; other numeric keys follow in order of appearance.
PREFERRED_METRIC_ORDER = ("fid", "sfid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score")
METRIC_TITLES = {"fid": "FID", "sfid": "sFID", "isc": "Inception Score", "kid": "KID", "precision": "Precision", "recall": "Recall"}
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


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PlotSeries:
    label: str
    points: list[tuple[Any, float]]  # (x value, metric value), sorted by x


def _line_keys(table: SweepTable) -> list[str]:
    """Parameters that tell plot lines apart: the group, else every other varying parameter (never mix settings)."""
    if table.group_key:
        return [table.group_key]
    return [key for key in table.varying_keys if key != table.x_key]


def plot_series(table: SweepTable, metric_key: str) -> list[PlotSeries]:
    """One series per group value (or per combination of the other varying parameters when no group is given).

    Labels are the value alone for one line parameter (the legend title names it), else ``key=value, ...``.
    """
    if table.x_key is None:
        return []
    line_keys = _line_keys(table)
    series: dict[str, PlotSeries] = {}
    line_order: dict[str, tuple] = {}
    for job in table.jobs:
        value = job.metrics.get(metric_key)
        if job.status != STATUS_OK or not _is_number(value) or not math.isfinite(value):
            continue
        if len(line_keys) == 1:
            label = format_value(job.parameter(line_keys[0]))
        else:
            label = ", ".join(f"{key}={format_value(job.parameter(key))}" for key in line_keys) or metric_key
        series.setdefault(label, PlotSeries(label=label, points=[])).points.append(
            (job.parameter(table.x_key), float(value))
        )
        line_order[label] = tuple(_sort_key(job.parameter(key)) for key in line_keys)
    for line in series.values():
        line.points.sort(key=lambda point: _sort_key(point[0]))
    return sorted(series.values(), key=lambda line: line_order[line.label])


def _plot_file_name(metric_key: str, x_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{metric_key}_vs_{x_key}") + ".png"


def _x_positions(series: Sequence[PlotSeries]) -> tuple[Callable[[Any], float], list[tuple[float, str]] | None]:
    """Numeric x values map to themselves; anything else to evenly spaced categories (with their labels)."""
    x_values = [x for line in series for x, _ in line.points]
    if all(_is_number(x) for x in x_values):
        return float, None
    categories = sorted({format_value(x) for x in x_values}, key=lambda text: _sort_key(parse_override_value(text)))
    index = {category: float(position) for position, category in enumerate(categories)}
    return (lambda x: index[format_value(x)]), [(position, category) for category, position in index.items()]


def draw_plot(
    path: Path, series: Sequence[PlotSeries], *, title: str, x_label: str, y_label: str, legend_title: str = ""
) -> Path:
    """A line plot PNG, with matplotlib (Agg) when installed, else with Pillow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _draw_plot_pillow(path, series, title=title, x_label=x_label, y_label=y_label,
                                 legend_title=legend_title)
    to_position, categories = _x_positions(series)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for line in series:
        axes.plot([to_position(x) for x, _ in line.points], [y for _, y in line.points], marker="o", label=line.label)
    if categories:
        axes.set_xticks([position for position, _ in categories], [label for _, label in categories])
    axes.set(title=title, xlabel=x_label, ylabel=y_label)
    axes.grid(alpha=0.3)
    if len(series) > 1 or legend_title:
        axes.legend(title=legend_title or None, fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png"))
    plt.close(figure)
    return path


_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not high > low:
        spread = abs(low) * 0.05 or 1.0
        low, high = low - spread, high + spread
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(factor * magnitude for factor in (1, 2, 2.5, 5, 10) if factor * magnitude >= raw_step)
    first, last = math.floor(low / step), math.ceil(high / step)  # the ticks enclose [low, high]
    return [round(index * step, 12) for index in range(first, last + 1)]


def _draw_text(draw: Any, xy: tuple[float, float], text: str, *, font: Any, anchor: str) -> None:
    """Text positioned by ``anchor`` = horizontal (l, m, r) + vertical (a: top, m: middle) alignment.

    Computed from the text's bounding box rather than Pillow's ``anchor=``, which bitmap fonts do not support.
    """
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x_offset = {"l": 0.0, "m": (right - left) / 2, "r": float(right - left)}[anchor[0]]
    y_offset = {"a": 0.0, "m": (bottom - top) / 2}[anchor[1]]
    draw.text((xy[0] - x_offset - left, xy[1] - y_offset - top), text, fill="black", font=font)


def _draw_plot_pillow(
    path: Path, series: Sequence[PlotSeries], *, title: str, x_label: str, y_label: str, legend_title: str
) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int) -> Any:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    text_font, title_font = font(13), font(16)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_texts = [legend_title, *(f"      {line.label}" for line in series)]
    legend_width = 30 + max(measure.textbbox((0, 0), text, font=text_font)[2] for text in legend_texts)
    plot_width, height = 640, 540
    width = plot_width + legend_width
    left, right, top, bottom = 80, plot_width - 20, 45, height - 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    to_position, categories = _x_positions(series)
    x_data = [to_position(x) for line in series for x, _ in line.points]
    y_data = [y for line in series for _, y in line.points]
    if categories:
        x_ticks = [(position, label) for position, label in categories]
        x_low, x_high = -0.5, len(categories) - 0.5
    else:
        numeric_ticks = _nice_ticks(min(x_data), max(x_data)) if x_data else [0.0, 1.0]
        x_ticks = [(tick, f"{tick:g}") for tick in numeric_ticks]
        x_span = numeric_ticks[-1] - numeric_ticks[0]
        x_low, x_high = numeric_ticks[0] - 0.04 * x_span, numeric_ticks[-1] + 0.04 * x_span
    # 5% headroom so that no point sits on the frame.
    y_margin = 0.05 * (max(y_data) - min(y_data)) if y_data else 0.0
    y_ticks = _nice_ticks(min(y_data) - y_margin, max(y_data) + y_margin) if y_data else [0.0, 1.0]
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for tick in y_ticks:
        _, y_pixel = pixel(x_low, tick)
        draw.line([(left, y_pixel), (right, y_pixel)], fill="#e6e6e6")
        _draw_text(draw, (left - 8, y_pixel), f"{tick:g}", font=text_font, anchor="rm")
    for position, label in x_ticks:
        x_pixel, _ = pixel(position, y_low)
        draw.line([(x_pixel, top), (x_pixel, bottom)], fill="#f0f0f0")
        _draw_text(draw, (x_pixel, bottom + 8), label, font=text_font, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline="black")
    _draw_text(draw, ((left + right) / 2, 12), title, font=title_font, anchor="ma")
    _draw_text(draw, ((left + right) / 2, height - 22), x_label, font=text_font, anchor="ma")
    y_label_image = Image.new("RGBA", (bottom - top, 20), (255, 255, 255, 0))
    _draw_text(ImageDraw.Draw(y_label_image), ((bottom - top) / 2, 10), y_label, font=text_font, anchor="mm")
    rotated = y_label_image.rotate(90, expand=True)
    image.paste(rotated, (12, top), rotated)

    for index, line in enumerate(series):
        colour = _PALETTE[index % len(_PALETTE)]
        points = [pixel(to_position(x), y) for x, y in line.points]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
        for x_pixel, y_pixel in points:
            draw.ellipse([x_pixel - 4, y_pixel - 4, x_pixel + 4, y_pixel + 4], fill=colour)
        legend_y = top + 30 + index * 20
        draw.line([(right + 20, legend_y), (right + 44, legend_y)], fill=colour, width=3)
        _draw_text(draw, (right + 50, legend_y), line.label, font=text_font, anchor="lm")
    if legend_title:
        _draw_text(draw, (right + 20, top + 10), legend_title, font=text_font, anchor="lm")
    atomic_write(path, lambda file: image.save(file, format="PNG"))
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AggregateResult:
    table: SweepTable
    csv_path: Path
    markdown_path: Path
    plot_paths: list[Path]


def aggregate_sweep(
    sweep_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    x_key: str | None = None,
    group_key: str | None = None,
    metric_keys: Sequence[str] | None = None,
) -> AggregateResult:
    """Collect ``sweep_dir`` and write ``summary.csv``, ``summary.md`` and the plots into ``out_dir`` (default:
    the sweep dir). Plots: ``metric_keys`` when given, else every numeric metric (not the run's description:
    sample count, class count, guidance, temperature)."""
    root = Path(sweep_dir)
    output = Path(out_dir) if out_dir is not None else root
    table = build_table(collect_sweep(root), x_key=x_key, group_key=group_key, metric_keys=metric_keys)
    plot_keys = table.metric_keys if metric_keys is not None else [
        key for key in table.metric_keys if key not in RUN_DESCRIPTION_KEYS
    ]
    plot_paths = []
    for metric_key in plot_keys:
        series = plot_series(table, metric_key)
        if not series:
            continue
        title_name = METRIC_TITLES.get(metric_key, metric_key)
        line_keys = _line_keys(table)
        plot_paths.append(draw_plot(
            output / _plot_file_name(metric_key, table.x_key), series,
            title=f"{title_name} vs {table.x_key}", x_label=table.x_key, y_label=title_name,
            legend_title=line_keys[0] if len(line_keys) == 1 else "",
        ))
    csv_path, markdown_path = output / "summary.csv", output / "summary.md"
    output.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(csv_path, render_csv(table))
    _atomic_write_text(markdown_path, render_markdown(table, sweep_dir=root, plot_files=plot_paths))
    return AggregateResult(table=table, csv_path=csv_path, markdown_path=markdown_path, plot_paths=plot_paths)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bar_lightning.eval.aggregate",
        description="Summarise a Hydra multirun sweep: summary.csv, summary.md and metric-vs-parameter plots.",
    )
    parser.add_argument("sweep_dir", type=Path, help="Hydra's sweep dir (holds <job_num>/ folders)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep dir)")
    parser.add_argument("--x", dest="x_key", default=None,
                        help=f"parameter on the x axis (default: {DEFAULT_X_KEY} if swept, else the first numeric sweep)")
    parser.add_argument("--group", dest="group_key", default=None,
                        help="one plot line per value of this parameter (default: per combination of the others)")
    parser.add_argument("--metrics", dest="metric_keys", nargs="+", default=None,
                        help="metrics to tabulate and plot (default: every numeric one)")
    parser.add_argument("--allow-failed", action="store_true",
                        help="exit with code 0 even when some jobs have no metrics.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        result = aggregate_sweep(arguments.sweep_dir, out_dir=arguments.out, x_key=arguments.x_key,
                                 group_key=arguments.group_key, metric_keys=arguments.metric_keys)
    except AggregateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = result.table
    failed = table.failed_jobs
    print(render_markdown_table(table))
    print(f"\n{arguments.sweep_dir}: {len(table.jobs)} jobs, {len(table.jobs) - len(failed)} ok, {len(failed)} failed")
    for job in failed:
        print(f"  failed: job {job.name} ({job.path}): {job.error}")
    for path in (result.csv_path, result.markdown_path, *result.plot_paths):
        print(f"wrote {path}")
    if table.x_key is None:
        print("no plot: no swept parameter to put on the x axis (pass --x <key>)")
    if failed and not arguments.allow_failed:
        print(f"{len(failed)} failed job(s): exit code 1 (pass --allow-failed to accept them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
