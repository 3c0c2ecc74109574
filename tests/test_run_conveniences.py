"""The lightning-hydra-template conveniences: run tags, debug overlays (overfit, limit, profiler), the printed config
tree, and `ckpt_path=` for evaluate.py. Runs go through `bash -c` as a user types them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from bar_lightning.config.printing import SECTION_ORDER, print_config_tree, section_order
from bar_lightning.config.schema import ConfigError, validate_evaluate_config, validate_train_config
from bar_lightning.eval.aggregate import aggregate_sweep
from bar_lightning.provenance import file_record

from .conftest import ROOT
from .test_aggregate import make_job
from .test_configs import compose_train
from .test_evaluate import compose_evaluate
from .test_first_hour import bash

TINY = "python train.py experiment=tiny_generator trainer.enable_progress_bar=false"


def training_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the CSV logger's metrics.csv that hold a training loss, in step order."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("train/loss")]


# --------------------------------------------------------------------------------------------------------------
# tags
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "tags"), [
    ("tags=[baseline,lr-sweep]", ["baseline", "lr-sweep"]),
    ("tags=baseline", ["baseline"]),  # a plain string is one tag
    ("tags=null", []),
])
def test_tags_are_a_list_of_names(override, tags):
    assert list(validate_train_config(compose_train(["experiment=tiny_generator", override])).tags) == tags
    assert list(validate_train_config(compose_train(["experiment=tiny_tokenizer", override])).tags) == tags
    evaluation = compose_evaluate([override, "generator.checkpoint=x.ckpt"], "/tmp/unused")
    assert list(validate_evaluate_config(evaluation).tags) == tags


def test_an_empty_tag_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"tags=\['a', ''\]: tag 1 is empty; give names, e\.g\. tags=\[baseline,"):
        validate_train_config(compose_train(["experiment=tiny_generator", "tags=[a,'']"]))


@pytest.mark.parametrize(("logger", "override", "tags"), [
    ("csv", "tags=[baseline,lr-sweep]", ["baseline", "lr-sweep"]),
    ("tensorboard", "tags=smoke", ["smoke"]),
])
def test_tags_are_recorded_with_the_hyper_parameters(tmp_path, logger, override, tags):
    result = bash(f"{TINY} trainer.max_steps=1 print_config=false logger={logger} {override} hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load((tmp_path / logger / "hparams.yaml").read_text())["tags"] == tags
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["tags"] == tags


def test_tags_are_a_description_column_of_the_sweep_summary_not_a_plot(tmp_path):
    sweep = tmp_path / "sweep"
    for number, guidance in enumerate((1.5, 3.0)):
        make_job(sweep, number, [f"sampling.guidance_scale={guidance}"],
                 metrics={"fid": 3.0 - number, "num_samples": 10, "tags": ["baseline", "g-sweep"]})
    result = aggregate_sweep(sweep)
    assert result.table.metric_keys == ["fid", "num_samples", "tags"]
    with open(result.csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["tags"] for row in rows] == ['["baseline", "g-sweep"]'] * 2
    assert sorted(path.name for path in result.plot_paths) == ["fid_vs_sampling.guidance_scale.png"]


def test_tags_given_as_an_override_are_one_column(tmp_path):
    sweep = tmp_path / "sweep"
    for number, tag in enumerate(("a", "b")):
        make_job(sweep, number, [f"tags=[{tag}]", "sampling.guidance_scale=2.0"],
                 metrics={"fid": 1.0 + number, "tags": [tag]})
    columns = aggregate_sweep(sweep).csv_path.read_text().splitlines()[0].split(",")
    assert columns.count("tags") == 1


# --------------------------------------------------------------------------------------------------------------
# evaluate.py: ckpt_path, tags in metrics.json, the printed config
# --------------------------------------------------------------------------------------------------------------


def test_evaluate_takes_ckpt_path_as_the_generator_checkpoint(tmp_path, generator_checkpoint):
    result = bash(f"python evaluate.py ckpt_path={generator_checkpoint} tags=[baseline,g-sweep] "
                  f"num_samples_per_class=1 classes=[0,1] device=cpu metrics.names=[] hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tags"] == ["baseline", "g-sweep"] and metrics["num_samples"] == 2
    # Recorded exactly as generator.checkpoint=<the file> records it: path, content hash, size.
    assert metrics["provenance"]["inputs"]["generator"] == {"checkpoint": file_record(generator_checkpoint)}
    assert metrics["provenance"]["config"]["generator"]["checkpoint"] == str(generator_checkpoint)
    # print_config defaults to true: the tree is on stdout, evaluate's sections included.
    assert "CONFIG" in result.stdout and "num_samples_per_class" in result.stdout and "ckpt_path" in result.stdout


def test_ckpt_path_and_a_different_generator_checkpoint_are_refused_naming_both(tmp_path):
    overrides = ["ckpt_path=outputs/a/last.ckpt", "generator.checkpoint=outputs/b/last.ckpt"]
    with pytest.raises(ConfigError) as error:
        validate_evaluate_config(compose_evaluate(overrides, tmp_path))
    assert str(error.value) == (
        "ckpt_path=outputs/a/last.ckpt and generator.checkpoint=outputs/b/last.ckpt name different checkpoints; "
        "both mean the generator checkpoint: give one of them"
    )
    same = validate_evaluate_config(compose_evaluate(["ckpt_path=outputs/a/last.ckpt",
                                                      "generator.checkpoint=outputs/./a/last.ckpt"], tmp_path))
    assert same.generator.checkpoint == "outputs/a/last.ckpt"


def test_ckpt_path_with_released_weights_is_refused_as_two_generators(tmp_path):
    overrides = ["ckpt_path=outputs/a/last.ckpt", "generator.upstream_weights=bar_b.bin"]
    with pytest.raises(ConfigError, match=r"exactly one of generator\.checkpoint=<[^>]+> \(or ckpt_path=\)"):
        validate_evaluate_config(compose_evaluate(overrides, tmp_path))


# --------------------------------------------------------------------------------------------------------------
# print_config
# --------------------------------------------------------------------------------------------------------------


# `make test-full` only: 16-38 s of fresh processes, kept out of `make test` so that CI stays under 20 minutes.
@pytest.mark.slow
def test_train_prints_the_config_tree_only_when_asked(tmp_path):
    shown = bash(f"{TINY} trainer.max_steps=1 logger=csv hydra.run.dir={tmp_path / 'shown'}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    lines = lines[lines.index("CONFIG"):]
    # One branch per section, in the reading order, then the other top-level keys.
    branches = [line[4:] for line in lines if line[:4] in ("├── ", "└── ")]
    assert branches[:len(SECTION_ORDER)] == list(SECTION_ORDER)
    assert {"seed", "preemption", "print_config"} <= set(branches)
    # Values as YAML under their section, resolved, not cut at 80 columns when stdout is a pipe.
    assert any(line.strip("│ ").startswith("max_steps: 1") for line in lines)
    assert any(line.strip("│ ") == f"output_dir: {tmp_path / 'shown'}" for line in lines)
    hidden = bash(f"{TINY} trainer.max_steps=1 logger=csv print_config=false hydra.run.dir={tmp_path / 'hidden'}")
    assert hidden.returncode == 0, hidden.stderr[-2000:]
    assert "CONFIG" not in hidden.stdout.splitlines() and "max_steps: 1" not in hidden.stdout + hidden.stderr


def test_only_global_rank_zero_prints(capsys, monkeypatch):
    cfg = OmegaConf.create({"paths": {"output_dir": "/x"}, "trainer": {"max_steps": 3}, "task": "generator", "z": 1})
    assert section_order(cfg) == ["task", "trainer", "paths", "z"]
    for variable, value in (("RANK", "1"), ("LOCAL_RANK", "2"), ("SLURM_PROCID", "3"), ("NODE_RANK", "1")):
        with monkeypatch.context() as patch:
            for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK"):
                patch.delenv(name, raising=False)
            patch.setenv(variable, value)
            print_config_tree(cfg)
        assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    print_config_tree(cfg)
    assert "max_steps: 3" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# debug overlays
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["overfit", "limit", "profiler"])
@pytest.mark.parametrize("experiment", ["tiny_generator", "tiny_tokenizer", "bar_b"])
def test_debug_overlays_compose_with_any_experiment(overlay, experiment):
    cfg = validate_train_config(compose_train([f"experiment={experiment}", f"debug={overlay}"]))
    assert cfg.experiment_name == experiment  # the experiment's model and data stay
    comment = (ROOT / "conf" / "debug" / f"{overlay}.yaml").read_text().splitlines()[1]
    assert comment.startswith("# ") and len(comment) > 40


def test_debug_overfit_trains_on_one_batch_and_the_loss_falls(tmp_path):
    result = bash(f"{TINY} debug=overfit logger=csv print_config=false hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = training_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == list(range(50))  # logged every step, 50 steps
    # One batch per epoch: the epoch advances with every step.
    assert all(int(row["epoch"]) == int(row["step"]) for row in rows)
    losses = [float(row["train/loss"]) for row in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)


def test_debug_limit_shortens_the_epochs(tmp_path):
    # 256 held-out samples are 8 validation batches of 32, of which 2 run per epoch.
    result = bash(f"{TINY} debug=limit logger=csv print_config=false data.val_num_samples=256 trainer.profiler=simple "
                  f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = training_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == list(range(20))
    assert [int(row["epoch"]) for row in rows] == [step // 4 for step in range(20)]  # 4 training batches per epoch
    validation_calls = [line for line in (result.stdout + result.stderr).splitlines() if "validation_step" in line]
    assert len(validation_calls) == 1 and validation_calls[0].split("|")[3].strip() == "10"  # 5 epochs x 2 batches
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_debug_profiler_writes_its_report_to_the_run_folder(tmp_path):
    result = bash(f"{TINY} debug=profiler print_config=false hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "fit-profiler.txt").read_text()
    assert report.startswith("FIT Profiler Report")
    batches = next(line for line in report.splitlines() if line.startswith("|  run_training_batch "))
    assert batches.split("|")[3].strip() == "10"  # the overlay's 10 steps
    assert "SingleDeviceStrategy.training_step" in report
