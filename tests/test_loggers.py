"""Loggers and what goes to them: `logger=wandb` (offline) and `logger=many`, the run's config and git commit,
decoded previews (`preview.tokenizer`), the gradient norm, and a console without third-party noise."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bar_lightning.config.schema import ConfigError, validate_train_config
from bar_lightning.console import (
    LIGHTNING_RANK_ZERO_LOGGER,
    format_learning_rate,
    is_learning_rate_metric,
    quiet_known_noise,
)
from bar_lightning.lightning.callbacks import GeneratorPreview, StepProgressBar
from bar_lightning.lightning.optimization import clip_gradient_norm
from bar_lightning.provenance import code_version
from bar_lightning.run import train

from .conftest import ROOT

# wandb is an optional extra (pip install 'bar_lightning[wandb]'); the tests that run it need it installed.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")

TINY = ["experiment=tiny_generator", "print_config=false", "trainer.enable_model_summary=false",
        "data.val_num_samples=0"]
# The tiny tokenizer's tokens (conftest.tokenizer_checkpoint): 4 x 4 tokens of 6 bits.
SIX_BITS = ["model.bits_per_token=6", "sampling.tokens_allocation=[2,2,2]"]


def offline_wandb_environment(tmp_path: Path) -> dict[str, str]:
    """No account, no network, nothing written outside `tmp_path`."""
    folder = tmp_path / "wandb_home"
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": str(folder), "WANDB_CONFIG_DIR": str(folder / "config"),
            "WANDB_CACHE_DIR": str(folder / "cache"), "WANDB_DATA_DIR": str(folder / "data")}


def run_train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=env or {**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline wandb run under `<run_dir>/wandb` (its `run-<id>.wandb` file).

    The file is wandb's record log: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks (crc32 4 bytes,
    length 2, type 1: full / first / middle / last), each record a serialised `wandb_internal_pb2.Record`.
    """
    from wandb.proto import wandb_internal_pb2

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (log_file,) = runs[0].glob("run-*.wandb")
    data = log_file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def wandb_config(records: list) -> dict:
    return {item.key: json.loads(item.value_json) for record in records
            if record.WhichOneof("record_type") == "config" for item in record.config.update}


def wandb_history(records: list) -> list[dict]:
    """One dict per history row: '/'-joined nested keys -> decoded values."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


@needs_wandb
def test_logger_wandb_offline_records_the_config_the_commit_and_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "logger=wandb", "trainer.max_steps=4", "trainer.log_every_n_steps=2",
              "training.preview_every_n_steps=2", "tags=[wandb-test]", env=offline_wandb_environment(tmp_path))
    # The wandb folder is under the run folder (save_dir), not WANDB_DIR, and no other logger wrote anything.
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "csv").exists()
    records = wandb_records(run_dir)
    config = wandb_config(records)
    assert config["code"]["git_commit"] == code_version()["git_commit"]
    assert config["code"]["git_commit"] is not None and len(config["code"]["git_commit"]) == 40
    assert config["config"]["experiment_name"] == "tiny_generator"
    assert config["config"]["trainer"]["max_steps"] == 4
    assert config["config"]["paths"]["output_dir"] == str(run_dir)
    assert config["global_batch_size"] == 32
    run = next(record.run for record in records if record.WhichOneof("record_type") == "run")
    assert list(run.tags) == ["wandb-test"] and run.display_name == "tiny_generator"
    history = wandb_history(records)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    norms = [row["train/grad_norm"] for row in history if "train/grad_norm" in row]
    assert len(losses) == 2 and all(0.0 < loss < 2.0 for loss in losses)  # steps 2 and 4 of the tiny run
    assert len(norms) == 2 and all(math.isfinite(norm) and norm > 0 for norm in norms)
    # Without preview.tokenizer the previews are bit maps, as wandb images too.
    previews = [row for row in history if "preview/bits/_type" in row]
    assert [row["trainer/global_step"] for row in previews] == [2, 4]
    assert previews[0]["preview/bits/_type"] == "images/separated"
    assert all("preview/images/_type" not in row for row in history)


@needs_wandb
def test_logger_many_and_a_preview_tokenizer_log_decoded_image_grids_everywhere(tmp_path, tokenizer_checkpoint):
    run_dir = tmp_path / "run"
    run_train(run_dir, *SIX_BITS, "logger=many", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
              "training.preview_every_n_steps=2", f"preview.tokenizer.checkpoint={tokenizer_checkpoint}",
              env=offline_wandb_environment(tmp_path))
    # TensorBoard: the decoded grid, 10 classes of 16 px images in rows of 5 with make_grid's 2 px padding.
    events = tensorboard_events(run_dir)
    assert events.Tags()["images"] == ["preview/images"]  # no bit maps once a tokenizer decodes them
    images = events.Images("preview/images")
    assert [image.step for image in images] == [2, 4]
    assert {(image.width, image.height) for image in images} == {(5 * 16 + 6 * 2, 2 * 16 + 3 * 2)}
    norms = events.Scalars("train/grad_norm")
    assert [event.step for event in norms] == [0, 1, 2, 3]  # once per optimiser step (Lightning logs step - 1)
    assert all(math.isfinite(event.value) and event.value > 0 for event in norms)
    # The config and the commit as TensorBoard text.
    code_text = events.Tensors("run/code/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"git_commit: {code_version()['git_commit']}" in code_text
    config_text = events.Tensors("run/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"checkpoint: {tokenizer_checkpoint}" in config_text
    # CSV: the same metrics.
    csv_lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/grad_norm" in csv_lines[0].split(",") and len(csv_lines) > 4
    # wandb: the decoded grid as an image of the same size, at the same steps.
    from PIL import Image

    history = wandb_history(wandb_records(run_dir))
    previews = [row for row in history if "preview/images/_type" in row]
    assert [row["trainer/global_step"] for row in previews] == [2, 4]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    pngs = sorted((wandb_run / "files" / "media" / "images" / "preview").glob("images_*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (92, 38)
    # The tokenizer is the callback's, not the module's: the checkpoint holds the generator's weights only.
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(key.startswith("generator.") for key in state)


def test_a_normal_run_prints_no_tips_and_no_third_party_deprecations(tmp_path):
    result = run_train(tmp_path / "run", "trainer.max_steps=3", "training.preview_every_n_steps=2")
    console = result.stdout + result.stderr
    assert "Tip:" not in console and "litlogger" not in console and "litmodels" not in console
    assert "DeprecationWarning" not in console and "FutureWarning" not in console and "LeafSpec" not in console
    assert "GPU available:" in console  # Lightning's informative lines stay
    # The default logger (TensorBoard) gets the bit maps: 10 tiles of 4 token rows by 4 x 4 bit columns.
    events = tensorboard_events(tmp_path / "run")
    assert events.Tags()["images"] == ["preview/bits"]
    (image,) = events.Images("preview/bits")
    assert (image.width, image.height) == (5 * 16 + 6 * 2, 2 * 4 + 3 * 2)


def compose_train(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_logger_wandb_without_the_package_stops_before_any_work_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    cfg = compose_train([*TINY, "logger=wandb"], tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert "pip install 'bar_lightning[wandb]'" in str(error.value)
    assert "logger.wandb" in str(error.value)
    assert not (tmp_path / "run").exists()  # no run folder, no config.yaml: nothing was done
    with pytest.raises(ConfigError, match=r"pip install 'bar_lightning\[wandb\]'"):
        validate_train_config(compose_train([*TINY, "logger=many"], tmp_path / "run"))


def test_logger_many_composes_all_three_loggers(tmp_path):
    cfg = validate_train_config(compose_train([*TINY, "logger=many"], tmp_path))
    assert {name: entry["_target_"] for name, entry in cfg.logger.items()} == {
        "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
        "csv": "lightning.pytorch.loggers.CSVLogger",
        "wandb": "bar_lightning.lightning.loggers.WandbLogger",
    }
    assert cfg.logger.wandb.save_dir == str(tmp_path)


def test_a_missing_preview_tokenizer_stops_the_run_before_training_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.ckpt"
    cfg = compose_train([*TINY, f"preview.tokenizer.checkpoint={missing}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError) as error:
        train(cfg)
    assert f"preview.tokenizer.checkpoint={missing} does not exist" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["++preview.tokenizer.checkpont=x.ckpt"], r"(?s)checkpont.*did you mean: preview\.tokenizer\.checkpoint"),
    (["preview.tokenizer.checkpoint=a.ckpt", "preview.tokenizer.upstream_weights=b.bin",
      "preview.tokenizer.upstream_config=c.yaml"], "give one of preview.tokenizer.checkpoint or"),
    (["preview.tokenizer.upstream_weights=b.bin"], "needs preview.tokenizer.upstream_config="),
    (["preview.tokenizer=x.ckpt"], r"preview.tokenizer=x.ckpt is not a tokenizer source: give preview.tokenizer.checkpoint="),
])
def test_preview_tokenizer_keys_are_validated(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train([*TINY, *overrides], tmp_path))


def test_a_tokenizer_run_refuses_a_preview_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="preview.tokenizer is set for a tokenizer run"):
        validate_train_config(compose_train(["experiment=tiny_tokenizer", "preview.tokenizer.checkpoint=x.ckpt"],
                                            tmp_path))


def test_a_preview_tokenizer_of_other_tokens_is_refused_when_fitting_starts(tokenizer_checkpoint):
    from bar_lightning.models.bar import BARGenerator

    four_bits = BARGenerator(hidden_size=32, num_layers=1, num_heads=2, num_tokens=16, bits_per_token=4,
                             num_classes=10, repeat_class_condition=2, head_width=16, head_layers=1)
    preview = GeneratorPreview(every_n_steps=1, classes=[0], tokenizer={"checkpoint": str(tokenizer_checkpoint)})
    with pytest.raises(ValueError, match="preview.tokenizer decodes 16 tokens of 6 bits but this generator makes "
                                         "16 tokens of 4 bits"):
        preview.on_fit_start(SimpleNamespace(is_global_zero=True), SimpleNamespace(generator=four_bits))
    assert preview.tokenizer is None


def test_the_preview_tokenizer_is_loaded_once_frozen_and_decodes_to_unit_range(tokenizer_checkpoint):
    from bar_lightning.models.bar import BARGenerator

    six_bits = BARGenerator(hidden_size=32, num_layers=1, num_heads=2, num_tokens=16, bits_per_token=6,
                            num_classes=10, repeat_class_condition=2, head_width=16, head_layers=1)
    preview = GeneratorPreview(every_n_steps=1, classes=[0, 1],
                               tokenizer={"checkpoint": str(tokenizer_checkpoint), "upstream_weights": None,
                                          "upstream_config": None})
    trainer, module = SimpleNamespace(is_global_zero=True), SimpleNamespace(generator=six_bits)
    preview.on_fit_start(trainer, module)
    tokenizer = preview.tokenizer
    preview.on_fit_start(trainer, module)
    assert preview.tokenizer is tokenizer  # loaded once
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    images = preview.decode(torch.randint(0, 2, (2, 16 * 6), dtype=torch.bool))
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    # Without any key set there is no tokenizer: bit maps.
    assert GeneratorPreview(1, [0], tokenizer={"checkpoint": None, "upstream_weights": None}).tokenizer_source is None


def test_clip_gradient_norm_returns_the_norm_before_clipping():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    layer.bias.grad = torch.tensor([0.0, 12.0])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    expected = torch.nn.utils.get_total_norm([layer.weight.grad, layer.bias.grad])
    module = SimpleNamespace(trainer=SimpleNamespace(precision="32-true", model=layer))
    norm = clip_gradient_norm(module, optimizer, max_norm=1.0)
    assert float(norm) == pytest.approx(13.0) and float(expected) == pytest.approx(13.0)
    # ... and the gradients were clipped to that norm's 1.0.
    assert float(torch.nn.utils.get_total_norm([layer.weight.grad, layer.bias.grad])) == pytest.approx(1.0, rel=1e-5)


def test_learning_rates_show_in_scientific_notation():
    assert format_learning_rate(3e-4) == "3.0e-04"
    assert format_learning_rate(1e-5) == "1.0e-05"
    assert format_learning_rate(2.5e-3) == "2.5e-03"
    assert [is_learning_rate_metric(name) for name in ("train/lr", "lr", "lr-AdamW", "lr-AdamW/pg1", "train/loss",
                                                        "val/loss", "train/grad_norm", "v_num")] == [
        True, True, True, True, False, False, False, False]
    bar = StepProgressBar()
    trainer = SimpleNamespace(progress_bar_metrics={"val/loss": 0.6931, "lr-AdamW": 1e-5}, loggers=[],
                              callback_metrics={"train/loss": torch.tensor(0.5), "train/lr": torch.tensor(3e-4)})
    metrics = bar.get_metrics(trainer, None)
    assert metrics["train/lr"] == "3.0e-04" and metrics["train/loss"] == 0.5
    assert metrics["lr-AdamW"] == "1.0e-05" and metrics["val/loss"] == 0.6931


def test_the_known_noise_filters_are_targeted(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    rank_zero = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    assert len([f for f in rank_zero.filters if type(f).__name__ == "DropLightningTips"]) == 1
    with caplog.at_level(logging.INFO, logger=LIGHTNING_RANK_ZERO_LOGGER):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        quiet_known_noise()
        warnings.simplefilter("always")  # would show everything ...
        quiet_known_noise()  # ... but the targeted filters come first again
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="bar_lightning.mine")
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 22,
                               module="lightning.pytorch.utilities._pytree")
    assert [(str(w.message), w.filename) for w in caught] == [(message, "mine.py"), ("another deprecation",
                                                                                      "_pytree.py")]


# `make test-full` only: 16-38 s of fresh processes, kept out of `make test` so that CI stays under 20 minutes.
@pytest.mark.slow
@needs_wandb
def test_a_resumed_run_continues_its_wandb_run_and_a_new_folder_starts_another(tmp_path):
    from bar_lightning.lightning.loggers import run_folder_id

    env = offline_wandb_environment(tmp_path)
    run_dir, other_dir = tmp_path / "run", tmp_path / "other"
    run_train(run_dir, "logger=wandb", "trainer.max_steps=2", env=env)
    run_train(run_dir, "logger=wandb", "trainer.max_steps=4", env=env)  # resumes from step 2
    run_train(other_dir, "logger=wandb", "trainer.max_steps=2", env=env)
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    assert {path.name.rsplit("-", 1)[-1] for path in attempts} == {run_folder_id(str(run_dir)).rsplit("-", 1)[-1]}
    (other,) = (other_dir / "wandb").glob("offline-run-*")
    assert other.name.rsplit("-", 1)[-1] != attempts[0].name.rsplit("-", 1)[-1]
