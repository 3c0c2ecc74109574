"""What a new user meets first: documented commands run as a shell runs them, one-line errors, dry runs, sweeps.

Commands quoted from the README are run through `bash -c` exactly as written there (with this virtualenv's
`python` first on PATH), so the README cannot drift from what the code prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import FIXTURES, ROOT

README = (ROOT / "README.md").read_text()
SHELL_ENVIRONMENT = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                     "OMP_NUM_THREADS": "1"}
SHELL_ENVIRONMENT.pop("HYDRA_FULL_ERROR", None)


def readme_command(starts_with: str) -> tuple[str, str]:
    """The README line that starts with `starts_with`: (command, its trailing `# ...` comment)."""
    for line in README.splitlines():
        if line.startswith(starts_with):
            command, _, comment = line.partition("#")
            return command.strip(), comment.strip()
    raise AssertionError(f"no README line starts with {starts_with!r}")


def bash(command: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=SHELL_ENVIRONMENT, capture_output=True, text=True,
                          timeout=timeout)


def test_the_readme_typo_example_prints_what_the_readme_says(tmp_path):
    command, comment = readme_command("python train.py experiment=bar_b model.hiden_size=512")
    expected = comment.removeprefix("->").strip().split("...")[0].strip()
    result = bash(f"{command} hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith(expected), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / ".hydra").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ("experiment=tiny_generator sampling.seed=5",
     "Error: sampling.seed is not a key of this config: it is set as seed (top level)"),
    # As the README used to write it: bash removes the single quotes, Hydra then sees the braces.
    ("experiment=tiny_tokenizer data.train_shards='/data/x-{000000..000003}.tar'",
     "the shell removed its quotes. Quote it twice, 'data.train_shards=\"/data/x-{000000..000003}.tar\"'"),
    # Unquoted: bash expands the braces into four overrides of one key.
    ("experiment=tiny_tokenizer data.train_shards=/data/x-{000000..000003}.tar",
     "Error: data.train_shards is given 4 times (the shell expands an unquoted brace pattern"),
    ("experiment=tiny_generator trainer.max_stesp=3", "did you mean trainer.max_steps"),
    ("experiment=tiny_generatr", "Could not find 'experiment/tiny_generatr' Available options in 'experiment': bar_b"),
])
def test_override_mistakes_get_one_line_with_the_fix(tmp_path, arguments, message):
    result = bash(f"python train.py {arguments} hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_run_directory_given_twice_is_accepted_as_the_ddp_launcher_gives_it():
    # Lightning starts each further DDP rank with the parent's arguments and then its own `hydra.run.dir=...`.
    from bar_lightning.cli import check_overrides

    check_overrides("train", ["experiment=tiny_generator", "hydra.run.dir=/tmp/a", "trainer.max_steps=2",
                              'hydra.run.dir="/tmp/a"', "hydra.output_subdir=null"], config_dir=ROOT / "conf")
    with pytest.raises(SystemExit):
        check_overrides("train", ["experiment=tiny_generator", "trainer.max_steps=2", "trainer.max_steps=3"],
                        config_dir=ROOT / "conf")


def test_a_user_error_is_one_line_and_the_traceback_is_there_on_request(tmp_path):
    command = f"python train.py experiment=tiny_generator trainer.max_steps=0 hydra.run.dir={tmp_path}"
    result = bash(command)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: ConfigError: trainer.max_steps=0 must be a positive number of optimiser steps (runs are step-based: "
        "the learning-rate schedule, optim.total_steps, follows it)",
        "(HYDRA_FULL_ERROR=1 shows the traceback)",
    ]
    # The job's log keeps the line too (the sweep aggregator reads it there).
    assert "ConfigError: trainer.max_steps=0" in (tmp_path / "train.log").read_text()
    full = bash(f"HYDRA_FULL_ERROR=1 {command}")
    assert full.returncode == 1 and "Traceback" in full.stderr and "validate_train_config" in full.stderr


def test_a_failed_sweep_job_is_listed_with_its_error(tmp_path):
    meta = json.loads((FIXTURES / "generator_A1.json").read_text())
    config = tmp_path / "a1.yaml"
    config.write_text(yaml.safe_dump(meta["config"]))
    weights = FIXTURES / "generator_A1.weights.safetensors"
    sweep = tmp_path / "sweep"
    result = bash(f"python evaluate.py -m sampling.guidance_scale=0.5,2.0 generator.upstream_weights={weights} "
                  f"generator.upstream_config={config} sampling=tiny num_samples_per_class=1 classes=[0] device=cpu "
                  f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1  # Hydra runs both jobs, then reports the failed one
    assert (sweep / "1" / "metrics.json").is_file() and not (sweep / "0" / "metrics.json").exists()
    aggregated = bash(f"python -m bar_lightning.eval.aggregate {sweep}")
    assert aggregated.returncode == 1
    rows = (sweep / "summary.csv").read_text().splitlines()
    failed = next(row for row in rows if row.startswith("0,"))
    assert "failed" in failed and "sampling.guidance_scale=0.5 must be a finite number >= 1" in failed


def test_debug_fdr_writes_no_checkpoint(tmp_path):
    result = bash(f"python train.py experiment=tiny_generator debug=fdr hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    comment = (ROOT / "conf" / "debug" / "fdr.yaml").read_text()
    assert "no checkpoint" in comment
    assert not (tmp_path / "checkpoints").exists()
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == [
        "config.yaml", "train.log"]


def test_gitignore_ignores_no_tracked_file():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "ls-files", "-i", "-c", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert ignored == []
    assert not any(re.match(r"^/?(conf|src|tests)/", line) for line in (ROOT / ".gitignore").read_text().splitlines())
