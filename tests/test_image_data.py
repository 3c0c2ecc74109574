"""Image shards: the converter (image folders, Fashion-MNIST IDX), transforms, training and evaluation pipelines,
bad-data handling and the ImageDataModule. Fast, CPU only; all shards are tiny and written into tmp_path."""

from __future__ import annotations

import collections
import copy
import gzip
import io
import json
import math
import tarfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from bar_lightning.data import convert
from bar_lightning.data.images import (
    SKIP_REASONS,
    BadSampleError,
    BadSampleWarning,
    ShardDataError,
    SkipCounter,
    SkipRateExceededError,
    build_eval_transform,
    build_image_transform,
    expand_shard_pattern,
    make_eval_dataset,
    make_train_dataset,
    samples_per_worker_for_epoch,
    shards_for_rank_and_worker,
)
from bar_lightning.lightning.image_datamodule import ImageDataModule

REAL_FASHION_MNIST = Path(convert.DEFAULT_FASHION_MNIST_ROOT)
SMALL_TRANSFORM = build_image_transform(
    resize_shorter_edge=8, crop_size=8, random_crop=True, random_flip=True
)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _png_bytes(value: int, size: tuple[int, int] = (10, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def _good_samples(prefix: str, count: int) -> list[dict]:
    return [
        {"__key__": f"{prefix}-{i:03d}", "png": _png_bytes(i * 7 % 256), "cls": i % 3} for i in range(count)
    ]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member, not at a block boundary
    return path


def _read_raw_shards(pattern: str) -> list[dict]:
    return list(wds.WebDataset(expand_shard_pattern(pattern), shardshuffle=False, empty_check=False))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# --------------------------------------------------------------------------------------------------------------
# Converter: image folders
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, int]]]:
    """Class folders created out of order, mixed modes and sizes, awkward names; returns {key: (rgb, label)}."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    expected: dict[str, tuple[np.ndarray, int]] = {}
    files = {
        "zebra": ["z1.png", "z 2.v1.png"],
        "apple": ["a0.jpg", "nested/a1.png", "a1.png"],
        "mango": ["m0.png", "m0.bmp"],  # same stem twice: the second key gets "-2"
    }
    labels = {"apple": 0, "mango": 1, "zebra": 2}
    keys = {
        ("zebra", "z1.png"): "zebra/z1",
        ("zebra", "z 2.v1.png"): "zebra/z_2_v1",
        ("apple", "a0.jpg"): "apple/a0",
        ("apple", "nested/a1.png"): "apple/nested/a1",
        ("apple", "a1.png"): "apple/a1",
        ("mango", "m0.bmp"): "mango/m0",  # sorted first
        ("mango", "m0.png"): "mango/m0-2",
    }
    for class_name, names in files.items():
        for name in names:
            path = root / class_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if name == "a1.png":
                image = image.convert("L")  # grey: must come out as RGB
            if name.endswith(".jpg"):
                image.save(path, quality=90)
            else:
                image.save(path)
            with Image.open(path) as written:  # what the file decodes to (JPEG is lossy on disk)
                expected[keys[(class_name, name)]] = (np.asarray(written.convert("RGB")), labels[class_name])
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root, expected


def test_image_folder_round_trip(tmp_path: Path, image_folder) -> None:
    root, expected = image_folder
    out = tmp_path / "shards"
    summary = convert.convert_image_folder(source_dir=root, out_dir=out, prefix="toy-train", max_count=3)

    assert summary.samples == len(expected) == 7
    assert [p.name for p in summary.shards] == [f"toy-train-{i:06d}.tar" for i in range(math.ceil(7 / 3))]
    assert summary.pattern.endswith("toy-train-{000000..000002}.tar")
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["apple", "mango", "zebra"]}
    assert sorted(p.name for p in out.iterdir()) == (
        ["classes.json"] + [p.name for p in summary.shards] + ["toy-train.index.json"]
    )
    # The shard index (webdataset's wids format) counts every shard's samples and names them without braces.
    index = json.loads(summary.index.read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [(entry["url"], entry["nsamples"]) for entry in index["shardlist"]] == [
        ("toy-train-000000.tar", 3), ("toy-train-000001.tar", 3), ("toy-train-000002.tar", 1)
    ]
    assert all(entry["filesize"] == (out / entry["url"]).stat().st_size for entry in index["shardlist"])
    assert expand_shard_pattern(str(summary.index)) == [str(path) for path in summary.shards]

    samples = _read_raw_shards(summary.pattern)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) and set(keys) == set(expected)
    for sample in samples:
        pixels, label = expected[sample["__key__"]]
        assert int(sample["cls"]) == label
        assert set(sample) >= {"png", "cls"} and "jpg" not in sample
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), pixels)  # PNG is lossless

    # Same folder, same seed: identical shards (stable keys and order).
    again = convert.convert_image_folder(
        source_dir=root, out_dir=tmp_path / "again", prefix="toy-train", max_count=3
    )
    for first, second in zip(summary.shards, again.shards):
        assert first.read_bytes() == second.read_bytes()


def test_image_folder_refuses_to_mix_shard_sets_and_jpg_option(tmp_path: Path, image_folder) -> None:
    root, _ = image_folder
    out = tmp_path / "shards"
    convert.convert_image_folder(source_dir=root, out_dir=out, prefix="toy", max_count=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.convert_image_folder(source_dir=root, out_dir=out, prefix="toy")
    summary = convert.convert_image_folder(
        source_dir=root, out_dir=out, prefix="toy", max_count=100, image_format="jpg", overwrite=True
    )
    assert [p.name for p in sorted(out.glob("toy-*.tar"))] == ["toy-000000.tar"]  # old 4 shards replaced
    assert all("jpg" in s and "png" not in s for s in _read_raw_shards(summary.pattern))


def test_interrupted_conversion_leaves_no_shard(tmp_path: Path) -> None:
    def samples_then_crash():
        yield from _good_samples("s", 5)
        raise KeyboardInterrupt  # like Ctrl-C in the middle of the second shard

    with pytest.raises(KeyboardInterrupt):
        convert.write_shards(samples_then_crash(), out_dir=tmp_path, prefix="crash", max_count=3)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Converter: Fashion-MNIST
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_fashion_mnist(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path / "fmnist-idx"
    root.mkdir()
    rng = np.random.default_rng(1)
    data = {}
    for split, count, compressed in (("train", 7, True), ("test", 3, False)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        images_stem, labels_stem = convert.FASHION_MNIST_FILES[split]
        suffix = ".gz" if compressed else ""
        _write_idx(root / f"{images_stem}{suffix}", images, convert.IDX_IMAGES_MAGIC)
        _write_idx(root / f"{labels_stem}{suffix}", labels, convert.IDX_LABELS_MAGIC)
        data[split] = (images, labels)
    return root, data


def test_fashion_mnist_converter_on_synthetic_idx(tmp_path: Path, tiny_fashion_mnist, capsys) -> None:
    root, data = tiny_fashion_mnist
    out = tmp_path / "shards"
    code = convert.main(["fashion-mnist", "--root", str(root), "--out", str(out), "--max-count", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "train: 7 samples in 2 shards" in printed and "test: 3 samples in 1 shards" in printed

    assert sorted(p.name for p in out.glob("*.tar")) == [
        "fmnist-test-000000.tar",
        "fmnist-train-000000.tar",
        "fmnist-train-000001.tar",
    ]
    assert json.loads((out / "classes.json").read_text())["classes"] == list(convert.FASHION_MNIST_CLASSES)
    for split, (images, labels) in data.items():
        samples = _read_raw_shards(str(out / f"fmnist-{split}-*.tar"))
        assert [s["__key__"] for s in samples] == [f"fmnist-{split}-{i:06d}" for i in range(len(images))]
        for sample, pixels, label in zip(samples, images, labels):
            assert int(sample["cls"]) == int(label)
            with Image.open(io.BytesIO(sample["png"])) as image:
                decoded = np.asarray(image)
            assert image.mode == "RGB" and decoded.shape == (32, 32, 3)
            reference = Image.fromarray(pixels).resize((32, 32), resample=Image.Resampling.BICUBIC)
            np.testing.assert_array_equal(decoded[..., 1], np.asarray(reference))


def test_fashion_mnist_missing_root_names_the_package(tmp_path: Path, capsys) -> None:
    code = convert.main(["fashion-mnist", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    wrong_magic = tmp_path / "wrong"
    wrong_magic.write_bytes((0x00000903).to_bytes(4, "big") + b"\0" * 8)
    with pytest.raises(ValueError, match="magic"):
        convert.read_idx(wrong_magic)
    truncated = tmp_path / "short"
    _write_idx(truncated, np.zeros((2, 28, 28), dtype=np.uint8), convert.IDX_IMAGES_MAGIC)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        convert.read_idx(truncated)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files_parse() -> None:
    images, labels = convert.load_fashion_mnist(REAL_FASHION_MNIST, split="train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels).tolist()) == set(range(10))
    test_images, test_labels = convert.load_fashion_mnist(REAL_FASHION_MNIST, split="test")
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------


def test_transform_shape_range_and_centre_crop() -> None:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8))
    augmented = build_image_transform(
        resize_shorter_edge=20, crop_size=16, random_crop=True, random_flip=True
    )
    for _ in range(3):
        output = augmented(image)
        assert output.shape == (3, 16, 16) and output.dtype == torch.float32 and type(output) is torch.Tensor
        assert output.min() >= -1.0 and output.max() <= 1.0

    centre = build_image_transform(resize_shorter_edge=20, crop_size=16, random_crop=False, random_flip=False)
    np.testing.assert_array_equal(centre(image).numpy(), centre(image).numpy())
    # Matches a hand-made reference: PIL bicubic resize of the shorter edge (40 -> 20, 60 -> 30), centre crop.
    resized = np.asarray(image.resize((30, 20), resample=Image.Resampling.BICUBIC), dtype=np.float32)
    reference = resized[2:18, 7:23] / 127.5 - 1.0
    torch.testing.assert_close(centre(image), torch.from_numpy(reference).permute(2, 0, 1), atol=1e-6, rtol=0)

    grey = Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8))
    grey_output = build_eval_transform(crop_size=16)(grey)
    assert grey_output.shape == (3, 16, 16)
    assert torch.equal(grey_output[0], grey_output[1]) and torch.equal(grey_output[1], grey_output[2])

    with pytest.raises(ValueError, match="resize_shorter_edge"):
        build_image_transform(resize_shorter_edge=8, crop_size=16, random_crop=False, random_flip=False)


# --------------------------------------------------------------------------------------------------------------
# Shard lists and pipelines
# --------------------------------------------------------------------------------------------------------------


def test_missing_shard_pattern_raises_naming_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "absent-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="absent-\\{000000..000003\\}"):
        expand_shard_pattern(pattern)
    with pytest.raises(FileNotFoundError, match="absent-\\*"):
        expand_shard_pattern(str(tmp_path / "absent-*.tar"))
    _write_shard(tmp_path / "part-000000.tar", _good_samples("p", 2))
    with pytest.raises(FileNotFoundError, match="1 of the 2 shards"):
        expand_shard_pattern(str(tmp_path / "part-{000000..000001}.tar"))
    assert expand_shard_pattern(str(tmp_path / "part-*.tar")) == [str(tmp_path / "part-000000.tar")]
    module = ImageDataModule(
        train_shards=pattern, batch_size=2, resize_shorter_edge=8, crop_size=8, samples_per_epoch=4
    )
    with pytest.raises(FileNotFoundError, match="absent"):
        module.prepare_data()


def test_eval_loader_covers_every_key_once_over_two_ranks_and_two_workers(tmp_path: Path) -> None:
    expected = []
    for shard_index, size in enumerate((5, 3, 4, 1, 6)):
        samples = _good_samples(f"e{shard_index}", size)
        expected += [s["__key__"] for s in samples]
        _write_shard(tmp_path / f"val-{shard_index:06d}.tar", samples)
    pattern = str(tmp_path / "val-{000000..000004}.tar")
    seen = []
    for rank in range(2):
        dataset = make_eval_dataset(
            shards=pattern, transform=build_eval_transform(crop_size=8), rank=rank, world_size=2
        )
        loader = DataLoader(dataset, batch_size=3, num_workers=2)
        batches = list(loader)
        assert all(b["image"].shape[1:] == (3, 8, 8) and b["label"].dtype == torch.int64 for b in batches)
        seen += _keys(batches)
    assert collections.Counter(seen) == collections.Counter(expected)
    assert shards_for_rank_and_worker(list("abcde"), rank=1, world_size=2, worker_id=0, num_workers=2) == [
        "b"
    ]


def test_train_loader_yields_with_epoch_batches(tmp_path: Path) -> None:
    for shard_index in range(3):
        _write_shard(tmp_path / f"train-{shard_index:06d}.tar", _good_samples(f"t{shard_index}", 10))
    pattern = str(tmp_path / "train-*.tar")
    assert samples_per_worker_for_epoch(samples_per_epoch=50, world_size=1, num_workers=2, batch_size=4) == 28

    dataset = make_train_dataset(
        shards=pattern,
        transform=SMALL_TRANSFORM,
        batch_size=4,
        samples_per_epoch=50,
        num_workers=2,
        seed=3,
        shuffle_buffer=8,
    )
    loader = DataLoader(dataset, batch_size=4, num_workers=2, drop_last=True)
    assert len(dataset) == 56 and len(loader) == 14
    for _ in range(2):  # a second epoch has the same length
        batches = list(loader)
        assert len(batches) == 14
        assert all(b["image"].shape == (4, 3, 8, 8) and b["label"].shape == (4,) for b in batches)

    def keys_of(rank: int, epoch: int) -> list[str]:
        single = make_train_dataset(
            shards=pattern,
            transform=SMALL_TRANSFORM,
            batch_size=4,
            samples_per_epoch=40,
            num_workers=0,
            seed=3,
            shuffle_buffer=8,
            rank=rank,
            world_size=2,
        )
        single.set_epoch(epoch)
        return [item["key"] for item in single]

    assert len(keys_of(0, 0)) == 20
    assert keys_of(0, 0) == keys_of(0, 0)  # seeded by (seed, rank, worker, epoch)
    assert keys_of(0, 0) != keys_of(1, 0) and keys_of(0, 0) != keys_of(0, 1)


@pytest.fixture
def broken_training_shards(tmp_path: Path) -> tuple[str, Path, Path]:
    """One shard with every kind of bad sample among good ones, one truncated shard."""
    bad = _good_samples("good", 30) + [
        {"__key__": "bad-image", "png": b"\x89PNG not really", "cls": 1},
        {"__key__": "no-label", "png": _png_bytes(3)},
        {"__key__": "no-image", "cls": 2},
        {"__key__": "bad-label", "png": _png_bytes(4), "cls": "cat"},
        {"__key__": "good-001", "png": _png_bytes(5), "cls": 0},  # duplicate key, not adjacent
        {"__key__": "too-big", "png": _png_bytes(6, size=(30, 30)), "cls": 0},  # 900 pixels > the 500 allowed
    ]
    bad_shard = _write_shard(tmp_path / "mixed-000000.tar", bad)
    truncated_shard = _truncate(_write_shard(tmp_path / "mixed-000001.tar", _good_samples("cut", 30)))
    _write_shard(tmp_path / "mixed-000002.tar", [])  # a well-formed shard without samples
    return str(tmp_path / "mixed-*.tar"), bad_shard, truncated_shard


def test_training_skips_bad_samples_and_truncated_shards(broken_training_shards) -> None:
    pattern, bad_shard, truncated_shard = broken_training_shards
    dataset = make_train_dataset(
        shards=pattern,
        transform=SMALL_TRANSFORM,
        batch_size=5,
        samples_per_epoch=200,
        num_workers=0,
        shuffle_buffer=10,
        max_skip_rate=0.5,
        min_samples_for_skip_rate=10,
        max_image_pixels=500,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(dataset)
    assert len(items) == 200 and all(
        item["key"] not in {"bad-image", "no-label", "no-image"} for item in items
    )
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    counter = dataset.skip_counter
    assert counter.skipped == len(messages) > 0 and counter.seen >= 200 + counter.skipped
    for reason in SKIP_REASONS:
        assert counter.by_reason[reason] > 0, reason
    assert sum(counter.by_reason.values()) == counter.skipped
    assert any("'bad-image'" in m and str(bad_shard) in m and "undecodable_image" in m for m in messages)
    assert any("'good-001'" in m and "duplicate_key" in m for m in messages)
    assert any(str(truncated_shard) in m and "unreadable_shard" in m for m in messages)
    assert any("'too-big'" in m and "30x30 = 900 pixels" in m and "max_image_pixels=500" in m for m in messages)
    assert any("mixed-000002.tar" in m and "empty_shard" in m for m in messages)


def test_skip_counter_is_shared_with_workers(broken_training_shards) -> None:
    pattern, _, _ = broken_training_shards
    counter = SkipCounter()
    dataset = make_train_dataset(
        shards=pattern,
        transform=SMALL_TRANSFORM,
        batch_size=5,
        samples_per_epoch=100,
        num_workers=2,
        shuffle_buffer=10,
        max_skip_rate=0.5,
        min_samples_for_skip_rate=10,
        skip_counter=counter,
    )
    assert len(list(DataLoader(dataset, batch_size=5, num_workers=2, drop_last=True))) == 20
    assert counter.skipped > 0 and counter.seen >= 100  # counted in the workers, visible here


def test_skip_counter_sums_rows_and_detaches_on_copy() -> None:
    counter = SkipCounter(max_workers=2)
    counter.record(seen=3)
    assert counter.record(seen=1, reason="bad_label") == (4, 1)
    snapshot = copy.deepcopy(counter)
    counter.record(seen=1, reason="bad_label")
    assert (snapshot.seen, snapshot.skipped) == (4, 1) and counter.by_reason["bad_label"] == 2
    assert counter.skip_rate == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="reason must be one of"):
        counter.record(reason="cosmic_ray")
    counter.reset()
    assert (counter.seen, counter.skipped) == (0, 0)


def test_training_on_shards_without_samples_fails_instead_of_hanging(tmp_path: Path) -> None:
    _write_shard(tmp_path / "empty-000000.tar", [])
    dataset = make_train_dataset(
        shards=str(tmp_path / "empty-000000.tar"),
        transform=SMALL_TRANSFORM,
        batch_size=2,
        samples_per_epoch=4,
        num_workers=0,
    )
    with pytest.raises(ShardDataError, match="held no usable sample"):
        list(dataset)


def test_skip_rate_above_threshold_raises(tmp_path: Path) -> None:
    samples = []
    for i in range(40):
        samples.append({"__key__": f"ok-{i:03d}", "png": _png_bytes(i), "cls": 0})
        samples.append({"__key__": f"broken-{i:03d}", "png": b"garbage", "cls": 0})
    _write_shard(tmp_path / "half-000000.tar", samples)
    dataset = make_train_dataset(
        shards=str(tmp_path / "half-000000.tar"),
        transform=SMALL_TRANSFORM,
        batch_size=4,
        samples_per_epoch=100,
        num_workers=0,
        max_skip_rate=0.01,
        min_samples_for_skip_rate=20,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(SkipRateExceededError, match="max_skip_rate"):
            list(dataset)


def test_eval_raises_on_bad_sample_naming_shard_and_key(tmp_path: Path) -> None:
    shard = _write_shard(
        tmp_path / "val-000000.tar", _good_samples("v", 3) + [{"__key__": "v-broken", "png": b"xx", "cls": 1}]
    )
    dataset = make_eval_dataset(shards=str(shard), transform=build_eval_transform(crop_size=8))
    with pytest.raises(BadSampleError) as raised:
        list(dataset)
    assert "'v-broken'" in str(raised.value) and str(shard) in str(raised.value)
    # Also through a worker process, and for a truncated shard.
    worker_iterator = iter(DataLoader(dataset, batch_size=2, num_workers=1))
    try:
        with pytest.raises(BadSampleError, match="v-broken"):
            list(worker_iterator)
    finally:
        # After a worker error torch leaves the iterator in a reference cycle; without this the worker is
        # shut down by a later gc pass, which waits torch's 5 s join timeout.
        worker_iterator._shutdown_workers()
    truncated = _truncate(_write_shard(tmp_path / "cut-000000.tar", _good_samples("c", 20)))
    with pytest.raises(BadSampleError, match="unreadable_shard.*cut-000000.tar"):
        list(make_eval_dataset(shards=str(truncated), transform=build_eval_transform(crop_size=8)))


def test_truncated_tar_is_really_unreadable(tmp_path: Path) -> None:
    # Guards the fixture: a truncated shard must make tarfile fail, not end quietly.
    truncated = _truncate(_write_shard(tmp_path / "t.tar", _good_samples("x", 20)))
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(truncated, mode="r|*") as stream:
            for member in stream:
                stream.extractfile(member).read()


# --------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------


class _MeanPixelModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.train_batches = 0
        self.val_keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_batches += 1
        skipped = self.trainer.datamodule.skip_counter.skipped
        self.log("data/skipped", float(skipped), on_step=True, reduce_fx="max")
        return ((self.scale * batch["image"]).mean() - 1.0) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_keys += batch["key"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_fit_smoke(tmp_path: Path) -> None:
    for shard_index in range(2):
        _write_shard(tmp_path / f"train-{shard_index:06d}.tar", _good_samples(f"t{shard_index}", 12))
    _write_shard(tmp_path / "val-000000.tar", _good_samples("v", 5))
    module = ImageDataModule(
        train_shards=str(tmp_path / "train-{000000..000001}.tar"),
        eval_shards=str(tmp_path / "val-000000.tar"),
        batch_size=4,
        eval_batch_size=2,
        num_workers=0,
        resize_shorter_edge=10,
        crop_size=8,
        samples_per_epoch=16,
        shuffle_buffer=4,
    )
    model = _MeanPixelModel()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=module)
    assert model.train_batches == 2 * 4
    assert sorted(model.val_keys) == sorted([f"v-{i:03d}" for i in range(5)] * 2)
    assert module.skip_counter.skipped == 0 and module.skip_counter.seen >= 32
