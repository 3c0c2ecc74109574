"""Sweep aggregation: fake Hydra multirun folders -> summary.csv, summary.md, PNG plots, exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bar_lightning.eval.aggregate import collect_sweep, main, parse_override, parse_override_value

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# draw_plot's figure: 7 x 4.5 inches at 120 dpi; lines take matplotlib's default colours in order.
PLOT_SIZE = (840, 540)
MATPLOTLIB_LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]


def make_job(
    sweep: Path,
    number: int,
    overrides: list[str],
    *,
    metrics: dict | None = None,
    log: str | None = None,
    config: dict | None = None,
) -> Path:
    """A job folder as Hydra multirun leaves it: .hydra/overrides.yaml (+ config.yaml), metrics.json if it ran."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"sampling": {"temperature": 1.0}}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if log is not None:
        (job / "evaluate.log").write_text(log)
    return job


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def assert_png(path: Path, *, lines: int = 1) -> None:
    """A PNG drawn by matplotlib: the figure's size in pixels and the colour of each of its first ``lines`` lines."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.info.get("Software", "").startswith("Matplotlib")
        assert image.size == PLOT_SIZE
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=PLOT_SIZE[0] * PLOT_SIZE[1])}
    assert set(MATPLOTLIB_LINE_COLOURS[:lines]) <= colours  # the filled markers of every line


@pytest.fixture()
def two_job_sweep(tmp_path) -> Path:
    sweep = tmp_path / "multirun" / "12-00-00"
    # Job 0 has the larger guidance scale, so sorting by x must put job 1 first.
    make_job(sweep, 0, ["sampling.guidance_scale=3.0", "sampling.tokens_allocation=[2,2,5,7]"],
             metrics={"fid": 2.5, "isc": 280.125, "num_samples": 50000})
    make_job(sweep, 1, ["sampling.guidance_scale=1.5", "sampling.tokens_allocation=[2,2,5,7]"],
             metrics={"fid": 3.75, "isc": 200.0, "num_samples": 50000})
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # Hydra writes this beside the job folders
    return sweep


def test_override_values_are_parsed_as_yaml():
    assert parse_override_value("[2,2,5,7]") == [2, 2, 5, 7]
    assert parse_override_value("3.0") == 3.0 and isinstance(parse_override_value("3"), int)
    assert parse_override_value("1e-4") == pytest.approx(1e-4)  # PyYAML alone would keep a string
    assert parse_override_value("null") is None
    assert parse_override_value("true") is True
    assert parse_override_value("yes") == "yes"  # Hydra keeps YAML 1.1 booleans as text
    assert parse_override_value("demo") == "demo"
    assert parse_override_value("'a b'") == "a b"
    assert parse_override("+sampling.temperature=0.9") == ("sampling.temperature", 0.9)
    assert parse_override("++trainer.max_steps=10") == ("trainer.max_steps", 10)
    assert parse_override("~metrics.reference") == ("metrics.reference", None)
    assert parse_override("sampling=demo") == ("sampling", "demo")


def test_two_job_sweep_writes_csv_markdown_and_png(two_job_sweep, capsys):
    assert main([str(two_job_sweep)]) == 0

    columns, rows = read_csv(two_job_sweep / "summary.csv")
    assert columns == ["job", "sampling.guidance_scale", "sampling.tokens_allocation", "status", "fid", "isc",
                       "num_samples", "error"]
    assert [row["job"] for row in rows] == ["1", "0"]  # sorted by x = guidance scale
    assert [float(row["sampling.guidance_scale"]) for row in rows] == [1.5, 3.0]
    assert rows[0]["sampling.tokens_allocation"] == "[2, 2, 5, 7]"
    assert [float(row["fid"]) for row in rows] == [3.75, 2.5]
    assert [row["isc"] for row in rows] == ["200.0", "280.125"]
    assert {row["status"] for row in rows} == {"ok"} and {row["error"] for row in rows} == {""}

    markdown = (two_job_sweep / "summary.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    # The constant tokens_allocation is listed above the table rather than as a column.
    assert table_lines[0] == "| job | sampling.guidance_scale | status | fid | isc | num_samples |"
    assert table_lines[2] == "| 1 | 1.5 | ok | 3.75 | 200.0 | 50000 |"
    assert table_lines[3] == "| 0 | 3.0 | ok | 2.5 | 280.12 | 50000 |"
    assert "Fixed overrides: `sampling.tokens_allocation=[2, 2, 5, 7]`" in markdown
    assert "2 jobs: 2 ok, 0 failed." in markdown

    for metric in ("fid", "isc"):
        plot = two_job_sweep / f"{metric}_vs_sampling.guidance_scale.png"
        assert_png(plot)
        assert f"]({plot.name})" in markdown  # embedded in the Markdown summary
    assert not (two_job_sweep / "num_samples_vs_sampling.guidance_scale.png").exists()  # the run's size: not plotted
    stdout = capsys.readouterr().out
    assert "2 jobs, 2 ok, 0 failed" in stdout and "summary.csv" in stdout


def test_failed_job_is_reported_and_sets_exit_code(two_job_sweep, tmp_path, capsys):
    log = (
        "[2025-01-01 12:00:00,000][__main__][INFO] - sampling\n"
        "Traceback (most recent call last):\n"
        '  File "evaluate.py", line 10, in main\n'
        "    run_evaluation(cfg)\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    )
    make_job(two_job_sweep, 2, ["sampling.guidance_scale=2.0", "sampling.tokens_allocation=[2,2,5,7]"], log=log)

    assert main([str(two_job_sweep)]) == 1
    stdout = capsys.readouterr().out
    assert "3 jobs, 2 ok, 1 failed" in stdout
    assert "failed: job 2" in stdout and "torch.OutOfMemoryError: CUDA out of memory" in stdout

    _, rows = read_csv(two_job_sweep / "summary.csv")  # outputs are written despite the failure
    assert [row["job"] for row in rows] == ["1", "2", "0"]
    failed = rows[1]
    assert failed["status"] == "failed" and failed["fid"] == ""
    assert failed["error"] == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    markdown = (two_job_sweep / "summary.md").read_text()
    assert "| 2 | 2.0 | failed |  |  |  | torch.OutOfMemoryError" in markdown
    assert_png(two_job_sweep / "fid_vs_sampling.guidance_scale.png")

    out = tmp_path / "report"
    assert main([str(two_job_sweep), "--allow-failed", "--out", str(out)]) == 0
    assert (out / "summary.csv").is_file() and (out / "summary.md").is_file()


def test_job_without_log_says_it_has_no_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["sampling.guidance_scale=1.0"])
    (job,) = collect_sweep(sweep)
    assert job.status == "failed" and "no metrics.json" in job.error


def test_groups_metric_selection_and_config_fallback(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    number = 0
    for allocation in ("[4,4,4,4]", "[2,2,5,7]"):
        for scale in (2.0, 1.0):
            make_job(sweep, number, [f"sampling.guidance_scale={scale}", f"sampling.tokens_allocation={allocation}"],
                     metrics={"fid": scale + len(allocation), "isc": 10 * scale, "kid": 0.001},
                     config={"sampling": {"temperature": 0.9}})
            number += 1
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--group", "sampling.tokens_allocation",
                 "--metrics", "fid", "kid"]) == 0
    columns, rows = read_csv(out / "summary.csv")
    assert columns[-3:] == ["fid", "kid", "error"] and "isc" not in columns
    # Sorted by group (lists compare element-wise), then x.
    assert [(row["sampling.tokens_allocation"], row["sampling.guidance_scale"]) for row in rows] == [
        ("[2, 2, 5, 7]", "1.0"), ("[2, 2, 5, 7]", "2.0"), ("[4, 4, 4, 4]", "1.0"), ("[4, 4, 4, 4]", "2.0"),
    ]
    assert_png(out / "fid_vs_sampling.guidance_scale.png", lines=2)  # one line per tokens_allocation
    assert_png(out / "kid_vs_sampling.guidance_scale.png", lines=2)
    assert not (sweep / "summary.csv").exists()

    # A key that no job overrides is read from .hydra/config.yaml.
    assert main([str(sweep), "--out", str(out), "--x", "sampling.temperature"]) == 0
    _, rows = read_csv(out / "summary.csv")
    assert {row["sampling.temperature"] for row in rows} == {"0.9"}

    capsys.readouterr()
    assert main([str(sweep), "--x", "sampling.not_a_key"]) == 2
    assert "--x sampling.not_a_key" in capsys.readouterr().err
    assert main([str(sweep), "--metrics", "sfid"]) == 2
    assert main([str(tmp_path / "absent")]) == 2


def test_module_cli_runs(two_job_sweep):
    completed = subprocess.run(
        [sys.executable, "-m", "bar_lightning.eval.aggregate", str(two_job_sweep), "--metrics", "fid"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "| job | sampling.guidance_scale | status | fid |" in completed.stdout
    assert_png(two_job_sweep / "fid_vs_sampling.guidance_scale.png")


def test_every_numeric_metric_is_plotted_by_default(tmp_path):
    sweep = tmp_path / "sweep"
    for job, scale in enumerate((1.0, 3.0)):
        make_job(sweep, job, [f"sampling.guidance_scale={scale}"],
                 metrics={"class_accuracy": 0.5 + job / 10, "fid_demo": 20.0 - job, "num_samples": 1000,
                          "guidance_scale": scale, "tokens_allocation": [2, 2]})
    assert main([str(sweep)]) == 0
    plotted = sorted(path.name for path in sweep.glob("*.png"))
    assert plotted == ["class_accuracy_vs_sampling.guidance_scale.png", "fid_demo_vs_sampling.guidance_scale.png"]
