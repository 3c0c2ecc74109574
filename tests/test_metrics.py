"""Generation metrics: offline Inception weights, ADM .npz files, FID numerics, early errors.

The Inception network runs at 299x299 whatever the input size (about 0.5-1 s per image on two CPU cores), so
the tests that run it use 4-5 images per set; everything else is checked on synthetic features.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from bar_lightning.eval import metrics as metrics_module
from bar_lightning.eval.metrics import (
    INCEPTION_FEATURE_DIM,
    SFID_FEATURE_DIM,
    SFID_FEATURE_LAYER,
    InceptionFeatureStream,
    RunningFeatureStatistics,
    check_weights_file,
    compute_generation_metrics,
    extract_inception_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    inspect_reference_npz,
    load_adm_npz,
    load_reference_statistics,
    manifold_precision_recall,
    metrics_of_sample_features,
    save_adm_npz,
    save_reference_statistics,
)

SMALL = {"allow_small_sample": True, "kid_subset_size": 4, "kid_subsets": 10, "isc_split_size": 2}


def _refuse_download(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args} {kwargs}")


@pytest.fixture(scope="module", autouse=True)
def _no_downloads():
    """Any attempt of torch-fidelity / torch.hub to fetch weights fails the tests."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", _refuse_download)
        patch.setattr(torch.hub, "load_state_dict_from_url", _refuse_download)
        patch.setattr(torch.hub, "download_url_to_file", _refuse_download)
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Module-scoped fixtures run before conftest's per-test thread pinning; one thread is also the fastest on a
    # shared two-core machine (intra-op threads stall when another process holds a core).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "bright_noise": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "dark_noise": (rng.random((4, 32, 32, 3)) * 100).astype(np.uint8),
    }


@pytest.fixture(scope="module")
def metrics_bright_vs_dark(image_sets, inception_weights) -> dict[str, float]:
    return compute_generation_metrics(
        image_sets["bright_noise"], reference=image_sets["dark_noise"], inception_weights=inception_weights, **SMALL
    )


# ----------------------------------------------------------------------------------------------- weights files


def test_weights_fixture_round_trips_through_check(inception_weights):
    checked = check_weights_file(inception_weights, what="FID Inception weights", needed_by="the test")
    assert str(checked) == inception_weights
    state_dict = torch.load(checked, map_location="cpu", weights_only=True)
    assert state_dict["fc.weight"].shape == (1008, INCEPTION_FEATURE_DIM)


def test_missing_weights_file_names_file_what_and_who(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match="FID Inception weights.*weights-inception.pth|weights-inception.pth"):
        check_weights_file(missing, what="FID Inception weights", needed_by="metrics.inception_weights")
    with pytest.raises(FileNotFoundError) as error:
        check_weights_file(missing, what="FID Inception weights", needed_by="metrics.inception_weights")
    assert str(missing) in str(error.value) and "metrics.inception_weights" in str(error.value)
    with pytest.raises(FileNotFoundError, match="No path was given for the FID Inception weights"):
        check_weights_file(None, what="FID Inception weights", needed_by="metrics.inception_weights")


class _RunsShellCommand:
    """Unpickling this object would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = {"fc.weight": torch.zeros(2), "evil": _RunsShellCommand(f"touch {marker}")}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    with pytest.raises(ValueError, match="not a plain tensor checkpoint|not a readable torch checkpoint"):
        check_weights_file(path, what="FID Inception weights", needed_by="the test")
    assert not marker.exists(), "unpickling ran the payload"


def test_non_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        check_weights_file(path, what="FID Inception weights", needed_by="the test")


# ----------------------------------------------------------------------------------------------- ADM .npz files


def test_adm_npz_round_trip(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    path = save_adm_npz(tmp_path / "samples.npz", images, labels=np.array([0, 5, 9]))
    assert path == tmp_path / "samples.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left behind
    np.testing.assert_array_equal(load_adm_npz(path), images)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_1"], [0, 5, 9])
    contents = inspect_reference_npz(path)
    assert contents.image_shape == (3, 8, 6, 3) and contents.statistics_dim is None


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), "dtype float32, expected uint8"),
        (np.zeros((8, 8, 3), np.uint8), "expected 4-D"),
        (np.zeros((2, 3, 8, 8), np.uint8), "channels first"),
        (np.zeros((2, 8, 8, 4), np.uint8), "3 channels last"),
    ],
)
def test_adm_npz_format_errors(tmp_path, array, message):
    with pytest.raises(ValueError, match=message):
        save_adm_npz(tmp_path / "bad.npz", array)
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ValueError, match=message):
        load_adm_npz(tmp_path / "bad.npz")


def test_statistics_only_npz(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = save_reference_statistics(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    loaded_mu, loaded_sigma = load_reference_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert inspect_reference_npz(path).statistics_dim == 3
    with pytest.raises(ValueError, match="has no images.*FID statistics only"):
        load_adm_npz(path)
    images_only = save_adm_npz(tmp_path / "images.npz", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images\.npz has no FID statistics \['mu', 'sigma'\]"):
        load_reference_statistics(images_only)


def test_pickled_object_arrays_are_not_loaded(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_adm_npz(path)


# ----------------------------------------------------------------------------------------------- FID numerics


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    variances1, variances2 = rng.random(16) + 0.1, rng.random(16) + 0.1
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(variances1) - np.sqrt(variances2)) ** 2).sum()
    value = frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2))
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    first = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    second = rng.normal(size=(300, 32)) * 2.0 + 0.5
    mu1, sigma1 = feature_statistics(first)
    mu2, sigma2 = feature_statistics(second)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(ours, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="feature dimensions differ: 32 vs 3"):
        frechet_distance(mu1, sigma1, np.zeros(3), np.eye(3))


def test_low_rank_fid_path_equals_full_formula():
    # Fewer rows than dimensions: the n x n route used by compute_generation_metrics must equal the D x D one.
    rng = np.random.default_rng(4)
    few_rows, other_rows = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) + 0.3
    full = frechet_distance(*feature_statistics(few_rows), *feature_statistics(other_rows))
    via_features = metrics_module._frechet_distance_of_features(torch.from_numpy(few_rows), torch.from_numpy(other_rows))
    via_statistics = metrics_module._frechet_distance_of_features(
        torch.from_numpy(few_rows), feature_statistics(other_rows)
    )
    assert via_features == pytest.approx(full, rel=1e-10)
    assert via_statistics == pytest.approx(full, rel=1e-10)
    # Against an isotropic covariance c I the trace term is sqrt(c) * (sum of singular values of A / sqrt(n - 1)).
    centred = few_rows - few_rows.mean(0)
    scale = 2.5
    expected = (
        (few_rows.mean(0) ** 2).sum() + (centred**2).sum() / 5 + 40 * scale
        - 2 * np.sqrt(scale) * np.linalg.svd(centred / np.sqrt(5), compute_uv=False).sum()
    )
    isotropic = (np.zeros(40), scale * np.eye(40))
    assert metrics_module._frechet_distance_of_features(torch.from_numpy(few_rows), isotropic) == pytest.approx(
        expected, rel=1e-12
    )
    assert frechet_distance(*feature_statistics(few_rows), *isotropic) == pytest.approx(expected, rel=1e-12)


def test_feature_statistics_do_not_depend_on_chunking():
    rng = np.random.default_rng(5)
    features = (rng.normal(size=(50, 24)) * 3.0 + 10.0).astype(np.float32)  # float32 like Inception features
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-13, atol=0)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-11, atol=1e-12)
    for chunk_size in (1, 7, 50):
        running = RunningFeatureStatistics()
        for start in range(0, len(features), chunk_size):
            running.update(torch.from_numpy(features[start : start + chunk_size]))
        chunked_mu, chunked_sigma = running.compute()
        np.testing.assert_allclose(chunked_mu, mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(chunked_sigma, sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 feature rows"):
        feature_statistics(features[:1])


# ----------------------------------------------------------------------------------------------- Inception metrics


def test_metrics_of_different_sets(metrics_bright_vs_dark):
    result = metrics_bright_vs_dark
    assert set(result) == {"fid", "sfid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score"}
    assert all(isinstance(value, float) and np.isfinite(value) for value in result.values())
    assert result["fid"] > 1.0 and result["sfid"] > 0.0
    assert result["isc"] >= 1.0 - 1e-6
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


# Direct float64 implementations of ADM's evaluator formulas (guided-diffusion/evaluations/evaluator.py), written
# with full matrices and numpy: what the blocked, device-side functions must reproduce.


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    logits = logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def adm_precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    def squared_distances(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    reference, samples = reference.astype(np.float64), samples.astype(np.float64)
    reference_radii = np.partition(squared_distances(reference, reference), k, axis=1)[:, k]
    sample_radii = np.partition(squared_distances(samples, samples), k, axis=1)[:, k]
    between = squared_distances(reference, samples)  # [reference, sample]
    precision = (between <= reference_radii[:, None]).any(axis=0).mean()
    recall = (between <= sample_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_inception_score_is_adms_split_formula_and_independent_of_batches():
    logits = np.random.default_rng(3).normal(size=(23, 1008)).astype(np.float32) * 4
    for split_size in (5, 23, 5000):
        mean, std = inception_score(torch.from_numpy(logits), split_size=split_size)
        assert mean == pytest.approx(adm_inception_score(logits, split_size), rel=1e-12)
        assert (std == 0.0) == (split_size >= 23)
    # Splits are consecutive, not shuffled: reordering the samples changes the score of splits of 5.
    reordered = logits[np.random.default_rng(4).permutation(23)]
    assert inception_score(reordered, split_size=5)[0] != pytest.approx(inception_score(logits, split_size=5)[0],
                                                                        rel=1e-9)
    assert inception_score(reordered, split_size=23)[0] == pytest.approx(inception_score(logits, split_size=23)[0],
                                                                         rel=1e-12)
    # A probability that underflows to exactly 0 contributes 0 (ADM's formula gives 0 * log 0 = nan there).
    certain = np.full((4, 1008), -1e4, np.float32)
    certain[np.arange(4), [0, 1, 2, 3]] = 0.0
    assert inception_score(certain, split_size=4)[0] == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("block_size", [1, 7, 10000])
def test_precision_recall_are_adms_manifolds_for_any_block_size(block_size):
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(40, 16)).astype(np.float32)
    samples = (rng.normal(size=(31, 16)) * 1.3 + 0.4).astype(np.float32)
    expected = adm_precision_recall(reference, samples, k=3)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # both sides partly outside: a real test
    got = manifold_precision_recall(torch.from_numpy(samples), torch.from_numpy(reference), neighbourhood=3,
                                    block_size=block_size)
    assert got == expected
    assert manifold_precision_recall(samples, reference, neighbourhood=1) == adm_precision_recall(reference, samples,
                                                                                                  k=1)
    with pytest.raises(ValueError, match="prc_neighborhood=3 needs more than 3 points; samples has 3"):
        manifold_precision_recall(samples[:3], reference)


def test_kid_prc_agree_with_torch_fidelity_and_isc_with_adm(tmp_path, inception_weights, monkeypatch):
    # Same canned features on both routes (no Inception pass): KID is torch-fidelity's own function; precision and
    # recall (ADM's manifolds, in float64) give what torch-fidelity's float32 PRC gives on these sets; IS follows
    # ADM's consecutive splits (torch-fidelity shuffles), checked against the direct formula.
    import torch_fidelity
    import torch_fidelity.metrics
    import torch_fidelity.utils

    generator = torch.Generator().manual_seed(6)
    canned = {
        id_: {"2048": torch.rand(6, 2048, generator=generator) + shift,
              "logits_unbiased": torch.randn(6, 1008, generator=generator) * 3}
        for id_, shift in ((1, 0.0), (2, 0.05))
    }
    samples, reference = np.zeros((6, 8, 8, 3), np.uint8), np.ones((6, 8, 8, 3), np.uint8)
    monkeypatch.setattr(torch_fidelity.metrics, "extract_featuresdict_from_input_id_cached",
                        lambda input_id, extractor, **kwargs: canned[input_id])
    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset",
                        lambda dataset, *args, **kwargs: canned[1 if dataset.images is samples else 2])
    options = {"kid_subset_size": 5, "kid_subsets": 7, "prc_neighborhood": 2}
    ours = compute_generation_metrics(samples, reference=reference, inception_weights=inception_weights,
                                      metrics=("isc", "kid", "prc"), isc_split_size=4, **options)
    theirs = torch_fidelity.calculate_metrics(
        input1=metrics_module.UInt8ImageDataset(samples), input2=metrics_module.UInt8ImageDataset(reference),
        cuda=False, isc=False, kid=True, prc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=inception_weights, cache=False, verbose=False, **options,
    )
    assert {key: ours[key] for key in ("kid", "kid_std", "recall", "f_score")} == {
        "kid": theirs["kernel_inception_distance_mean"], "kid_std": theirs["kernel_inception_distance_std"],
        "recall": theirs["recall"], "f_score": theirs["f_score"],
    }
    assert ours["precision"] == theirs["precision"]
    assert 0.0 < ours["precision"] < 1.0 or 0.0 < ours["recall"] < 1.0  # the canned sets overlap partly
    assert ours["isc"] == pytest.approx(adm_inception_score(canned[1]["logits_unbiased"].numpy(), 4), rel=1e-12)


def test_sfid_features_are_adms_mixed_6_conv_in_tensorflow_order(image_sets, inception_weights):
    from torch_fidelity.utils import create_feature_extractor

    images = image_sets["bright_noise"]
    features = extract_inception_features(images, inception_weights=inception_weights,
                                          feature_layers=(SFID_FEATURE_LAYER, "2048"), batch_size=3)
    assert features[SFID_FEATURE_LAYER].shape == (4, SFID_FEATURE_DIM) == (4, 17 * 17 * 7)
    assert features["2048"].shape == (4, INCEPTION_FEATURE_DIM)
    # The layer by hand: the 1x1 branch of Mixed_6d after its ReLU, channels 0..6, [17, 17, 7] flattened.
    network = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                       feature_extractor_weights_path=inception_weights)
    captured = []
    handle = network.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        network(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    handle.remove()
    by_hand = captured[0][:, :7].permute(0, 2, 3, 1).reshape(4, -1)
    assert (by_hand >= 0).all()  # after the ReLU
    torch.testing.assert_close(features[SFID_FEATURE_LAYER], by_hand, rtol=1e-5, atol=1e-5)
    assert extract_inception_features(images, inception_weights=inception_weights,
                                      feature_layers=(SFID_FEATURE_LAYER,))[SFID_FEATURE_LAYER].shape == (4, 2023)


def test_sfid_from_adm_statistics_equals_sfid_from_images(tmp_path, metrics_bright_vs_dark, image_sets,
                                                          inception_weights):
    features = extract_inception_features(image_sets["dark_noise"], inception_weights=inception_weights,
                                          feature_layers=("2048", SFID_FEATURE_LAYER))
    mu, sigma = feature_statistics(features["2048"])
    mu_s, sigma_s = feature_statistics(features[SFID_FEATURE_LAYER])
    adm_reference = save_reference_statistics(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert inspect_reference_npz(adm_reference).spatial_statistics_dim == SFID_FEATURE_DIM
    result = compute_generation_metrics(image_sets["bright_noise"], reference=adm_reference,
                                        inception_weights=inception_weights, metrics=("fid", "sfid"), **SMALL)
    assert result["sfid"] == pytest.approx(metrics_bright_vs_dark["sfid"], rel=1e-5)
    assert result["fid"] == pytest.approx(metrics_bright_vs_dark["fid"], rel=1e-5)
    pool_only = save_reference_statistics(tmp_path / "pool.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"sfid needs the reference's spatial statistics \(mu_s, sigma_s\)"):
        compute_generation_metrics(image_sets["bright_noise"], reference=pool_only,
                                   inception_weights=inception_weights, metrics=("fid", "sfid"), **SMALL)
    with pytest.raises(ValueError, match=r"sFID from 4 images.*allow_small_sample=True"):
        compute_generation_metrics(image_sets["bright_noise"], reference=adm_reference,
                                   inception_weights=inception_weights, metrics=("sfid",))


def test_fid_of_a_set_with_itself_is_zero_and_reference_images_win(tmp_path, image_sets, inception_weights):
    images = image_sets["bright_noise"]
    samples = save_adm_npz(tmp_path / "samples.npz", images)
    # An ADM reference batch holds images and statistics; the images win (mu/sigma here are deliberately wrong).
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=images, mu=np.full(INCEPTION_FEATURE_DIM, 100.0), sigma=np.eye(INCEPTION_FEATURE_DIM))
    result = compute_generation_metrics(samples, reference=reference, inception_weights=inception_weights,
                                        metrics=("fid", "prc"), allow_small_sample=True)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6)
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_fid_from_reference_statistics_equals_fid_from_reference_images(
    tmp_path, metrics_bright_vs_dark, image_sets, inception_weights
):
    # Batches of 3 + 1 here, one batch of 4 in the fixture: features and hence FID do not depend on batching
    # (eval-mode network), up to float32 rounding of batched kernels.
    features = extract_inception_features(image_sets["dark_noise"], inception_weights=inception_weights,
                                          batch_size=3)["2048"]
    assert features.shape == (4, INCEPTION_FEATURE_DIM) and features.dtype == torch.float32
    mu, sigma = feature_statistics(features)
    statistics_path = save_reference_statistics(tmp_path / "reference_stats.npz", mu=mu, sigma=sigma)
    from_statistics = compute_generation_metrics(
        image_sets["bright_noise"], reference=statistics_path, inception_weights=inception_weights,
        metrics=("fid", "isc"), **SMALL,
    )
    assert from_statistics["fid"] == pytest.approx(metrics_bright_vs_dark["fid"], rel=1e-5)
    assert from_statistics["isc"] == pytest.approx(metrics_bright_vs_dark["isc"], rel=1e-9)


# ----------------------------------------------------------------------------------------------- early errors


def test_too_few_samples_for_fid_needs_opt_in(image_sets, inception_weights):
    images = image_sets["bright_noise"]
    with pytest.raises(ValueError, match="FID from 4 images.*allow_small_sample=True"):
        compute_generation_metrics(images, reference=images, inception_weights=inception_weights, metrics=("fid",))


def test_wrong_reference_resolution_names_both_shapes(tmp_path, image_sets, inception_weights):
    reference = save_adm_npz(tmp_path / "reference64.npz", np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError) as error:
        compute_generation_metrics(image_sets["bright_noise"], reference=reference,
                                   inception_weights=inception_weights, **SMALL)
    message = str(error.value)
    assert "(4, 32, 32, 3)" in message and "(4, 64, 64, 3)" in message and "32x32" in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"metrics": ("kid",), "kid_subset_size": 5}, r"kid_subset_size=5 > 4 images"),
        ({"metrics": ("prc",), "prc_neighborhood": 4}, r"prc_neighborhood=4 needs more than 4 images"),
        ({"metrics": ("isc",), "isc_split_size": 0}, r"isc_split_size must be a positive integer"),
        ({"metrics": ("fid", "lpips")}, r"choose one or more of"),
        ({"metrics": ("isc",), "batch_size": 0}, r"batch_size must be a positive integer"),
    ],
)
def test_impossible_requests_fail_early(image_sets, inception_weights, options, message):
    images = image_sets["bright_noise"]
    with pytest.raises(ValueError, match=message):
        compute_generation_metrics(images, reference=images, inception_weights=inception_weights,
                                   allow_small_sample=True, **options)


def test_kid_and_prc_need_reference_images(tmp_path, image_sets, inception_weights):
    statistics = save_reference_statistics(tmp_path / "stats.npz", mu=np.zeros(INCEPTION_FEATURE_DIM),
                                           sigma=np.eye(INCEPTION_FEATURE_DIM))
    with pytest.raises(ValueError, match=r"\['kid', 'prc'\] need reference images.*stats.npz"):
        compute_generation_metrics(image_sets["bright_noise"], reference=statistics,
                                   inception_weights=inception_weights, **SMALL)
    with pytest.raises(ValueError, match="statistics have dimension 3"):
        compute_generation_metrics(image_sets["bright_noise"], reference=(np.zeros(3), np.eye(3)),
                                   inception_weights=inception_weights, metrics=("fid",), allow_small_sample=True)


def test_missing_weights_fail_before_any_work(tmp_path, image_sets):
    with pytest.raises(FileNotFoundError, match="FID Inception weights"):
        compute_generation_metrics(image_sets["bright_noise"], reference=image_sets["dark_noise"],
                                   inception_weights=tmp_path / "absent.pth", **SMALL)


# ------------------------------------------------------------------------------------- features as they are made


def test_streamed_features_equal_the_batch_pass_and_give_the_same_metrics(image_sets, inception_weights):
    """evaluate.py's path: features of each batch while it is on the device, metrics from them afterwards."""
    samples = np.concatenate([image_sets["bright_noise"], image_sets["dark_noise"][:2]])  # 6 images
    names = ("fid", "sfid", "isc", "kid", "prc")
    stream = InceptionFeatureStream(inception_weights=inception_weights, metrics=names)
    for start in (0, 3):  # the batches of the reference pass below
        stream.add(torch.from_numpy(samples[start:start + 3]).permute(0, 3, 1, 2))
    streamed = stream.features()
    direct = extract_inception_features(samples, inception_weights=inception_weights, batch_size=3,
                                        feature_layers=("2048", "logits_unbiased", SFID_FEATURE_LAYER))
    assert stream.num_images == 6 and set(streamed) == set(direct)
    for layer, rows in direct.items():
        assert streamed[layer].device.type == "cpu" and torch.equal(streamed[layer], rows), layer
    reference = image_sets["dark_noise"]
    from_features = metrics_of_sample_features(streamed, sample_shape=samples.shape, reference=reference,
                                               inception_weights=inception_weights, metrics=names, batch_size=3,
                                               **SMALL)
    from_images = compute_generation_metrics(samples, reference=reference, inception_weights=inception_weights,
                                             metrics=names, batch_size=3, **SMALL)
    assert set(from_features) == {"fid", "sfid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score"}
    assert from_features == from_images
    # Features of fewer samples than the shape claims, or without a layer a metric needs, are refused.
    with pytest.raises(ValueError, match=r"sample_features\['2048'\] has 5 rows for 6 samples"):
        metrics_of_sample_features({layer: rows[:5] for layer, rows in streamed.items()}, sample_shape=samples.shape,
                                   reference=reference, inception_weights=inception_weights, metrics=names, **SMALL)
    with pytest.raises(ValueError, match=r"sample_features\['mixed_6/conv'\] has None rows"):
        metrics_of_sample_features({"2048": streamed["2048"], "logits_unbiased": streamed["logits_unbiased"]},
                                   sample_shape=samples.shape, reference=reference,
                                   inception_weights=inception_weights, metrics=names, **SMALL)
    with pytest.raises(ValueError, match=r"expected uint8 \[B, 3, H, W\] images, got torch.float32"):
        stream.add(torch.zeros(1, 3, 32, 32))
