"""Plots of a sweep: each metric against the x parameter, one line per group value, as PNG files.

Drawn with matplotlib (Agg backend). Part of the sweep aggregation; :mod:`bar_lightning.eval.aggregate`
re-exports the public names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bar_lightning.eval.sweep_table import (
    STATUS_OK,
    SweepTable,
    _is_number,
    _sort_key,
    format_value,
    parse_override_value,
)
from bar_lightning.io import atomic_write

# Plot titles and y labels of known metrics; any other metric is named by its key.
METRIC_TITLES = {"fid": "FID", "sfid": "sFID", "isc": "Inception Score", "kid": "KID", "precision": "Precision", "recall": "Recall"}


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
    """A line plot PNG, drawn with matplotlib (Agg backend)."""
    # Imported when drawing (not with the module): the import is slow, and the backend is chosen only for plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
