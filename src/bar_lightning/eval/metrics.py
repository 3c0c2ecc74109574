"""Generation metrics (FID, Inception Score, KID, precision/recall) with torch-fidelity, strictly offline.

torch-fidelity downloads its Inception-v3 weights from a URL when it is not given a file; every entry point here
takes the weights file explicitly (``weights-inception-2015-12-05-6726825d.pth``, the FID Inception network
converted from TensorFlow) and vets it with :func:`check_weights_file` first, because torch-fidelity unpickles it
with ``weights_only=False`` (a malicious file would run code).

Sample and reference sets use the ADM (guided-diffusion) ``.npz`` layout: ``arr_0`` is ``uint8 [N, H, W, 3]``.
An ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz`` also holds ``mu`` / ``sigma``, the FID
statistics of its images computed by ADM's TensorFlow evaluator.

Typical use::

    save_adm_npz("samples.npz", images_uint8)
    metrics = compute_generation_metrics(
        "samples.npz", reference="VIRTUAL_imagenet256_labeled.npz",
        inception_weights="weights-inception-2015-12-05-6726825d.pth", device="cuda",
    )  # {"fid": ..., "isc": ..., "isc_std": ..., "kid": ..., "kid_std": ..., "precision": ..., ...}

How the metrics are computed: torch-fidelity's Inception-v3 (``inception-v3-compat``, a port of the TensorFlow
graph that ADM's evaluator uses) extracts the features of each image set once, through torch-fidelity's own
loop; IS, KID and precision/recall are torch-fidelity's functions on those features, called as
``torch_fidelity.calculate_metrics`` calls them (same splits, subsets, seed). FID is :func:`frechet_distance` on
float64 statistics instead of torch-fidelity's ``eigvals(sigma1 @ sigma2)``: the same formula, but exact for the
rank-deficient covariances of small sets and identical for both kinds of reference below.

Reference handling (see :func:`compute_generation_metrics`):

* a reference with images (``arr_0``, or an image array) -> all metrics from the images of both sides with the
  same network, so they are self-consistent; ``mu`` / ``sigma`` stored beside the images are not used (they come
  from ADM's TensorFlow network; the torch port matches it closely but not bit for bit);
* a reference with statistics only (``mu`` / ``sigma``, or a ``(mu, sigma)`` tuple) -> FID from statistics and
  IS from the samples alone; KID and precision/recall need reference images, so requesting them raises a
  ``ValueError`` before any feature is computed (chosen over silently skipping them, so that a sweep's
  ``metrics.json`` never lacks a metric that was asked for).

The metrics of the official README follow ADM's evaluator (``guided-diffusion/evaluations/evaluator.py``):

* sFID is the Fréchet distance of the spatial features of ``mixed_6/conv`` (first 7 channels, 2023-d); an ADM
  reference batch carries their statistics as ``mu_s`` / ``sigma_s``;
* the Inception Score is the mean of ``exp(KL)`` over consecutive splits of 5000 samples (no shuffling), from the
  softmax of the unbiased logits (``isc_std``: their standard deviation);
* precision and recall use ADM's k = 3 manifold estimate on the 2048-d pool features: a point lies on a set's
  manifold when its squared distance to some member is at most that member's squared distance to its k-th nearest
  neighbour (itself excluded). Distances are computed in float64 in blocks on ``device``.

The code is split by what it is: :mod:`~bar_lightning.eval.adm_files` (the ``.npz`` files),
:mod:`~bar_lightning.eval.inception` (the weights file, the network and its features, incl.
:class:`InceptionFeatureStream`), :mod:`~bar_lightning.eval.statistics` (feature statistics, Fréchet distance,
Inception Score, precision/recall); this module holds the public entry points and re-exports those modules'
public names, so ``from bar_lightning.eval.metrics import ...`` reaches all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bar_lightning.eval.adm_files import (
    ImagesLike,
    PathLike,
    ReferenceContents,
    _check_images_uint8,
    _check_statistics,
    inspect_reference_npz,
    load_adm_npz,
    load_reference_statistics,
    save_adm_npz,
    save_reference_statistics,
)
from bar_lightning.eval.inception import (
    FID_FEATURE_LAYER,
    INCEPTION_EXTRACTOR_NAME,
    INCEPTION_FEATURE_DIM,
    INCEPTION_WEIGHTS_HINT,
    ISC_FEATURE_LAYER,
    ISC_SPLIT_SIZE,
    SFID_CHANNELS,
    SFID_FEATURE_DIM,
    SFID_FEATURE_LAYER,
    SUPPORTED_METRICS,
    InceptionFeatureStream,
    UInt8ImageDataset,
    _check_positive_int,
    _checked_metric_names,
    _create_inception_extractor,
    _features_of,
    _load_inception_weights_checked,
    _network_layers,
    _on_device,
    check_weights_file,
    extract_inception_features,
)
from bar_lightning.eval.statistics import (
    RunningFeatureStatistics,
    _frechet_distance_of_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_precision_recall,
)

__all__ = [
    "FID_FEATURE_LAYER",
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_WEIGHTS_HINT",
    "ISC_FEATURE_LAYER",
    "ISC_SPLIT_SIZE",
    "REFERENCE_METRICS",
    "SFID_CHANNELS",
    "SFID_FEATURE_DIM",
    "SFID_FEATURE_LAYER",
    "SUPPORTED_METRICS",
    "ImagesLike",
    "InceptionFeatureStream",
    "PathLike",
    "ReferenceContents",
    "RunningFeatureStatistics",
    "UInt8ImageDataset",
    "check_generation_metrics_request",
    "check_weights_file",
    "compute_generation_metrics",
    "extract_inception_features",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "inspect_reference_npz",
    "load_adm_npz",
    "load_reference_statistics",
    "manifold_precision_recall",
    "metrics_of_sample_features",
    "save_adm_npz",
    "save_reference_statistics",
]

# The metrics that compare samples with a reference batch (IS needs the samples alone).
REFERENCE_METRICS = ("fid", "sfid", "kid", "prc")
# torch-fidelity's result keys -> the flat names written to metrics.json.
_RESULT_KEYS = {
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
}


# --------------------------------------------------------------------------------------------------------------
# Requests and the metrics of a sample set
# --------------------------------------------------------------------------------------------------------------


def _load_samples(samples: ImagesLike | PathLike) -> np.ndarray:
    if isinstance(samples, (str, os.PathLike)):
        return load_adm_npz(samples)
    return _check_images_uint8(samples, name="samples")


@dataclass(frozen=True)
class _Reference:
    """A resolved reference: images (then statistics unused) or FID statistics only."""

    description: str
    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    mu_s: np.ndarray | None = None  # sFID statistics, from an ADM reference batch
    sigma_s: np.ndarray | None = None


def _resolve_reference(reference: Any) -> _Reference:
    if reference is None:  # for metrics of the samples alone (IS)
        return _Reference(description="no reference")
    if isinstance(reference, (str, os.PathLike)):
        contents = inspect_reference_npz(reference)
        if contents.image_shape is not None:
            return _Reference(description=str(contents.path), image_shape=contents.image_shape)  # loaded later
        mu, sigma = load_reference_statistics(contents.path)
        mu_s, sigma_s = (load_reference_statistics(contents.path, spatial=True)
                         if contents.spatial_statistics_dim is not None else (None, None))
        return _Reference(description=str(contents.path), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    if isinstance(reference, tuple) and len(reference) == 2:
        mu, sigma = (np.asarray(part, dtype=np.float64) for part in reference)
        _check_statistics(mu, sigma, name="reference (mu, sigma)")
        return _Reference(description="reference (mu, sigma)", mu=mu, sigma=sigma)
    if isinstance(reference, (np.ndarray, torch.Tensor)):
        images = _check_images_uint8(reference, name="reference")
        return _Reference(description="reference images", images=images, image_shape=images.shape)
    raise ValueError(
        f"reference must be an ADM .npz path (arr_0 images or mu/sigma), a uint8 [N, H, W, 3] array, or a "
        f"(mu, sigma) tuple; got {type(reference).__name__}"
    )


def _validate_request(
    *,
    metric_names: tuple[str, ...],
    sample_shape: tuple[int, ...],
    reference: _Reference,
    kid_subset_size: int,
    prc_neighborhood: int,
    allow_small_sample: bool,
) -> None:
    """Every check that needs no features: runs before the (slow) Inception network."""
    num_samples = sample_shape[0]
    if num_samples < 2:
        raise ValueError(f"{num_samples} samples: the metrics need at least 2 (FID's covariance, IS's splits)")
    if reference.image_shape is None and reference.mu is None:
        compared = [name for name in metric_names if name in REFERENCE_METRICS]
        if compared:
            raise ValueError(f"metrics {compared} compare with a reference batch; none was given")
    has_reference_images = reference.image_shape is not None
    if not has_reference_images:
        image_metrics = [name for name in metric_names if name in ("kid", "prc")]
        if image_metrics:
            raise ValueError(
                f"metrics {image_metrics} need reference images but {reference.description} holds only FID "
                "statistics (mu, sigma); pass a reference with images (arr_0) or request metrics=('fid', 'isc')"
            )
        if "fid" in metric_names and reference.mu.shape[0] != INCEPTION_FEATURE_DIM:
            raise ValueError(
                f"{reference.description}: statistics have dimension {reference.mu.shape[0]}, FID uses the "
                f"{INCEPTION_FEATURE_DIM}-d Inception pool features; use statistics computed from those"
            )
        if "sfid" in metric_names and reference.mu_s is None:
            raise ValueError(
                f"sfid needs the reference's spatial statistics (mu_s, sigma_s) but {reference.description} holds "
                "only mu/sigma; use an ADM reference batch (VIRTUAL_imagenet256_labeled.npz carries them), a "
                "reference with images, or leave sfid out of the metrics"
            )
        if "sfid" in metric_names and reference.mu_s.shape[0] != SFID_FEATURE_DIM:
            raise ValueError(
                f"{reference.description}: mu_s has dimension {reference.mu_s.shape[0]}, sFID uses the "
                f"{SFID_FEATURE_DIM}-d spatial features (mixed_6/conv, first {SFID_CHANNELS} channels of 17x17)"
            )
    else:
        reference_shape = tuple(reference.image_shape)
        if len(reference_shape) != 4 or reference_shape[-1] != 3:
            raise ValueError(f"{reference.description}: images have shape {reference_shape}, expected [N, H, W, 3]")
        if reference_shape[1:3] != sample_shape[1:3]:
            sample_hw = f"{sample_shape[1]}x{sample_shape[2]}"
            raise ValueError(
                f"samples are {sample_hw} (shape {tuple(sample_shape)}) but {reference.description} holds "
                f"{reference_shape[1]}x{reference_shape[2]} images (shape {reference_shape}): the Inception network "
                f"resizes both to 299x299, so the comparison would silently measure resizing. Use the reference "
                f"batch made at {sample_hw} (e.g. VIRTUAL_imagenet256_labeled.npz for 256x256 samples), or resize "
                f"and centre-crop the reference images to {sample_hw} before saving them"
            )
    sets = [("samples", num_samples)]
    if has_reference_images:
        sets.append((reference.description, reference_shape[0]))
    for set_name, count in sets:
        for name, dimension in (("fid", INCEPTION_FEATURE_DIM), ("sfid", SFID_FEATURE_DIM)):
            if name in metric_names and count <= dimension and not allow_small_sample:
                raise ValueError(
                    f"{name.upper().replace('SFID', 'sFID')} from {count} images ({set_name}): the {dimension}-d "
                    f"feature covariance is rank-deficient below {dimension + 1} images, so the distance is strongly "
                    "biased (the standard protocol uses 50,000 samples and a 10,000-image reference). Use more "
                    "images, or pass allow_small_sample=True to compute it anyway"
                )
        if "fid" in metric_names and count < 2:
            raise ValueError(f"FID needs at least 2 images per set for a covariance; {set_name} has {count}")
        if "kid" in metric_names and kid_subset_size > count:
            raise ValueError(
                f"kid_subset_size={kid_subset_size} > {count} images ({set_name}); pass kid_subset_size <= {count}"
            )
        if "prc" in metric_names and prc_neighborhood >= count:
            raise ValueError(
                f"prc_neighborhood={prc_neighborhood} needs more than {prc_neighborhood} images per set; {set_name} "
                f"has {count}. Use more images or a smaller prc_neighborhood"
            )


def compute_generation_metrics(
    samples: ImagesLike | PathLike,
    *,
    reference: PathLike | ImagesLike | tuple[np.ndarray, np.ndarray] | None,
    inception_weights: PathLike | None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_split_size: int = ISC_SPLIT_SIZE,
    prc_neighborhood: int = 3,
    allow_small_sample: bool = False,
    seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float]:
    """Inception metrics of ``samples`` against ``reference``, offline, as a flat dict of floats.

    Args:
        samples: uint8 ``[N, H, W, 3]`` images, or an ADM ``.npz`` path (``arr_0``).
        reference: an ADM ``.npz`` path with images (``arr_0``; used in preference to ``mu``/``sigma`` stored
            beside them) or with statistics only (``mu``, ``sigma``); a uint8 ``[M, H, W, 3]`` image array; or a
            ``(mu, sigma)`` tuple of 2048-d Inception pool statistics; None when only ``isc`` is requested.
        inception_weights: the local torch-fidelity Inception-v3 weights file (never downloaded).
        metrics: any of ``"fid"``, ``"sfid"``, ``"isc"`` (Inception Score), ``"kid"``, ``"prc"``
            (precision/recall). KID and PRC need reference images, sFID reference images or ``mu_s``/``sigma_s``:
            otherwise they raise a ``ValueError``.
        batch_size: images per Inception forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.
        kid_subset_size, kid_subsets: KID's subset size and count (torch-fidelity's defaults).
        isc_split_size: samples per Inception Score split (ADM: 5000, consecutive).
        prc_neighborhood: k of the k-NN manifold radius of precision/recall (3, as ADM).
        allow_small_sample: compute FID / sFID even with fewer images per set than feature dimensions.
        seed: seed of KID's subsets.
        verbose: torch-fidelity's progress output on stderr.

    Returns:
        The requested subset of ``fid``, ``sfid``, ``isc``, ``isc_std``, ``kid``, ``kid_std``, ``precision``,
        ``recall``, ``f_score``.

    Raises ``FileNotFoundError`` / ``ValueError`` (missing or unsafe weights, too few images, unknown metric,
    resolution mismatch, KID/PRC without reference images) before any feature is computed.
    """
    sample_images = _load_samples(samples)
    return _generation_metrics(
        sample_images, None, sample_shape=sample_images.shape, reference=reference,
        inception_weights=inception_weights, metrics=metrics, batch_size=batch_size, device=device,
        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, isc_split_size=isc_split_size,
        prc_neighborhood=prc_neighborhood, allow_small_sample=allow_small_sample, seed=seed, verbose=verbose,
    )


def metrics_of_sample_features(
    sample_features: dict[str, torch.Tensor],
    *,
    sample_shape: Sequence[int],
    reference: PathLike | ImagesLike | tuple[np.ndarray, np.ndarray] | None,
    inception_weights: PathLike | None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_split_size: int = ISC_SPLIT_SIZE,
    prc_neighborhood: int = 3,
    allow_small_sample: bool = False,
    seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float]:
    """:func:`compute_generation_metrics` of samples whose features are computed already
    (:meth:`InceptionFeatureStream.features`); ``sample_shape`` is their image array's ``[N, H, W, 3]``. The
    reference is handled (and its features extracted) as there."""
    return _generation_metrics(
        None, sample_features, sample_shape=tuple(sample_shape), reference=reference,
        inception_weights=inception_weights, metrics=metrics, batch_size=batch_size, device=device,
        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, isc_split_size=isc_split_size,
        prc_neighborhood=prc_neighborhood, allow_small_sample=allow_small_sample, seed=seed, verbose=verbose,
    )


def check_generation_metrics_request(
    *,
    sample_shape: Sequence[int],
    reference: PathLike | ImagesLike | tuple[np.ndarray, np.ndarray] | None,
    inception_weights: PathLike | None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    allow_small_sample: bool = False,
) -> None:
    """Every check of :func:`compute_generation_metrics` that needs no image: evaluate.py runs it before sampling,
    with the shape the samples will have, so that a bad request fails in seconds, not after 50,000 samples."""
    metric_names = _checked_metric_names(metrics)
    _load_inception_weights_checked(inception_weights)
    _validate_request(
        metric_names=metric_names, sample_shape=tuple(sample_shape), reference=_resolve_reference(reference),
        kid_subset_size=kid_subset_size, prc_neighborhood=prc_neighborhood, allow_small_sample=allow_small_sample,
    )


def _generation_metrics(
    sample_images: np.ndarray | None,
    sample_features: dict[str, torch.Tensor] | None,
    *,
    sample_shape: tuple[int, ...],
    reference: Any,
    inception_weights: PathLike | None,
    metrics: Sequence[str],
    batch_size: int,
    device: str | torch.device,
    kid_subset_size: int,
    kid_subsets: int,
    isc_split_size: int,
    prc_neighborhood: int,
    allow_small_sample: bool,
    seed: int,
    verbose: bool,
) -> dict[str, float]:
    """The metrics of the samples' images, or of their features when these are given."""
    metric_names = _checked_metric_names(metrics)
    for name, value in (("batch_size", batch_size), ("kid_subset_size", kid_subset_size),
                        ("kid_subsets", kid_subsets), ("isc_split_size", isc_split_size),
                        ("prc_neighborhood", prc_neighborhood)):
        _check_positive_int(value, name=name)
    weights_path = _load_inception_weights_checked(inception_weights)
    resolved_reference = _resolve_reference(reference)
    _validate_request(
        metric_names=metric_names, sample_shape=sample_shape, reference=resolved_reference,
        kid_subset_size=kid_subset_size, prc_neighborhood=prc_neighborhood, allow_small_sample=allow_small_sample,
    )
    spatial = "sfid" in metric_names
    if sample_features is not None:
        needed = _network_layers(metric_names) + ([SFID_FEATURE_LAYER] if spatial else [])
        for layer in needed:
            rows = sample_features[layer].shape[0] if layer in sample_features else None
            if rows != sample_shape[0]:
                raise ValueError(f"sample_features[{layer!r}] has {rows} rows for {sample_shape[0]} samples; the "
                                 f"metrics {list(metric_names)} need the layers {needed} of every sample")
    # One network, one pass per image set for every metric (what torch_fidelity.calculate_metrics does with a
    # single feature extractor), so that FID can come from frechet_distance for both kinds of reference.
    compared = [name for name in metric_names if name in REFERENCE_METRICS]
    reference_images = resolved_reference.images
    if reference_images is None and resolved_reference.image_shape is not None and compared:
        reference_images = load_adm_npz(resolved_reference.description)
    needs_network = sample_features is None or (reference_images is not None and compared)
    with _on_device(torch.device(device)) as cuda:
        extractor = (_create_inception_extractor(weights_path, _network_layers(metric_names), cuda=cuda,
                                                 verbose=verbose) if needs_network else None)
        if sample_features is None:
            sample_features = _features_of(sample_images, extractor, spatial=spatial, batch_size=batch_size,
                                           cuda=cuda, verbose=verbose)
        reference_features = (
            _features_of(reference_images, extractor, spatial=spatial, batch_size=batch_size, cuda=cuda,
                         verbose=verbose)
            if reference_images is not None and compared else None
        )
    return _metrics_from_features(
        sample_features, reference_features, reference=resolved_reference, metric_names=metric_names,
        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, isc_split_size=isc_split_size,
        prc_neighborhood=prc_neighborhood, seed=seed, verbose=verbose, device=torch.device(device),
    )


def _metrics_from_features(
    sample_features: dict[str, torch.Tensor],
    reference_features: dict[str, torch.Tensor] | None,
    *,
    reference: _Reference,
    metric_names: tuple[str, ...],
    kid_subset_size: int,
    kid_subsets: int,
    isc_split_size: int,
    prc_neighborhood: int,
    seed: int,
    verbose: bool,
    device: torch.device,
) -> dict[str, float]:
    """FID / sFID from statistics, ADM's IS and precision/recall, and torch-fidelity's KID."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    result: dict[str, float] = {}
    for name, layer, mu, sigma in (("fid", FID_FEATURE_LAYER, reference.mu, reference.sigma),
                                   ("sfid", SFID_FEATURE_LAYER, reference.mu_s, reference.sigma_s)):
        if name in metric_names:
            other = reference_features[layer] if reference_features is not None else (mu, sigma)
            result[name] = _frechet_distance_of_features(sample_features[layer], other)
    if "isc" in metric_names:
        result["isc"], result["isc_std"] = inception_score(sample_features[ISC_FEATURE_LAYER], split_size=isc_split_size)
    if "kid" in metric_names:
        kid = kid_features_to_metric(
            sample_features[FID_FEATURE_LAYER], reference_features[FID_FEATURE_LAYER],
            kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, rng_seed=seed, verbose=verbose,
        )
        result.update({_RESULT_KEYS[key]: float(value) for key, value in kid.items() if key in _RESULT_KEYS})
    if "prc" in metric_names:
        precision, recall = manifold_precision_recall(
            sample_features[FID_FEATURE_LAYER], reference_features[FID_FEATURE_LAYER],
            neighbourhood=prc_neighborhood, device=device,
        )
        result["precision"], result["recall"] = precision, recall
        result["f_score"] = 2 * precision * recall / max(1e-5, precision + recall)  # torch-fidelity's F-score
    return result
