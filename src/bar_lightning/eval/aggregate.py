"""Collect a Hydra multirun sweep into one table and plots.

Hydra multirun writes ``<sweep_dir>/<job_num>/`` per job, each with ``.hydra/overrides.yaml`` (the job's
override strings, e.g. ``sampling.guidance_scale=3.0``), ``.hydra/config.yaml`` and, when the job finished,
``metrics.json`` (a flat JSON dict). This module turns them into:

* ``summary.csv``: one row per job (job number, every override, status, every metric, error), full precision;
* ``summary.md``: the same as a Markdown table (parameters that vary across jobs, fixed overrides listed above
  it) with the plots embedded;
* ``<metric>_vs_<x>.png``: each plotted metric (FID and IS by default) against the x parameter, one line per
  group value, drawn with matplotlib (Agg backend).

A job folder without a readable ``metrics.json`` (failed or unfinished) appears with status ``failed`` and, when
its Hydra log (``<job>/*.log``) holds a traceback, the last error line. The CLI lists such jobs and exits with
code 1 after writing the outputs, unless ``--allow-failed``; usage errors exit with code 2.

Reading the sweep and the table are in :mod:`~bar_lightning.eval.sweep_table`, the plots in
:mod:`~bar_lightning.eval.plots`; this module writes the outputs, holds the command line and re-exports the
public names of both.

Usage::

    python -m bar_lightning.eval.aggregate multirun/2025-01-01/12-00-00 \\
        --x sampling.guidance_scale --group sampling.tokens_allocation --metrics fid isc
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bar_lightning.eval.plots import (
    METRIC_TITLES,
    PlotSeries,
    _line_keys,
    _plot_file_name,
    draw_plot,
    plot_series,
)
from bar_lightning.eval.sweep_table import (
    DEFAULT_X_KEY,
    PREFERRED_METRIC_ORDER,
    RUN_DESCRIPTION_KEYS,
    STATUS_FAILED,
    STATUS_OK,
    AggregateError,
    JobRecord,
    SweepTable,
    build_table,
    collect_sweep,
    format_value,
    last_error_line,
    parse_override,
    parse_override_value,
    render_csv,
    render_markdown,
    render_markdown_table,
)
from bar_lightning.io import atomic_write

__all__ = [
    "DEFAULT_X_KEY",
    "METRIC_TITLES",
    "PREFERRED_METRIC_ORDER",
    "RUN_DESCRIPTION_KEYS",
    "STATUS_FAILED",
    "STATUS_OK",
    "AggregateError",
    "AggregateResult",
    "JobRecord",
    "PlotSeries",
    "SweepTable",
    "aggregate_sweep",
    "build_parser",
    "build_table",
    "collect_sweep",
    "draw_plot",
    "format_value",
    "last_error_line",
    "main",
    "parse_override",
    "parse_override_value",
    "plot_series",
    "render_csv",
    "render_markdown",
    "render_markdown_table",
]


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
