"""Pretokenization: shards or an image folder -> upstream .npz layout that the generator's DataModule reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from bar_lightning.data.tokens import PretokenizedTokens
from bar_lightning.lightning.tokenizer_module import TokenizerModule
from bar_lightning.pretokenize import adm_center_crop, run_pretokenize, to_tensor

ROOT = Path(__file__).resolve().parents[1]


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = {}
    folder = root / "folder"
    for class_name in ("cat", "dog"):
        (folder / class_name).mkdir(parents=True)
        for index in range(3):
            image = random_image(rng, (24, 20))
            image.save(folder / class_name / f"{class_name}{index}.png")
            images[(class_name, f"{class_name}{index}")] = image
    shards = root / "shards"
    shards.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(shards / f"train-{shard:06d}.tar")) as writer:
            for index in range(4):
                image = random_image(rng, (40, 32))
                key = f"s{shard}_{index}"
                images[("shard", key)] = image
                buffer = __import__("io").BytesIO()
                image.save(buffer, format="PNG")
                writer.write({"__key__": key, "png": buffer.getvalue(), "cls": str(index % 3).encode()})
    return folder, shards, images


def pretokenize_cfg(tmp_path, checkpoint, **data):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretokenize", overrides=[f"tokenizer.checkpoint={checkpoint}", f"output_dir={tmp_path}/out",
                                                 "batch_size=3", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        for key, value in data.items():
            cfg.data[key] = value
    return cfg


def test_image_folder_tokens_equal_direct_encoding(tmp_path, tokenizer_checkpoint, image_sources):
    folder, _, images = image_sources
    metadata = run_pretokenize(pretokenize_cfg(tmp_path, tokenizer_checkpoint, image_folder=str(folder)))
    tokenizer = TokenizerModule.load_tokenizer(tokenizer_checkpoint)
    out = tmp_path / "out"
    assert metadata["token_size"] == 6 and metadata["num_tokens"] == 16 and metadata["num_samples"] == 6
    saved = np.load(out / "train" / "00001" / "dog2.npz", allow_pickle=False)
    assert saved["tokens"].dtype == bool and saved["tokens"].shape == (96,)
    image = to_tensor(adm_center_crop(images[("dog", "dog2")], 16)).unsqueeze(0)
    assert np.array_equal(saved["tokens"], tokenizer.encode_bits(image)[0].numpy().astype(bool))
    assert np.array_equal(saved["tokens_flip"], tokenizer.encode_bits(image.flip(-1))[0].numpy().astype(bool))
    # The generator's dataset reads it with labels in class-folder order.
    dataset = PretokenizedTokens(out, expected_length=96, bits_per_token=6)
    assert len(dataset) == 6 and sorted({int(dataset[i]["label"]) for i in range(6)}) == [0, 1]


def test_shards_over_two_ranks_cover_every_image_once_and_resume(tmp_path, tokenizer_checkpoint, image_sources,
                                                                  monkeypatch):
    _, shards, _ = image_sources
    pattern = str(shards / "train-{000000..000001}.tar")
    # Two ranks run one after the other (the process group is only needed for the final barrier).
    import bar_lightning.pretokenize as pretokenize

    for rank in (0, 1):
        monkeypatch.setattr(pretokenize, "join_torchrun_process_group", lambda rank=rank: (rank, 2))
        run_pretokenize(pretokenize_cfg(tmp_path, tokenizer_checkpoint, shards=pattern))
        # Only rank 0 writes metadata.json; remove it so the next simulated rank does not take the run as finished.
        (tmp_path / "out" / "metadata.json").unlink(missing_ok=True)
    files = sorted(p.relative_to(tmp_path / "out" / "train").as_posix() for p in (tmp_path / "out").rglob("*.npz"))
    assert len(files) == 8 and len(set(files)) == 8
    assert files[0] == "00000/s0_0.npz"
    # Re-running skips existing files (an interrupted run resumes).
    monkeypatch.setattr(pretokenize, "join_torchrun_process_group", lambda: (0, 1))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.npz")}
    run_pretokenize(pretokenize_cfg(tmp_path, tokenizer_checkpoint, shards=pattern))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.npz")} == before
    assert (tmp_path / "out" / "metadata.json").is_file()


def test_ten_crop_writes_five_crops_with_mirrors(tmp_path, tokenizer_checkpoint, image_sources):
    folder, _, _ = image_sources
    cfg = pretokenize_cfg(tmp_path, tokenizer_checkpoint, image_folder=str(folder))
    with open_dict(cfg):
        cfg.ten_crop = True
    metadata = run_pretokenize(cfg)
    assert metadata["ten_crop"] and metadata["num_samples"] == 6 * 5
    assert (tmp_path / "out" / "train" / "00000" / "cat0_c4.npz").is_file()


def test_missing_inputs_are_named(tmp_path, tokenizer_checkpoint):
    with pytest.raises(FileNotFoundError, match="nothing"):
        run_pretokenize(pretokenize_cfg(tmp_path, tokenizer_checkpoint, shards=str(tmp_path / "nothing-{0..1}.tar")))
    with pytest.raises(ValueError, match="data.shards"):
        run_pretokenize(pretokenize_cfg(tmp_path, tokenizer_checkpoint))
    with pytest.raises(FileNotFoundError, match="tokenizer.checkpoint"):
        run_pretokenize(pretokenize_cfg(tmp_path, tmp_path / "missing.ckpt", image_folder=str(tmp_path)))


def test_adm_center_crop_is_square_and_centred():
    image = Image.fromarray(np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    assert adm_center_crop(image, 32).size == (32, 32)
    assert torch.is_tensor(to_tensor(adm_center_crop(image, 32)))
