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


# ------------------------------------------------------------------------------------------------ the pipeline


def run_with(tmp_path, checkpoint, *, out: str = "out", **settings):
    """run_pretokenize into `tmp_path/out` with top-level settings (num_workers, ten_crop) and data keys."""
    data = {key: settings.pop(key) for key in ("shards", "image_folder") if key in settings}
    cfg = pretokenize_cfg(tmp_path, checkpoint, **data)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / out)
        for key, value in settings.items():
            cfg[key] = value
    return run_pretokenize(cfg)


def token_files(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = {}
    for path in sorted((root / "train").rglob("*.npz")):
        with np.load(path, allow_pickle=False) as saved:
            files[path.relative_to(root).as_posix()] = (saved["tokens"], saved["tokens_flip"])
    return files


@pytest.mark.parametrize("source", ["shards", "folder_ten_crop"])
def test_token_files_do_not_depend_on_num_workers(tmp_path, tokenizer_checkpoint, image_sources, caplog, source):
    folder, shards, images = image_sources
    inputs = ({"shards": str(shards / "train-{000000..000001}.tar")} if source == "shards" else
              {"image_folder": str(folder), "ten_crop": True})
    results = {}
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level("INFO", logger="bar_lightning.pretokenize"):
            metadata = run_with(tmp_path, tokenizer_checkpoint, out=f"w{workers}", num_workers=workers, **inputs)
        assert f"pretokenizing with {workers} DataLoader worker(s)" in caplog.text
        results[workers] = token_files(tmp_path / f"w{workers}")
        assert metadata["num_samples"] == len(results[workers]) == (8 if source == "shards" else 30)
    assert results[0].keys() == results[2].keys()
    for name, (tokens, tokens_flip) in results[0].items():
        assert np.array_equal(tokens, results[2][name][0]) and np.array_equal(tokens_flip, results[2][name][1]), name
    if source == "shards":
        # Batches of 3 from two workers, the short ones padded: each file is its image encoded alone.
        tokenizer = TokenizerModule.load_tokenizer(tokenizer_checkpoint)
        for (kind, key), image in images.items():
            if kind == "shard":
                label = int(key.split("_")[1]) % 3
                tokens, tokens_flip = results[2][f"train/{label:05d}/{key}.npz"]
                alone = to_tensor(adm_center_crop(image, 16)).unsqueeze(0)
                assert np.array_equal(tokens, tokenizer.encode_bits(alone)[0].numpy().astype(bool))
                assert np.array_equal(tokens_flip, tokenizer.encode_bits(alone.flip(-1))[0].numpy().astype(bool))


def test_the_pixel_table_gives_the_values_of_to_tensor():
    from bar_lightning.pretokenize import pixel_table, pixels_to_images

    array = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)  # every byte value, in each channel
    images = pixels_to_images(torch.from_numpy(array).unsqueeze(0), pixel_table())
    assert images.shape == (1, 3, 16, 16) and images.is_contiguous()
    assert torch.equal(images[0], to_tensor(Image.fromarray(array)))


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "images"))


@pytest.mark.parametrize("bad", ["image", "label"])
def test_an_error_in_a_worker_is_raised_with_its_type_and_message(tmp_path, tokenizer_checkpoint, image_sources, bad):
    from bar_lightning.data.images import BadSampleError
    from bar_lightning.pretokenize import PretokenizeError, WorkerTraceback

    folder, _, _ = image_sources
    if bad == "image":
        images = copy_folder(folder, tmp_path)
        (images / "dog" / "dog1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        inputs, error, message = {"image_folder": str(images)}, PretokenizeError, r"dog1\.png does not decode"
    else:
        shard = tmp_path / "s-000000.tar"
        with wds.TarWriter(str(shard)) as writer:
            buffer = __import__("io").BytesIO()
            Image.new("RGB", (20, 20)).save(buffer, format="PNG")
            writer.write({"__key__": "big", "png": buffer.getvalue(), "cls": b"123456"})
        inputs, error, message = {"shards": str(shard)}, BadSampleError, r"sample 'big' in shard .*s-000000\.tar.*123456"
    with pytest.raises(error, match=message) as raised:
        run_with(tmp_path, tokenizer_checkpoint, num_workers=2, **inputs)
    assert type(raised.value) is error
    assert isinstance(raised.value.__cause__, WorkerTraceback) and "DataLoader worker" in str(raised.value.__cause__)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_a_resumed_run_decodes_only_images_without_files(tmp_path, tokenizer_checkpoint, image_sources, monkeypatch):
    import bar_lightning.pretokenize_inputs as pretokenize_inputs  # where the image files are decoded

    folder, _, _ = image_sources
    images = copy_folder(folder, tmp_path)
    out = tmp_path / "out"
    assert run_with(tmp_path, tokenizer_checkpoint, image_folder=str(images), num_workers=0)["num_samples"] == 6
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*.npz")}
    decoded = []
    decode = pretokenize_inputs.decode_image
    monkeypatch.setattr(pretokenize_inputs, "decode_image",
                        lambda path, **kwargs: decoded.append(path) or decode(path, **kwargs))
    (out / "metadata.json").unlink()  # interrupted before the end: every file is there
    metadata = run_with(tmp_path, tokenizer_checkpoint, image_folder=str(images), num_workers=0)
    assert decoded == [] and metadata["num_samples"] == 6  # present files still count as inputs
    (out / "metadata.json").unlink()
    (out / "train" / "00001" / "dog2.npz").unlink()
    assert run_with(tmp_path, tokenizer_checkpoint, image_folder=str(images), num_workers=0)["num_samples"] == 6
    assert [Path(path).name for path in decoded] == ["dog2.png"]
    # In workers too: an image whose file exists is not even opened (here it would not decode).
    (out / "metadata.json").unlink()
    (images / "cat" / "cat0.png").write_bytes(b"not an image")
    assert run_with(tmp_path, tokenizer_checkpoint, image_folder=str(images), num_workers=2)["num_samples"] == 6
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.npz") if path.name != "dog2.npz"} == {
        path: mtime for path, mtime in before.items() if path.name != "dog2.npz"}


def test_a_failed_write_stops_the_run(tmp_path, tokenizer_checkpoint, image_sources, monkeypatch):
    import bar_lightning.pretokenize_stages as pretokenize_stages  # where the token files are written

    folder, _, _ = image_sources
    write = pretokenize_stages.write_token_npz

    def write_or_fail(path, tokens, tokens_flip):
        if Path(path).name == "cat2.npz":
            raise OSError(28, "No space left on device", str(path))
        return write(path, tokens, tokens_flip)

    monkeypatch.setattr(pretokenize_stages, "write_token_npz", write_or_fail)
    with pytest.raises(OSError, match=r"No space left on device: '.*cat2\.npz'"):
        run_with(tmp_path, tokenizer_checkpoint, image_folder=str(folder), num_workers=2)
    out = tmp_path / "out"
    assert not (out / "metadata.json").exists() and not (out / "train" / "00000" / "cat2.npz").exists()
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]  # no partial file left


@pytest.mark.parametrize("value", [-1, "two", True, 1.5])
def test_num_workers_is_a_count_or_auto(tmp_path, tokenizer_checkpoint, value):
    from bar_lightning.config.schema import ConfigError

    with pytest.raises(ConfigError, match=rf"^num_workers={value!r}: use a count >= 0 \(0 decodes the images in the "
                                          r"main process\) or auto"):
        run_with(tmp_path, tokenizer_checkpoint, shards=str(tmp_path / "absent.tar"), num_workers=value)
    assert not (tmp_path / "out").exists()  # refused before the output folder is taken


def test_num_workers_auto_shares_the_cores_between_local_processes(monkeypatch):
    from bar_lightning.io import default_num_workers
    from bar_lightning.pretokenize import resolve_num_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto") == default_num_workers(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers("auto") == default_num_workers(4)
    assert resolve_num_workers(0) == 0 and resolve_num_workers(3) == 3
