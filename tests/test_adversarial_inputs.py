"""Hostile or wrong inputs other than shards: configs from the working directory, token folders, checkpoints of the
wrong kind, crafted files, official yamls, sampling values, a full disk, and pretokenization's output folder.

Each probe asserts the exact refusal (one message naming the file or key, what is wrong, and the fix), that no
crafted code ran, and that nothing already made was lost.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

from bar_lightning.compat.files import UpstreamConfigError
from bar_lightning.config.schema import ConfigError, validate_evaluate_config, validate_train_config
from bar_lightning.data.images import BadSampleError
from bar_lightning.data.tokens import PretokenizedTokens, write_token_npz
from bar_lightning.eval.evaluate import run_evaluation
from bar_lightning.eval.sampling import load_generator_from_source
from bar_lightning.io import DiskFullError, atomic_write
from bar_lightning.lightning.checkpointing import (
    AtomicCheckpointIO,
    CheckpointKindError,
    CheckpointReadError,
    read_checkpoint,
)
from bar_lightning.pretokenize import PretokenizeError, run_pretokenize
from bar_lightning.run import resolve_ckpt_path

from .conftest import FIXTURES, ROOT


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture()
def upstream_a1(tmp_path) -> tuple[Path, Path, dict]:
    meta = json.loads((FIXTURES / "generator_A1.json").read_text())
    config_path = tmp_path / "a1.yaml"
    config_path.write_text(yaml.safe_dump(meta["config"]))
    return config_path, FIXTURES / "generator_A1.weights.safetensors", meta


def a1_overrides(config_path: Path, weights: Path) -> list[str]:
    return [f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}", "sampling=tiny",
            "num_samples_per_class=1", "device=cpu", "save.npz=false", "metrics.names=[]"]


# ------------------------------------------------------------------------------------------------ configs


def test_configs_in_the_working_directory_are_never_read(tmp_path, upstream_a1):
    config_path, weights, _ = upstream_a1
    marker = tmp_path / "code_ran"
    evil = {"hydra": {"callbacks": {"evil": {"_target_": "os.makedirs", "name": str(marker)}},
                      "sweeper": {"params": {"sampling.guidance_scale": "9.0"}}}}
    cwd = tmp_path / "elsewhere"
    for folder in (cwd / "sweeps" / "sweep", cwd / "conf" / "sweep", cwd / "sweep"):
        folder.mkdir(parents=True)
        (folder / "guidance.yaml").write_text("# @package _global_\n" + yaml.safe_dump(evil))
    (cwd / "conf" / "evaluate.yaml").write_text(yaml.safe_dump(evil))
    environment = {key: value for key, value in os.environ.items() if key != "BAR_ROOT"}
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "-m", "+sweep=guidance", *a1_overrides(config_path, weights),
         "classes=[0]", f"hydra.sweep.dir={sweep_dir}"],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    scales = sorted(json.loads((job / "metrics.json").read_text())["guidance_scale"] for job in sweep_dir.iterdir()
                    if (job / "metrics.json").is_file())
    assert scales == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the project's conf/sweep/guidance.yaml


def test_max_steps_zero_names_max_steps(tmp_path):
    cfg = compose_config("train", ["experiment=tiny_generator", "trainer.max_steps=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=0 must be a positive number of optimiser steps"):
        validate_train_config(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("sampling.guidance_scale=-1", r"sampling\.guidance_scale=-1\.0 must be a finite number >= 1"),
    ("sampling.guidance_scale=0.5", r"sampling\.guidance_scale=0\.5 must be a finite number >= 1"),
    ("sampling.guidance_scale=nan", r"sampling\.guidance_scale=nan must be a finite number"),
    ("sampling.temperature=inf", r"sampling\.temperature=inf must be a finite number >= 0"),
    ("sampling.temperature=-0.1", r"sampling\.temperature=-0\.1 must be a finite number >= 0"),
    ("sampling.precision=fp8", r"sampling\.precision='fp8' is unknown"),
])
def test_train_and_evaluate_validate_sampling_values_alike(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        validate_evaluate_config(compose_config("evaluate", ["generator.checkpoint=x.ckpt", f"++{override}"], tmp_path))
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_config("train", ["experiment=tiny_generator", f"++{override}"], tmp_path))


def test_a_schedule_that_does_not_fit_the_model_is_refused_by_evaluate(tmp_path, upstream_a1):
    config_path, weights, meta = upstream_a1
    cfg = validate_evaluate_config(compose_config(
        "evaluate", [*a1_overrides(config_path, weights), "sampling.tokens_allocation=[1,1]"], tmp_path))
    with pytest.raises(ConfigError, match=r"sampling\.tokens_allocation=\[1, 1\]"):
        run_evaluation(cfg)
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ checkpoints and yamls


def test_checkpoints_of_the_wrong_kind_are_named(tmp_path, generator_checkpoint, tokenizer_checkpoint):
    weights_only = tmp_path / "weights.ckpt"
    torch.save(read_checkpoint(generator_checkpoint)["state_dict"], weights_only)

    def evaluate(*overrides: str) -> None:
        run_evaluation(validate_evaluate_config(compose_config(
            "evaluate", ["sampling=tiny", "device=cpu", "save.npz=false", "metrics.names=[]", *overrides],
            tmp_path / "eval")))

    with pytest.raises(CheckpointKindError, match=(
        rf"generator\.checkpoint={tokenizer_checkpoint} is a tokenizer checkpoint .*but generator\.checkpoint takes a "
        r"generator checkpoint.*pass it as tokenizer\.checkpoint=<file>")):
        evaluate(f"generator.checkpoint={tokenizer_checkpoint}")
    with pytest.raises(CheckpointKindError, match=(
        r"tokenizer\.checkpoint=.* is a generator checkpoint .*but tokenizer\.checkpoint takes a tokenizer checkpoint"
        r".*pass it as generator\.checkpoint=<file>")):
        evaluate(f"generator.checkpoint={generator_checkpoint}", f"tokenizer.checkpoint={generator_checkpoint}")
    with pytest.raises(CheckpointKindError, match=(
        r"weights\.ckpt is a bare weights file .*released weights go in generator\.upstream_weights=<file> with "
        r"generator\.upstream_config=<its yaml>")):
        evaluate(f"generator.checkpoint={weights_only}")
    # train.py's ckpt_path: a tokenizer checkpoint cannot resume a generator run.
    with pytest.raises(CheckpointKindError, match=r"is a tokenizer checkpoint .*but this is a generator run"):
        resolve_ckpt_path(OmegaConf.create({"task": "generator", "ckpt_path": str(tokenizer_checkpoint),
                                            "paths": {"output_dir": str(tmp_path / "run")}}))


def test_a_crafted_generator_checkpoint_is_refused_by_the_project_not_by_torch(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": RunsCode(marker)}, "hyper_parameters": {}}, crafted)
    cfg = validate_evaluate_config(compose_config(
        "evaluate", [f"generator.checkpoint={crafted}", "device=cpu", "metrics.names=[]"], tmp_path / "eval"))
    with pytest.raises(CheckpointReadError, match=r"generator\.checkpoint: refusing to load .*crafted\.ckpt: "
                                                  r"unpickling it would run arbitrary code") as raised:
        run_evaluation(cfg)
    assert "weights_only=False" not in str(raised.value)
    assert not marker.exists()


def test_checkpoints_whose_hyper_parameters_claim_a_huge_network_are_refused_unbuilt(
    tmp_path, generator_checkpoint, tokenizer_checkpoint
):
    from bar_lightning.lightning.tokenizer_module import TokenizerModule

    generator = read_checkpoint(generator_checkpoint)
    generator["hyper_parameters"]["model"].update(hidden_size=65536, head_width=65536)  # 2 layers of 60 G weights
    torch.save(generator, tmp_path / "wide_generator.ckpt")
    generator["hyper_parameters"]["model"].update(num_layers=1_000_000)  # and a million layers
    torch.save(generator, tmp_path / "huge_generator.ckpt")
    tokenizer = read_checkpoint(tokenizer_checkpoint)
    tokenizer["hyper_parameters"]["model"].update(base_channels=1 << 14, encoder_width=1 << 16, decoder_width=1 << 16)
    torch.save(tokenizer, tmp_path / "huge_tokenizer.ckpt")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointReadError, match=(
            r"generator\.checkpoint=.*wide_generator\.ckpt: its hyper-parameters and its weights disagree \(\S+ is "
            r"\([\d, ]+\) in the weights but \([\d, ]+\) in the network\)")):
            load_generator_from_source(OmegaConf.create({"checkpoint": str(tmp_path / "wide_generator.ckpt")}))
        started = time.perf_counter()
        with pytest.raises(CheckpointReadError, match=(
            r"huge_generator\.ckpt: its hyper-parameters and its weights disagree \(they describe a network of more "
            r"than \d+ tensors, the file holds \d+\)")):
            load_generator_from_source(OmegaConf.create({"checkpoint": str(tmp_path / "huge_generator.ckpt")}))
        assert time.perf_counter() - started < 5
        with pytest.raises(CheckpointReadError, match=r"tokenizer\.checkpoint=.*huge_tokenizer\.ckpt: its hyper-parameters "
                                                      r"and its weights disagree"):
            TokenizerModule.load_tokenizer(tmp_path / "huge_tokenizer.ckpt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the networks described (billions of parameters) were never allocated
    generator["hyper_parameters"]["model"]["num_heads"] = 7
    torch.save(generator, tmp_path / "odd_generator.ckpt")
    with pytest.raises(CheckpointReadError, match=r"hyper-parameters are not a valid generator .*num_heads"):
        load_generator_from_source(OmegaConf.create({"checkpoint": str(tmp_path / "odd_generator.ckpt")}))
    del generator["hyper_parameters"]["model"]["head"]
    torch.save(generator, tmp_path / "headless_generator.ckpt")
    with pytest.raises(CheckpointReadError, match=r"headless_generator\.ckpt: its hyper-parameters are not a valid "
                                                  r"generator \(no value for head in its model hyper-parameters\)$"):
        load_generator_from_source(OmegaConf.create({"checkpoint": str(tmp_path / "headless_generator.ckpt")}))


def test_official_yamls_with_interpolations_and_bad_values_name_file_and_entry(tmp_path, upstream_a1):
    config_path, weights, meta = upstream_a1
    config = yaml.safe_load(config_path.read_text())
    source = {"checkpoint": None, "upstream_weights": str(weights), "upstream_config": str(config_path)}
    generator = config["model"]["generator"]
    # A resolvable interpolation is resolved: the model is built as with the literal value.
    layers = generator["num_hidden_layers"]
    generator["depth"], generator["num_hidden_layers"] = layers, "${model.generator.depth}"
    config_path.write_text(yaml.safe_dump(config))
    assert len(load_generator_from_source(OmegaConf.create(source)).blocks) == layers
    generator["num_hidden_layers"] = "${model.generator.absent}"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(UpstreamConfigError, match=(
        rf"generator\.upstream_config={config_path}: entry model\.generator\.num_hidden_layers cannot be resolved")):
        load_generator_from_source(OmegaConf.create(source))
    generator["num_hidden_layers"] = "twelve"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(UpstreamConfigError, match=(
        rf"generator\.upstream_config={config_path}: model\.generator\.num_hidden_layers='twelve' is not an integer")):
        load_generator_from_source(OmegaConf.create(source))
    config_path.write_text("model: [unclosed")
    with pytest.raises(UpstreamConfigError, match=r"is not a readable YAML file"):
        load_generator_from_source(OmegaConf.create(source))
    marker = tmp_path / "code_ran"  # a YAML tag that a full loader would call
    config_path.write_text(f"model: !!python/object/apply:os.makedirs [{marker}]\n")
    with pytest.raises(UpstreamConfigError, match=r"is not a readable YAML file"):
        load_generator_from_source(OmegaConf.create(source))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_released_weights_are_named(tmp_path, upstream_a1, suffix):
    from safetensors.torch import load_file, save_file

    config_path, weights, _ = upstream_a1
    cut = tmp_path / f"cut{suffix}"
    if suffix == ".bin":
        torch.save(load_file(str(weights)), cut)
    else:
        save_file(load_file(str(weights)), str(cut))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    source = {"checkpoint": None, "upstream_weights": str(cut), "upstream_config": str(config_path)}
    with pytest.raises(ValueError, match=rf"cut\{suffix} is truncated or corrupt and cannot be loaded"):
        load_generator_from_source(OmegaConf.create(source))


def test_a_full_disk_names_the_file_system_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"state_dict": {}, "global_step": 1, "loops": {}, "optimizer_states": []}, target)
    real_fdopen = os.fdopen

    def full_disk(descriptor, *args, **kwargs):  # every write of the new file gets ENOSPC from the kernel
        os.close(descriptor)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), "wb")

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(DiskFullError, match=(
        rf"no space left on / \(the file system of {target.parent}, \d+ MiB free\) while writing {target}; the "
        r"previous last\.ckpt is kept")):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "global_step": 2, "loops": {},
                                   "optimizer_states": []}, target)
    with pytest.raises(DiskFullError, match=r"metrics\.json was not written"):
        atomic_write(tmp_path / "metrics.json", lambda file: file.write(b"{}"))
    monkeypatch.undo()
    assert read_checkpoint(target)["global_step"] == 1
    assert sorted(path.name for path in target.parent.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------ token folders


def make_token_folder(root: Path, per_class: int = 3, length: int = 12) -> None:
    for label in range(2):
        for index in range(per_class):
            bits = np.arange(length) % 2 == label
            write_token_npz(root / "train" / f"{label:05d}" / f"img{index}.npz", bits, bits)


def test_symlink_loops_in_a_token_folder_neither_multiply_nor_move_the_data(tmp_path, caplog):
    root = tmp_path / "tokens"
    make_token_folder(root)
    (root / "train" / "00000" / "self").symlink_to(".")
    (root / "train" / "00000" / "up").symlink_to("..")  # the split folder: would read class 00001 as class 0
    (root / "train" / "00001" / "deeper").mkdir()
    (root / "train" / "00001" / "deeper" / "loop").symlink_to("../..")
    (root / "train" / "00001" / "twin.npz").symlink_to("img0.npz")  # the same file twice
    farm = tmp_path / "elsewhere" / "class2"  # a class folder that is a link (a link farm): followed
    make_token_folder(tmp_path / "elsewhere-src")
    farm.parent.mkdir()
    os.rename(tmp_path / "elsewhere-src" / "train" / "00000", farm)
    (root / "train" / "00002").symlink_to(farm)
    dataset = PretokenizedTokens(root, expected_length=12)
    assert len(dataset) == 9
    assert np.bincount(dataset.labels).tolist() == [3, 3, 3]
    assert sorted(dataset.key(i) for i in range(9)) == [f"{c:05d}/img{i}" for c in range(3) for i in range(3)]
    assert "skipped because they were already read or lead outside their class" in caplog.text


@pytest.mark.parametrize(("field", "value"), [("token_size", "abc"), ("num_tokens", -3), ("levels_per_channel", [2]),
                                            ("storage_keys", "tokens")])
def test_a_crafted_metadata_json_is_named(tmp_path, field, value):
    root = tmp_path / "tokens"
    make_token_folder(root)
    (root / "metadata.json").write_text(json.dumps({"token_size": 4, field: value}))
    with pytest.raises(ValueError, match=rf"metadata\.json: {field}="):
        PretokenizedTokens(root, expected_length=12)


def write_npz_bomb(path: Path, claimed_bits: int) -> None:
    """A token file whose array claims `claimed_bits` booleans, deflated from zeros (small on disk)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|b1", "fortran_order": False, "shape": (claimed_bits,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in ("tokens.npy", "tokens_flip.npy"):
            with archive.open(name, "w", force_zip64=True) as member:
                member.write(header.getvalue())
                block = bytes(1 << 20)
                for _ in range(claimed_bits >> 20):
                    member.write(block)


def test_a_token_file_claiming_a_huge_array_is_refused_unread(tmp_path):
    root = tmp_path / "tokens"
    make_token_folder(root)
    bomb = root / "train" / "00000" / "aaa_bomb.npz"  # sorts first: the file the dataset checks at start
    write_npz_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"aaa_bomb\.npz: 'tokens' is bool of shape \(268435456,\); expected a 1-D "
                                             r"bit vector of 12"):
            PretokenizedTokens(root, expected_length=12)
        with pytest.raises(ValueError, match=r"aaa_bomb\.npz: .*expected a 1-D bit vector of at most 1048576"):
            PretokenizedTokens(root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ------------------------------------------------------------------------------------------------ pretokenization


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, int | str]]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for index, (key, label) in enumerate(samples):
            writer.write({"__key__": key, "png": png(index * 30 % 256), "cls": str(label).encode()})
    return path


def pretokenize(tmp_path: Path, tokenizer: Path, shards: str, *overrides: str) -> dict:
    cfg = compose_config("pretokenize", [f"tokenizer.checkpoint={tokenizer}", f"output_dir={tmp_path / 'out'}",
                                         f"data.shards={shards}", "batch_size=4", "device=cpu", *overrides],
                         tmp_path / "logs")
    return run_pretokenize(cfg)


def other_tokenizer(tokenizer_checkpoint: Path, folder: Path) -> Path:
    """The same tokenizer with one weight changed: another file, another identity."""
    checkpoint = read_checkpoint(tokenizer_checkpoint)
    key = next(key for key, value in checkpoint["state_dict"].items() if value.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1e-3
    path = folder / "other.ckpt"
    torch.save(checkpoint, path)
    return path


def test_pretokenize_resumes_only_with_its_own_tokenizer_and_records_it(tmp_path, tokenizer_checkpoint):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a-000000.tar", [(f"a{i}", i % 2) for i in range(3)])
    cut = write_shard(shards / "a-000001.tar", [(f"b{i}", i % 2) for i in range(3)])
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadSampleError, match=r"unreadable_shard: shard .*a-000001\.tar.*truncated"):
        pretokenize(tmp_path, tokenizer_checkpoint, str(shards))
    out = tmp_path / "out"
    assert not (out / "metadata.json").exists() and (out / "pretokenize.json").exists()
    assert len(list(out.rglob("*.npz"))) >= 3  # the first shard was encoded before the cut one stopped the run
    cut.write_bytes(whole)  # the shard is repaired; the run is resumed, by mistake with another tokenizer
    with pytest.raises(PretokenizeError, match=r"was started with another tokenizer or settings \(tokenizer_sha256"):
        pretokenize(tmp_path, other_tokenizer(tokenizer_checkpoint, tmp_path), str(shards))
    metadata = pretokenize(tmp_path, tokenizer_checkpoint, str(shards))  # the right one completes it
    digest = hashlib.sha256(tokenizer_checkpoint.read_bytes()).hexdigest()
    assert metadata["num_samples"] == 6 and metadata["class_folders"] == ["00000", "00001"]
    assert metadata["tokenizer_identity"]["tokenizer_sha256"] == {"checkpoint": digest}
    saved = json.loads((out / "metadata.json").read_text())
    assert saved["provenance"]["inputs"]["tokenizer"]["checkpoint"]["sha256"] == digest
    assert saved["provenance"]["config"]["data"]["shards"] == str(shards)
    assert saved["provenance"]["code"]["package_version"] == "0.1.0"
    # A complete folder is not redone, and not by another tokenizer either.
    with pytest.raises(PretokenizeError, match="another tokenizer"):
        pretokenize(tmp_path, other_tokenizer(tokenizer_checkpoint, tmp_path), str(shards))
    # overwrite=true starts over with the other tokenizer.
    other = pretokenize(tmp_path, other_tokenizer(tokenizer_checkpoint, tmp_path), str(shards), "overwrite=true")
    assert other["tokenizer_identity"]["tokenizer_sha256"] != {"checkpoint": digest} and other["num_samples"] == 6


def test_pretokenize_refuses_tokens_of_unknown_origin(tmp_path, tokenizer_checkpoint):
    shard = write_shard(tmp_path / "s-000000.tar", [("x", 0)])
    write_token_npz(tmp_path / "out" / "train" / "00000" / "y.npz", np.zeros(96, bool), np.zeros(96, bool))
    with pytest.raises(PretokenizeError, match=r"holds token files \(train/\) but no record of the tokenizer"):
        pretokenize(tmp_path, tokenizer_checkpoint, str(shard))


@pytest.mark.parametrize(("samples", "message"), [
    ([("x", -1), ("y", 0)], r"bad_label: sample 'x'.*cls is b'-1'"),
    ([("x", 123456)], r"label 123456 is above 99999"),
    ([("x", 0), ("x", 1)], r"duplicate_key: sample 'x'"),
])
def test_pretokenize_labels_and_keys_are_checked_like_training(tmp_path, tokenizer_checkpoint, samples, message):
    shard = write_shard(tmp_path / "s-000000.tar", samples)
    with pytest.raises(BadSampleError, match=message):
        pretokenize(tmp_path, tokenizer_checkpoint, str(shard))
    assert not (tmp_path / "out" / "metadata.json").exists()
    assert not any((tmp_path / "out").rglob("-*"))  # no "-0001" class folder


def test_pretokenize_refuses_keys_too_long_for_a_file_name(tmp_path, tokenizer_checkpoint):
    shard = write_shard(tmp_path / "s-000000.tar", [("k" * 300, 0)])
    with pytest.raises(PretokenizeError, match=r"is 300 bytes long; token files are named by their key, at most 200"):
        pretokenize(tmp_path, tokenizer_checkpoint, str(shard))


def test_pretokenize_refuses_a_key_in_two_shards(tmp_path, tokenizer_checkpoint):
    write_shard(tmp_path / "d-000000.tar", [("same", 0), ("a", 0)])
    write_shard(tmp_path / "d-000001.tar", [("same", 1), ("b", 1)])
    with pytest.raises(PretokenizeError, match=r"the input key 'same' occurs twice \(labels 0 and 1\)"):
        pretokenize(tmp_path, tokenizer_checkpoint, str(tmp_path / "d-*.tar"))
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_the_final_count_finds_keys_duplicated_across_ranks_and_stray_files(tmp_path):
    from bar_lightning.pretokenize import check_token_files

    out = tmp_path / "out"
    for name in ("00000/a", "00000/same", "00001/b"):
        write_token_npz(out / "train" / f"{name}.npz", np.zeros(4, bool), np.zeros(4, bool))
    # Two ranks read "same" (same label): one file for two inputs.
    with pytest.raises(PretokenizeError, match=r"holds 3 token files but the inputs give 4: keys occur twice"):
        check_token_files(out, expected=4)
    with pytest.raises(PretokenizeError, match=r"holds 3 token files but the inputs give 2: files from another input"):
        check_token_files(out, expected=2)
    write_token_npz(out / "train" / "00001" / "same.npz", np.zeros(4, bool), np.zeros(4, bool))
    with pytest.raises(PretokenizeError, match=r"1 key\(s\) have token files in more than one class \(e\.g\. same\.npz"):
        check_token_files(out, expected=4)
    with pytest.raises(PretokenizeError, match="the inputs hold no images"):
        check_token_files(out, expected=0)


def test_metrics_json_records_what_made_it(tmp_path, upstream_a1):
    config_path, weights, _ = upstream_a1
    cfg = validate_evaluate_config(compose_config(
        "evaluate", [*a1_overrides(config_path, weights), "classes=[1]", "seed=5"], tmp_path))
    run_evaluation(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    record = metrics["provenance"]
    assert record["inputs"]["generator"]["upstream_weights"] == {
        "path": str(weights.resolve()), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size}
    assert record["inputs"]["generator"]["upstream_config"]["sha256"] == hashlib.sha256(
        config_path.read_bytes()).hexdigest()
    assert record["inputs"]["tokenizer"] == {} and record["seed"] == 5
    assert record["config"]["sampling"]["guidance_scale"] == metrics["guidance_scale"]
    assert record["code"]["package_version"] == "0.1.0" and len(record["code"]["git_commit"] or "x" * 40) == 40
    assert not (tmp_path / "run.lock").exists()
