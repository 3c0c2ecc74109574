"""The demo feature network: shapes, training on a separable toy problem, save/load, FID-style distance, data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bar_lightning.data.convert import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_image
from bar_lightning.data.convert import load_fashion_mnist as load_fashion_mnist_idx
from bar_lightning.data.images import build_eval_transform
from bar_lightning.eval.demo_classifier import (
    FeatureStatistics,
    classifier_metrics,
    feature_statistics,
    features,
    frechet_distance,
    load_classifier,
    load_fashion_mnist,
    save_classifier,
    train_demo_classifier,
)
from bar_lightning.models.classifier import SmallImageClassifier

# Ten clearly different RGB colours in [-1, 1], one per class of the toy problem.
TOY_COLOURS = torch.tensor(
    [
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
        [1.0, 1.0, -1.0],
        [1.0, -1.0, 1.0],
        [-1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0],
        [1.0, 0.0, -1.0],
        [-1.0, 0.0, 1.0],
    ]
)


def toy_images(count: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable 10-class problem: a 10x10 square of the class's colour at a random place on a noisy grey field."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = -0.5 + 0.2 * torch.randn(count, 3, 32, 32, generator=generator)  # [N, 3, 32, 32]
    corners = torch.randint(0, 32 - 10, (count, 2), generator=generator)
    for index in range(count):
        row, col = corners[index].tolist()
        images[index, :, row : row + 10, col : col + 10] = TOY_COLOURS[labels[index]].view(3, 1, 1)
    return images.clamp(-1.0, 1.0), labels


def small_model(seed: int = 0, **overrides: int) -> SmallImageClassifier:
    torch.manual_seed(seed)
    config = {"width": 8, "feature_dim": 16} | overrides
    return SmallImageClassifier(**config).eval()


def test_model_shapes_and_feature_range() -> None:
    model = SmallImageClassifier()  # the documented defaults: width 32, feature_dim 128
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert model.features(images).shape == (5, 128)
        assert model(images).shape == (5, 10)
        assert (model.features(images) >= 0).all()  # features are taken after the ReLU
    assert small_model(num_classes=4).eval()(images).shape == (5, 4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(5, 1, 32, 32\)"):
        model.features(torch.zeros(5, 1, 32, 32))
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        SmallImageClassifier(width=0)


def test_training_learns_a_separable_toy_problem() -> None:
    train_images, train_labels = toy_images(640, seed=0)
    test_images, test_labels = toy_images(200, seed=1)
    untrained_accuracy = classifier_metrics(small_model(), test_images, labels=test_labels)["class_accuracy"]
    history: list[dict[str, float]] = []
    model = train_demo_classifier(
        train_images=train_images,
        train_labels=train_labels,
        epochs=3,
        batch_size=32,
        lr=1e-2,
        seed=0,
        device="cpu",
        width=8,
        feature_dim=32,
        random_flip=True,
        num_threads=None,  # keep the test suite's single deterministic thread
        on_epoch_end=history.append,
    )
    assert not model.training
    assert [entry["epoch"] for entry in history] == [0.0, 1.0, 2.0]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    accuracy = classifier_metrics(model, test_images, labels=test_labels)["class_accuracy"]
    assert untrained_accuracy < 0.3  # chance is 0.1
    assert accuracy > 0.8, accuracy


def test_training_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    images, labels = toy_images(96, seed=2)
    arguments = dict(
        train_images=images, train_labels=labels, epochs=1, batch_size=32, lr=1e-2, device="cpu", width=4,
        feature_dim=8, random_flip=True, num_threads=None,
    )  # fmt: skip
    torch.manual_seed(123)
    expected_next_random = torch.rand(1)
    torch.manual_seed(123)
    first = train_demo_classifier(seed=7, **arguments)
    assert torch.equal(torch.rand(1), expected_next_random)
    second = train_demo_classifier(seed=7, **arguments)
    other_seed = train_demo_classifier(seed=8, **arguments)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not torch.equal(
        first_state["feature_projection.weight"], other_seed.state_dict()["feature_projection.weight"]
    )


def test_training_rejects_bad_arguments() -> None:
    images, labels = toy_images(16, seed=0)
    with pytest.raises(ValueError, match="batch_size=32 is larger than the 16 training images"):
        train_demo_classifier(train_images=images, train_labels=labels, batch_size=32, num_threads=None)
    with pytest.raises(ValueError, match=r"train_labels must be an integer tensor \[16\].*\(15,\)"):
        train_demo_classifier(train_images=images, train_labels=labels[:15], batch_size=8, num_threads=None)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        train_demo_classifier(train_images=images, train_labels=labels, epochs=0, num_threads=None)


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    images, labels = toy_images(64, seed=3)
    model = train_demo_classifier(
        train_images=images, train_labels=labels, epochs=1, batch_size=16, lr=1e-2, seed=0, device="cpu",
        width=4, feature_dim=8, num_threads=None,
    )  # fmt: skip
    path = save_classifier(model, tmp_path / "nested" / "classifier.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "classifier.safetensors"
    ]  # no temporary file left
    loaded = load_classifier(path)
    assert not loaded.training
    assert (
        loaded.config()
        == model.config()
        == {"in_channels": 3, "num_classes": 10, "width": 4, "feature_dim": 8}
    )
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # BatchNorm running statistics are part of what makes the logits equal; check they were saved.
    assert torch.equal(loaded.blocks[0][2].running_var, model.blocks[0][2].running_var)

    with pytest.raises(FileNotFoundError, match="train and save them first"):
        load_classifier(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a demo classifier file"):
        load_classifier(tmp_path / "other.safetensors")


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians() -> None:
    # For diagonal covariances FID = |m1 - m2|^2 + sum((s1 - s2)^2), with s the standard deviations.
    first = FeatureStatistics(mean=np.array([0.0, 1.0, 2.0]), covariance=np.diag([1.0, 4.0, 9.0]), count=10)
    second = FeatureStatistics(mean=np.array([1.0, 1.0, 0.0]), covariance=np.diag([4.0, 4.0, 1.0]), count=10)
    expected = (1 + 0 + 4) + ((1 - 2) ** 2 + 0 + (3 - 1) ** 2)
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(second, first) == pytest.approx(expected, rel=1e-12)
    # Rotating both Gaussians together leaves the distance unchanged (checks the non-diagonal path).
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = [
        FeatureStatistics(mean=rotation @ s.mean, covariance=rotation @ s.covariance @ rotation.T, count=10)
        for s in (first, second)
    ]
    assert frechet_distance(*rotated) == pytest.approx(expected, rel=1e-9)


def test_fid_demo_is_zero_for_the_same_images_and_positive_for_different_ones() -> None:
    model = small_model()
    images, labels = toy_images(300, seed=4)
    reference = features(model, images)
    same = classifier_metrics(model, images, reference_features=reference)
    assert same["fid_demo"] == pytest.approx(0.0, abs=1e-8)
    assert same["num_images"] == 300.0 and "class_accuracy" not in same
    other_images, _ = toy_images(300, seed=5)
    other = classifier_metrics(model, other_images, reference_features=reference)["fid_demo"]
    shifted = classifier_metrics(model, (images * 0.5).flip(-2), reference_features=reference)["fid_demo"]
    assert (
        0.0 < other < shifted
    )  # a new draw of the same distribution is closer than a different distribution
    # Precomputed statistics give the same value as the raw reference features.
    from_statistics = classifier_metrics(
        model, other_images, reference_features=feature_statistics(reference)
    )
    assert from_statistics["fid_demo"] == other
    with pytest.raises(ValueError, match="nothing to compute"):
        classifier_metrics(model, images)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        classifier_metrics(model, images, labels=labels + 5)


def test_features_and_metrics_do_not_depend_on_batch_size() -> None:
    model = small_model(seed=1)
    model.train()  # features() must switch to eval mode itself and restore the mode
    images, labels = toy_images(100, seed=6)
    reference = features(model, toy_images(120, seed=7)[0], batch_size=64)
    assert model.training
    by_batch = {size: features(model, images, batch_size=size) for size in (1, 7, 100, 1000)}
    for size, rows in by_batch.items():
        assert rows.shape == (100, 16) and rows.dtype == torch.float32
        torch.testing.assert_close(rows, by_batch[100], rtol=1e-5, atol=1e-6, msg=f"batch_size={size}")
    metrics = [
        classifier_metrics(model, images, labels=labels, reference_features=reference, batch_size=size)
        for size in (3, 100)
    ]
    assert metrics[0]["class_accuracy"] == metrics[1]["class_accuracy"]
    assert metrics[0]["fid_demo"] == pytest.approx(metrics[1]["fid_demo"], rel=1e-5, abs=1e-9)


def test_load_fashion_mnist_names_the_install_command_when_files_are_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist") as error:
        load_fashion_mnist(tmp_path / "absent", split="test")
    assert "root=" in str(error.value)
    tmp_path.joinpath("present").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"t10k-images-idx3-ubyte.*apt-get install -y dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path / "present", split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist(tmp_path, split="validation")


@pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file()
    and not Path(DEFAULT_FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_load_fashion_mnist_test_split_matches_the_image_pipeline() -> None:
    images, labels = load_fashion_mnist(split="test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))
    # Same pixels as the shards through the DataModule's eval transform (PNG is lossless, so skip the shards).
    pixels, idx_labels = load_fashion_mnist_idx(DEFAULT_FASHION_MNIST_ROOT, split="test")
    eval_transform = build_eval_transform(crop_size=32)
    for index in (0, 1, 9999):
        expected = eval_transform(fashion_mnist_image(pixels[index], size=32))
        assert torch.equal(images[index], expected), index
        assert labels[index] == int(idx_labels[index])
