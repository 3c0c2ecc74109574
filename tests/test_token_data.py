"""Token datasets (upstream .npz layout, synthetic bits) and the TokenDataModule; fast, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bar_lightning.config.schema import ConfigError, validate_train_config
from bar_lightning.data.tokens import (
    PretokenizedTokens,
    SyntheticBitTokens,
    write_token_metadata,
    write_token_npz,
)
from bar_lightning.lightning.token_datamodule import TokenDataModule

from .test_configs import compose_train

TOKENS = 4
BITS_PER_TOKEN = 3
LENGTH = TOKENS * BITS_PER_TOKEN
# Written in unsorted order on purpose: labels must follow the sorted folder names.
CLASS_FOLDERS = ("n02", "n00", "n01")
FILES_PER_CLASS = 4


def _bits(rng: np.random.Generator, length: int = LENGTH) -> np.ndarray:
    return rng.integers(0, 2, size=length).astype(bool)


def _make_folder(root: Path, files_per_class: int = FILES_PER_CLASS, with_metadata: bool = True) -> dict:
    """Write a small pretokenized folder; return {key: (tokens, tokens_flip)}."""
    rng = np.random.default_rng(0)
    written = {}
    for class_name in CLASS_FOLDERS:
        for i in range(files_per_class):
            tokens, tokens_flip = _bits(rng), _bits(rng)
            tokens_flip[0] = not tokens[0]  # so the two versions are always distinguishable
            write_token_npz(root / "train" / class_name / f"img_{i}.npz", tokens, tokens_flip)
            written[f"{class_name}/img_{i}"] = (tokens, tokens_flip)
    if with_metadata:
        write_token_metadata(
            root,
            num_samples=len(written),
            num_augmentations=2,
            img_size=256,
            levels_per_channel=2,
            token_dtype=str(np.bool_),
            codebook_size=2**BITS_PER_TOKEN,
            token_size=BITS_PER_TOKEN,
        )
    return written


@pytest.fixture
def token_folder(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, _make_folder(tmp_path)


def _flipped(dataset: PretokenizedTokens, written: dict, index: int) -> bool:
    """Which stored version item ``index`` returned, read from its bits."""
    item = dataset[index]
    tokens, tokens_flip = written[item["key"]]
    bits = item["bits"].numpy()
    assert np.array_equal(bits, tokens) != np.array_equal(bits, tokens_flip)
    return bool(np.array_equal(bits, tokens_flip))


# ---------------------------------------------------------------- writing and reading the upstream layout


def test_written_layout_matches_upstream(token_folder):
    root, written = token_folder
    with np.load(root / "train" / "n00" / "img_0.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["tokens", "tokens_flip"]
        assert npz["tokens"].dtype == np.bool_ and npz["tokens"].shape == (LENGTH,)
    metadata = json.loads((root / "metadata.json").read_text())
    assert metadata["storage_keys"] == ["tokens", "tokens_flip"] and metadata["format"] == "npz"
    assert metadata["token_size"] == BITS_PER_TOKEN
    # Atomic writes leave no temp files behind.
    assert not [p for p in root.rglob("*") if p.name.endswith(".partial")]


def test_read_back_values_labels_keys(token_folder):
    root, written = token_folder
    dataset = PretokenizedTokens(root, flip_probability=0.0, expected_length=LENGTH)
    assert dataset.classes == sorted(CLASS_FOLDERS)
    assert len(dataset) == len(written)
    keys = [dataset[i]["key"] for i in range(len(dataset))]
    assert keys == sorted(written)  # DatasetFolder order: sorted classes, then sorted files
    for i in range(len(dataset)):
        item = dataset[i]
        class_name = item["key"].split("/")[0]
        assert item["bits"].dtype == torch.int64 and item["bits"].shape == (LENGTH,)
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert int(item["label"]) == sorted(CLASS_FOLDERS).index(class_name)
        assert np.array_equal(item["bits"].numpy(), written[item["key"]][0])


def test_write_token_npz_validates(tmp_path):
    with pytest.raises(ValueError, match="0/1"):
        write_token_npz(tmp_path / "a.npz", np.array([0, 2, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="lengths differ"):
        write_token_npz(tmp_path / "a.npz", np.zeros(3, bool), np.zeros(4, bool))
    with pytest.raises(ValueError, match=".npz"):
        write_token_npz(tmp_path / "a.bin", np.zeros(3, bool), np.zeros(3, bool))
    # torch tensors are accepted too
    path = write_token_npz(tmp_path / "b.npz", torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]))
    with np.load(path) as npz:
        assert npz["tokens_flip"].tolist() == [True, False, True]


# ---------------------------------------------------------------- flip choice


def test_flip_about_half_reproducible_and_epoch_dependent(tmp_path):
    written = _make_folder(tmp_path, files_per_class=100, with_metadata=False)
    dataset = PretokenizedTokens(tmp_path, seed=3)
    choices = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        choices[epoch] = [_flipped(dataset, written, i) for i in range(len(dataset))]
        assert 0.4 < np.mean(choices[epoch]) < 0.6
    # Same (seed, epoch) -> same choices, also from a fresh dataset object.
    again = PretokenizedTokens(tmp_path, seed=3)
    again.set_epoch(1)
    assert [_flipped(again, written, i) for i in range(len(again))] == choices[1]
    assert choices[0] != choices[1]
    # Agreement between epochs is chance level, not a shifted copy.
    assert 0.35 < np.mean(np.equal(choices[0], choices[1])) < 0.65
    other_seed = PretokenizedTokens(tmp_path, seed=4)
    assert [_flipped(other_seed, written, i) for i in range(len(other_seed))] != choices[0]


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_flip_probability_extremes_are_exact(token_folder, probability):
    root, written = token_folder
    dataset = PretokenizedTokens(root, flip_probability=probability)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert all(_flipped(dataset, written, i) == bool(probability) for i in range(len(dataset)))


# ---------------------------------------------------------------- bad data


def test_wrong_length_file_raises_with_file_name(token_folder):
    root, _ = token_folder
    bad = write_token_npz(
        root / "train" / "n01" / "zz_short.npz", np.zeros(LENGTH - 1, bool), np.zeros(LENGTH - 1, bool)
    )
    dataset = PretokenizedTokens(root, expected_length=LENGTH, flip_probability=0.0)
    bad_index = next(i for i in range(len(dataset)) if dataset.key(i) == "n01/zz_short")
    with pytest.raises(ValueError, match=f"{bad.name}.*{LENGTH - 1} bits, expected {LENGTH}"):
        dataset[bad_index]


def test_wrong_length_first_file_fails_at_construction(token_folder):
    root, _ = token_folder
    write_token_npz(
        root / "train" / "n00" / "a_first.npz", np.zeros(LENGTH + 3, bool), np.zeros(LENGTH + 3, bool)
    )
    with pytest.raises(ValueError, match="a_first.npz"):
        PretokenizedTokens(root, expected_length=LENGTH)


def test_non_binary_values_raise_with_file_name(token_folder):
    root, _ = token_folder
    path = root / "train" / "n02" / "zz_levels.npz"
    np.savez_compressed(path, tokens=np.full(LENGTH, 3, np.uint8), tokens_flip=np.full(LENGTH, 3, np.uint8))
    dataset = PretokenizedTokens(root, expected_length=LENGTH, flip_probability=0.0)
    bad_index = next(i for i in range(len(dataset)) if dataset.key(i) == "n02/zz_levels")
    with pytest.raises(ValueError, match="zz_levels.npz.*other than 0/1"):
        dataset[bad_index]


def test_pickled_object_array_is_refused(token_folder):
    root, _ = token_folder
    path = root / "train" / "n00" / "zz_pickle.npz"
    np.savez(path, tokens=np.array([object()], dtype=object), tokens_flip=np.array([object()], dtype=object))
    dataset = PretokenizedTokens(root, expected_length=LENGTH, flip_probability=0.0)
    bad_index = next(i for i in range(len(dataset)) if dataset.key(i) == "n00/zz_pickle")
    # Refused from its .npy header (dtype object), before anything is unpickled or decompressed.
    with pytest.raises(ValueError, match="zz_pickle.npz: .tokens. is object"):
        dataset[bad_index]


def test_missing_storage_key_raises(token_folder):
    root, _ = token_folder
    np.savez_compressed(root / "train" / "n00" / "zz_nokey.npz", tokens=np.zeros(LENGTH, bool))
    dataset = PretokenizedTokens(root, flip_probability=1.0)
    bad_index = next(i for i in range(len(dataset)) if dataset.key(i) == "n00/zz_nokey")
    with pytest.raises(ValueError, match="zz_nokey.npz.*tokens_flip"):
        dataset[bad_index]


def test_metadata_mismatch_raises(token_folder):
    root, _ = token_folder
    metadata_path = root / "metadata.json"
    with pytest.raises(ValueError, match=rf"metadata.json.*token_size.*{BITS_PER_TOKEN}, expected 4"):
        PretokenizedTokens(root, expected_length=TOKENS * 4, bits_per_token=4)
    write_token_metadata(root, token_size=BITS_PER_TOKEN, num_tokens=TOKENS + 1, levels_per_channel=2)
    with pytest.raises(
        ValueError, match=rf"metadata.json.*{(TOKENS + 1) * BITS_PER_TOKEN} bits.*expected {LENGTH}"
    ):
        PretokenizedTokens(root, expected_length=LENGTH)
    write_token_metadata(root, token_size=5, levels_per_channel=2)
    with pytest.raises(ValueError, match=f"{metadata_path.name}.*does not divide.*{LENGTH}"):
        PretokenizedTokens(root, expected_length=LENGTH)
    write_token_metadata(root, token_size=BITS_PER_TOKEN, levels_per_channel=8, token_dtype="uint8")
    with pytest.raises(ValueError, match="levels_per_channel=8"):
        PretokenizedTokens(root, expected_length=LENGTH)


def test_missing_or_empty_folder_raises_with_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.*pretokenization"):
        PretokenizedTokens(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="train.*synthetic"):
        PretokenizedTokens(tmp_path)
    (tmp_path / "train" / "n00").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no \.npz files.*pretokenization"):
        PretokenizedTokens(tmp_path)


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_class_conditional():
    noise = 0.1
    dataset = SyntheticBitTokens(
        num_samples=400, num_classes=4, tokens=16, bits_per_token=16, seed=1, noise=noise
    )
    again = SyntheticBitTokens(
        num_samples=400, num_classes=4, tokens=16, bits_per_token=16, seed=1, noise=noise
    )
    item = dataset[37]
    assert item["key"] == "synthetic/37"
    assert item["bits"].dtype == torch.int64 and item["bits"].shape == (256,)
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert torch.equal(item["bits"], dataset[37]["bits"]) and torch.equal(item["bits"], again[37]["bits"])
    assert set(torch.unique(item["bits"]).tolist()) <= {0, 1}

    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    assert torch.bincount(labels).tolist() == [100] * 4
    bits = torch.stack([dataset[i]["bits"] for i in range(len(dataset))])
    for label in range(4):
        agreement = (bits[labels == label] == dataset.prototypes[label]).float().mean().item()
        assert abs(agreement - (1 - noise)) < 0.01
    # Different classes: prototypes are independent, so about half of the bits differ.
    assert 0.35 < (dataset.prototypes[0] != dataset.prototypes[1]).float().mean().item() < 0.65
    # Samples of one class are not identical copies.
    assert not torch.equal(bits[0], bits[4])

    other_seed = SyntheticBitTokens(num_samples=400, num_classes=4, tokens=16, bits_per_token=16, seed=2)
    assert not torch.equal(other_seed.prototypes, dataset.prototypes)
    held_out = SyntheticBitTokens(
        num_samples=8, num_classes=4, tokens=16, bits_per_token=16, seed=1, sample_seed=9
    )
    assert torch.equal(held_out.prototypes, dataset.prototypes)
    assert not torch.equal(held_out[0]["bits"], dataset[0]["bits"])


# ---------------------------------------------------------------- DataModule


def _datamodule(**overrides) -> TokenDataModule:
    arguments = dict(
        source="synthetic",
        batch_size=4,
        tokens=TOKENS,
        bits_per_token=BITS_PER_TOKEN,
        num_classes=3,
        synthetic_num_samples=18,
        pin_memory=False,
    )
    arguments.update(overrides)
    return TokenDataModule(**arguments)


def _check_batch(batch: dict, batch_size: int) -> None:
    assert batch["bits"].shape == (batch_size, LENGTH) and batch["bits"].dtype == torch.int64
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == torch.int64
    assert isinstance(batch["key"], list) and len(batch["key"]) == batch_size
    assert all(isinstance(key, str) for key in batch["key"])


def test_datamodule_synthetic_batches():
    datamodule = _datamodule(val_num_samples=6)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 18 // 4  # drop_last
    for batch in batches:
        _check_batch(batch, 4)
    val_batches = list(datamodule.val_dataloader())
    assert [len(b["key"]) for b in val_batches] == [4, 2]
    assert torch.equal(datamodule.val_dataset.prototypes, datamodule.train_dataset.prototypes)
    assert datamodule.hparams["batch_size"] == 4 and datamodule.hparams["source"] == "synthetic"
    assert _datamodule().val_dataloader() == []


def test_datamodule_pretokenized_batches(token_folder):
    root, written = token_folder
    datamodule = _datamodule(source="pretokenized", root=str(root), batch_size=5)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == len(written) // 5
    for batch in batches:
        _check_batch(batch, 5)
        for key, bits in zip(batch["key"], batch["bits"]):
            assert any(np.array_equal(bits.numpy(), version) for version in written[key])


def test_datamodule_epoch_reaches_persistent_workers(token_folder):
    root, written = token_folder
    datamodule = _datamodule(
        source="pretokenized", root=str(root), batch_size=2, num_workers=2, persistent_workers=True
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    dataset = datamodule.train_dataset
    for epoch in (0, 1, 2):
        datamodule.set_epoch(epoch)
        for batch in loader:
            for key, bits in zip(batch["key"], batch["bits"]):
                index = next(i for i in range(len(dataset)) if dataset.key(i) == key)
                expected = written[key][1] if dataset.is_flipped(index, epoch) else written[key][0]
                assert np.array_equal(bits.numpy(), expected), (epoch, key)


class _RecordingModule(pl.LightningModule):
    """Records the (epoch, key, bits) of every training item."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, str, np.ndarray]] = []

    def training_step(self, batch, batch_index):
        for key, bits in zip(batch["key"], batch["bits"]):
            self.seen.append((self.current_epoch, key, bits.numpy().copy()))
        return self.weight * batch["bits"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_sets_epoch_for_flip_choice(token_folder):
    root, written = token_folder
    datamodule = _datamodule(source="pretokenized", root=str(root), batch_size=4)
    module = _RecordingModule()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    dataset = datamodule.train_dataset
    key_to_index = {dataset.key(i): i for i in range(len(dataset))}
    assert {epoch for epoch, _, _ in module.seen} == {0, 1, 2}
    for epoch, key, bits in module.seen:
        expected_flip = dataset.is_flipped(key_to_index[key], epoch)
        assert np.array_equal(bits, written[key][1] if expected_flip else written[key][0])
    # The check above is only meaningful if the choices do change between epochs.
    choices = {
        epoch: {key: dataset.is_flipped(i, epoch) for key, i in key_to_index.items()} for epoch in range(3)
    }
    assert choices[0] != choices[1] != choices[2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=imagenet"], r"data\.source='imagenet'"),
        (["data.batch_size=0"], r"data\.batch_size=0 must be positive"),
        (["data.source=pretokenized"], r"data\.source=pretokenized needs data\.root"),
        (["data.source=pretokenized", "data.root=x", "data.val_num_samples=4"], r"data\.val_num_samples=4 applies only"),
        (["data.flip_probability=1.5"], r"data\.flip_probability=1\.5 must be in \[0, 1\]"),
        (["data.num_workers=-1"], r"data\.num_workers=-1"),
        (["data.seed=-1"], r"data\.seed=-1 must be >= 0"),
        (["data.persistent_workers=true"], r"data\.persistent_workers=true needs worker processes"),
        (["data.synthetic_num_samples=0"], r"data\.synthetic_num_samples=0 must be positive"),
        (["data.synthetic_noise=-0.1"], r"data\.synthetic_noise=-0\.1 must be in \[0, 1\]"),
        (["data.val_num_samples=-1"], r"data\.val_num_samples=-1 must be >= 0"),
    ],
)
def test_bad_data_settings_stop_at_the_config_naming_the_key(overrides, message):
    # The values are checked once, by the config (TokenDataModule trusts them); the files when setup reads them.
    cfg = compose_train(["experiment=tiny_generator", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


def test_datamodule_built_by_hand_refuses_an_unknown_source():
    with pytest.raises(ValueError, match="source='imagenet' is not a token source"):
        _datamodule(source="imagenet").setup("fit")


def test_datamodule_rejects_more_classes_than_num_classes(token_folder):
    root, _ = token_folder
    datamodule = _datamodule(source="pretokenized", root=str(root), num_classes=2)
    with pytest.raises(ValueError, match="3 class folders.*num_classes=2"):
        datamodule.setup("fit")


def test_datamodule_rejects_too_small_dataset():
    datamodule = _datamodule(synthetic_num_samples=3, batch_size=4)
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        datamodule.setup("fit")
