"""A user's own data and runs: the README's "Your own images" commands, settings derived from the data and the
checkpoint, the run's config record, cwd-independent paths and the defaults that protect a first run.

README commands are run through `bash -c` as written there; the only change is fewer steps and samples (appended
overrides), so that the path fits a 2-core CI machine.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from bar_lightning.config.derive import (
    default_tokens_allocation,
    derive_evaluation_sampling,
    derive_generator_settings,
    model_sampling_settings,
    released_sampling_group,
)
from bar_lightning.config.schema import ConfigError
from bar_lightning.data.tokens import write_token_metadata

from .conftest import ROOT
from .test_first_hour import README, bash

SMOKE = {"python train.py": " trainer.max_steps=3 print_config=false",
         "python evaluate.py": " num_samples_per_class=2 print_config=false"}


def own_images_block() -> list[str]:
    section = README.split("## Your own images", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip()]


def write_images(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    """PNG files of different sizes, one sub-folder per class, each class with its own colour."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for number in range(count):
            size = int(rng.integers(64, 97))
            pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            pixels[size // 4 : size // 2, :, index] = 230
            Image.fromarray(pixels).save(folder / f"{name}_{number:03d}.png")


def test_the_readme_own_images_commands_run_as_written(tmp_path):
    images, run = tmp_path / "images", tmp_path / "run"
    write_images(images, {"apples": 24, "boats": 24, "clouds": 24})  # 72 > batch 64
    lines = own_images_block()
    assert lines[0].startswith("IMAGES=") and lines[1].startswith("RUN=") and len(lines) == 7
    script = [f"IMAGES={images}", f"RUN={run}", "set -e"]
    for line in lines[2:]:
        script.append(line + next((extra for start, extra in SMOKE.items() if line.startswith(start)), ""))
    result = bash("\n".join(script), timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    output = result.stdout + result.stderr
    # The generator took the data's shape from metadata.json, with one line each.
    assert "model.num_tokens=16 -> 64" in output and "model.num_classes=10 -> 3" in output
    config = yaml.safe_load((run / "generator" / "config.yaml").read_text())
    assert (config["model"]["num_tokens"], config["model"]["num_classes"], config["model"]["bits_per_token"]) == (
        64, 3, 16)
    assert config["training"]["preview_classes"] == [0, 1, 2]
    assert f"Output dir: {run / 'generator'}" in output
    # Samples: two per class, decoded, with the checkpoint's sampling settings.
    pngs = sorted(path.name for path in (run / "samples" / "samples").glob("*.png"))
    assert len(pngs) == 6 and {name.split("_class")[1] for name in pngs} == {"0000.png", "0001.png", "0002.png"}
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["num_classes"] == 3
    assert metrics["guidance_scale"] == config["sampling"]["guidance_scale"]
    assert metrics["tokens_allocation"] == config["sampling"]["tokens_allocation"]
    assert "sampling settings from the checkpoint" in output


# ------------------------------------------------------------------------------------------------------------------
# Settings derived from the data
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 10, 12, 16, 64, 256])
def test_a_derived_allocation_is_valid_and_bar_b_shaped(bits):
    allocation = default_tokens_allocation(bits)
    assert sum(allocation) == bits and all(entry >= 1 for entry in allocation)
    assert allocation == sorted(allocation) and len(allocation) == min(4, bits)
    if bits == 16:
        assert allocation == [2, 2, 5, 7]


def token_folder(tmp_path: Path, *, bits: int = 10, tokens: int = 64, classes: int = 3) -> Path:
    root = tmp_path / "tokens"
    for label in range(classes):
        (root / "train" / f"{label:05d}").mkdir(parents=True)
    write_token_metadata(root, num_samples=classes, img_size=64, codebook_size=2**bits, token_size=bits,
                         num_tokens=tokens, levels_per_channel=2, token_dtype="bool", num_classes=classes)
    return root


def generator_config(root: Path):
    from .test_configs import compose_train

    return compose_train(["experiment=own_generator", f"data.root={root}"])


def test_the_generator_takes_bits_tokens_and_classes_from_the_token_folder(tmp_path, caplog):
    root = token_folder(tmp_path)
    cfg = generator_config(root)
    assert (cfg.model.bits_per_token, cfg.model.num_tokens, cfg.model.num_classes) == (16, 16, 10)
    with caplog.at_level(logging.INFO, logger="bar_lightning.config.derive"):
        derive_generator_settings(cfg, overrides=[f"data.root={root}"])
    assert (cfg.model.bits_per_token, cfg.model.num_tokens, cfg.model.num_classes) == (10, 64, 3)
    # The data section follows the model (interpolations), the allocation fits 10 bits per step.
    assert (cfg.data.bits_per_token, cfg.data.tokens, cfg.data.num_classes) == (10, 64, 3)
    assert list(cfg.sampling.tokens_allocation) == default_tokens_allocation(10)
    assert "model.bits_per_token=16 -> 10" in caplog.text and "sampling.tokens_allocation=[2, 2, 5, 7] ->" in caplog.text
    from bar_lightning.config.schema import validate_train_config

    validate_train_config(cfg)


def test_a_command_line_value_the_data_cannot_satisfy_is_refused_naming_both(tmp_path, caplog):
    root = token_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"model.bits_per_token=16 \(command line\), but the tokens in .* have 10 "
                                          r"bits per token"):
        derive_generator_settings(generator_config(root), overrides=["model.bits_per_token=16"])
    cfg = generator_config(root)
    cfg.model.num_classes = 2
    with pytest.raises(ConfigError, match=r"model.num_classes=2 \(command line\).* 3 classes"):
        derive_generator_settings(cfg, overrides=["model.num_classes=2"])
    cfg = generator_config(root)
    cfg.model.num_classes = 5
    with caplog.at_level(logging.WARNING, logger="bar_lightning.config.derive"):
        derive_generator_settings(cfg, overrides=["model.num_classes=5"])
    assert cfg.model.num_classes == 5 and "classes 3..4 get no training data" in caplog.text
    # An explicit allocation is the user's: validation then names it.
    cfg = generator_config(root)
    derive_generator_settings(cfg, overrides=["sampling.tokens_allocation=[4,4,4,4]"])
    assert list(cfg.sampling.tokens_allocation) == [2, 2, 5, 7]


def test_the_train_command_refuses_a_mismatch_in_one_line(tmp_path):
    root = token_folder(tmp_path)
    result = bash(f"python train.py experiment=own_generator data.root={root} model.num_tokens=16 "
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[0].startswith(
        "Error: ConfigError: model.num_tokens=16 (command line), but the tokens in"), result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Evaluation: the model's own sampling settings
# ------------------------------------------------------------------------------------------------------------------


def test_evaluation_samples_with_the_checkpoint_settings_unless_told(generator_checkpoint, tmp_path):
    from bar_lightning.lightning.checkpointing import read_checkpoint

    trained = read_checkpoint(generator_checkpoint)["hyper_parameters"]["sampling"]
    base = OmegaConf.create({"generator": {"checkpoint": str(generator_checkpoint)},
                             "sampling": {"guidance_scale": 5.0, "temperature": 2.5, "tokens_allocation": [2, 2, 5, 7],
                                          "random_order": False, "cuda_graph": True}})
    cfg = derive_evaluation_sampling(base.copy(), overrides=["generator.checkpoint=x"])
    assert list(cfg.sampling.tokens_allocation) == list(trained["tokens_allocation"])
    assert cfg.sampling.guidance_scale == trained["guidance_scale"] and cfg.sampling.cuda_graph is True
    # One key on the command line wins; a group on the command line is used whole; outside Hydra nothing changes.
    cfg = derive_evaluation_sampling(base.copy(), overrides=["sampling.guidance_scale=5.0"])
    assert cfg.sampling.guidance_scale == 5.0 and list(cfg.sampling.tokens_allocation) == list(
        trained["tokens_allocation"])
    assert derive_evaluation_sampling(base.copy(), overrides=["sampling=bar_b"]).sampling == base.sampling
    assert derive_evaluation_sampling(base.copy(), overrides=None).sampling == base.sampling


def test_released_models_get_their_readme_settings(tmp_path):
    official = {"model": {"generator": {"hidden_size": 768, "num_hidden_layers": 24, "patch_size": 4,
                                        "image_seq_len": 256, "guidance_scale": 5.0,
                                        "mbm_head": {"randomize_temperature": 2.0, "tokens_allocation": [64] * 4}}}}
    assert released_sampling_group(official) == "bar_b_patch4"
    path = tmp_path / "bar_b_patch4.yaml"
    path.write_text(yaml.safe_dump(official))
    settings, origin = model_sampling_settings(OmegaConf.create({"upstream_config": str(path)}))
    assert settings == {"guidance_scale": 9.6, "temperature": 1.4, "tokens_allocation": [64, 64, 64, 64],
                        "random_order": False}
    assert "bar_b_patch4" in origin
    for shape, group in (((768, 24, None, 256), "bar_b"), ((768, 24, 2, 256), "bar_b_patch2"),
                         ((1280, 32, None, 256), "bar_l"), ((1280, 32, None, 1024), "bar_l_res512")):
        generator = dict(zip(("hidden_size", "num_hidden_layers", "patch_size", "image_seq_len"), shape))
        assert released_sampling_group({"model": {"generator": generator}}) == group
    # Another architecture: the settings its own yaml carries.
    official["model"]["generator"]["hidden_size"] = 64
    path.write_text(yaml.safe_dump(official))
    settings, origin = model_sampling_settings(OmegaConf.create({"upstream_config": str(path)}))
    assert settings == {"guidance_scale": 5.0, "temperature": 2.0, "tokens_allocation": [64] * 4}


# ------------------------------------------------------------------------------------------------------------------
# The run's record, paths and defaults
# ------------------------------------------------------------------------------------------------------------------

TINY = "python train.py experiment=tiny_generator print_config=false trainer.max_steps={steps} " \
       "callbacks.model_checkpoint.every_n_train_steps=1 trainer.val_check_interval=null hydra.run.dir={run}"


# `make test-full` only: 16-38 s of fresh processes, kept out of `make test` so that CI stays under 20 minutes.
@pytest.mark.slow
def test_a_changed_attempt_keeps_config_yaml_and_records_the_change(tmp_path):
    run = tmp_path / "run"
    assert bash(TINY.format(steps=4, run=run)).returncode == 0
    original = (run / "config.yaml").read_text()
    # A model-shape change is refused in one line naming the key and both values; nothing is rewritten.
    refused = bash(TINY.format(steps=6, run=run) + " model.hidden_size=128")
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()
    assert len(error) == 2 and "model.hidden_size: 128 here, 64 in the file" in error[0], refused.stderr
    assert (run / "config.yaml").read_text() == original and not (run / "config_history.yaml").exists()
    # A longer schedule: a warning, config.yaml unchanged, the change in config_history.yaml.
    extended = bash(TINY.format(steps=6, run=run))
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert re.search(r"WARNING\]? - trainer.max_steps: 4 -> 6 from step 4 on", extended.stdout + extended.stderr)
    assert (run / "config.yaml").read_text() == original
    history = yaml.safe_load((run / "config_history.yaml").read_text())
    assert len(history) == 1 and history[0]["resumed_at_step"] == 4
    assert history[0]["changes"]["trainer.max_steps"] == [4, 6]
    # The same command again records nothing new.
    assert bash(TINY.format(steps=6, run=run)).returncode == 0
    assert len(yaml.safe_load((run / "config_history.yaml").read_text())) == 1
    # Periodic checkpoints: the last 3 steps are kept (save_top_k=3), plus last.ckpt.
    assert sorted(path.name for path in (run / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt", "step_00000004.ckpt", "step_00000005.ckpt", "step_00000006.ckpt"]


def test_outputs_and_configs_do_not_depend_on_the_current_directory(tmp_path):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    elsewhere.mkdir()
    result = bash(f"cd {elsewhere} && BAR_ROOT={root} python {ROOT}/train.py experiment=tiny_generator "
                  "print_config=false trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((root / "outputs" / "tiny_generator").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert list(elsewhere.iterdir()) == []
    assert (result.stdout + result.stderr).count(f"Output dir: {runs[0]}") == 2
    # Without BAR_ROOT the root is the clone; the sweep group is the project's, found from anywhere.
    composed = bash(f"cd {elsewhere} && env -u BAR_ROOT python {ROOT}/evaluate.py +sweep=guidance "
                    "generator.checkpoint=x --cfg job --resolve")
    assert composed.returncode == 0, composed.stderr[-2000:]
    job = yaml.safe_load(composed.stdout)
    assert job["paths"]["root_dir"] == str(ROOT) and job["metrics"]["reference"].startswith(f"{ROOT}/data/")


def test_plain_train_py_refuses_full_bar_b_on_cpu_in_one_line(tmp_path):
    result = bash(f"python train.py hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ConfigError: this generator (experiment_name=default) has 415M parameters")
    assert "allow_large_model_on_cpu=true" in lines[0] and "experiment=tiny_generator" in lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_a_missing_eval_shard_set_is_named_by_its_key(tmp_path):
    images = tmp_path / "images"
    write_images(images, {"a": 4, "b": 4})
    assert bash(f"python -m bar_lightning.data.convert image-folder --src {images} --prefix x --out {tmp_path}/s"
                ).returncode == 0
    result = bash(f"python train.py experiment=own_tokenizer data.train_shards={tmp_path}/s/x.index.json "
                  f"'data.eval_shards=\"{tmp_path}/missing-{{000000..000003}}.tar\"' hydra.run.dir={tmp_path}/run")
    assert result.returncode == 1
    assert "\nError: FileNotFoundError: data.eval_shards: 4 of the 4 shards" in "\n" + result.stderr, result.stderr
    assert "set data.eval_shards=<shards> (null: no validation)" in result.stderr


def test_num_workers_auto_follows_the_machine(monkeypatch):
    from bar_lightning import io
    from bar_lightning.config.schema import check_num_workers

    monkeypatch.setattr(io, "available_cpus", lambda: 2)
    assert io.default_num_workers(1) == 1 and io.default_num_workers(2) == 0
    monkeypatch.setattr(io, "available_cpus", lambda: 128)
    assert io.default_num_workers(8) == 15 and io.default_num_workers(1) == 16
    check_num_workers("auto")
    check_num_workers(3)
    for bad in (-1, "many", 1.5):
        with pytest.raises(ConfigError, match="data.num_workers"):
            check_num_workers(bad)


def test_logger_none_trains(tmp_path):
    result = bash(TINY.format(steps=2, run=tmp_path) + " logger=none")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "tensorboard").exists()


def test_on_a_gpu_machine_workers_follow_the_gpus_and_a_full_size_generator_is_not_refused(monkeypatch):
    # The CUDA branches, with a machine of 4 GPUs and 16 cores described to them (this machine has no GPU).
    from omegaconf import OmegaConf

    from bar_lightning import io, run

    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(io, "available_cpus", lambda: 16)
    trainer = OmegaConf.create({"accelerator": "auto", "devices": "auto"})
    assert run.local_processes(trainer) == 4
    assert run.local_processes(OmegaConf.create({"accelerator": "cpu", "devices": "auto"})) == 1
    assert run.local_processes(OmegaConf.create({"accelerator": "gpu", "devices": [0, 1]})) == 2
    cfg = OmegaConf.create({"trainer": dict(trainer), "data": {"num_workers": "auto", "persistent_workers": True}})
    run.resolve_num_workers(cfg)
    assert cfg.data.num_workers == io.default_num_workers(4) == 3  # 16 cores / 4 processes - 1
    # BAR-B on an auto accelerator with CUDA present is not refused (it is on a CPU-only machine).
    bar_b = OmegaConf.create({"task": "generator", "trainer": dict(trainer), "model": {}})
    run.check_model_fits_the_machine(bar_b)  # returns before counting parameters: the GPU takes it
