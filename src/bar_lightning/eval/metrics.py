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

KID is torch-fidelity's. Every metric depends on the images and their order only, not on the batch size of the
feature extraction.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bar_lightning.io import atomic_write

# torch-fidelity's name of the TensorFlow-compatible Inception-v3 and the features FID / IS are computed from.
INCEPTION_EXTRACTOR_NAME = "inception-v3-compat"
INCEPTION_FEATURE_DIM = 2048
FID_FEATURE_LAYER = "2048"
ISC_FEATURE_LAYER = "logits_unbiased"
INCEPTION_WEIGHTS_HINT = "FID Inception weights (weights-inception-2015-12-05-6726825d.pth)"

# sFID's spatial features, as ADM's evaluator takes them: the TensorFlow graph's `mixed_6/conv` (the 1x1 branch of
# the fourth 17x17 block, torch-fidelity's Mixed_6d.branch1x1 after its ReLU), its first 7 channels, flattened in
# TensorFlow's [17, 17, 7] (height, width, channel) order so that ADM's `mu_s` / `sigma_s` apply as they are.
SFID_FEATURE_LAYER = "mixed_6/conv"
SFID_CHANNELS = 7
SFID_FEATURE_DIM = 17 * 17 * SFID_CHANNELS
# ADM's Inception Score: softmax of the unbiased logits, scored in consecutive splits of 5000 samples.
ISC_SPLIT_SIZE = 5000

SUPPORTED_METRICS = ("fid", "sfid", "isc", "kid", "prc")
# The metrics that compare samples with a reference batch (IS needs the samples alone).
REFERENCE_METRICS = ("fid", "sfid", "kid", "prc")
# torch-fidelity's result keys -> the flat names written to metrics.json.
_RESULT_KEYS = {
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
}

ImagesLike = np.ndarray | torch.Tensor
PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------------------------


def check_weights_file(path: PathLike | None, *, what: str, needed_by: str) -> Path:
    """``path`` as a Path after checking that it exists and holds only tensors (no code runs to read it).

    ``what`` describes the file (e.g. the expected file name), ``needed_by`` who needs it (e.g. the config key);
    both appear in the errors. Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when
    ``torch.load(..., weights_only=True)`` refuses it: such a file needs arbitrary code to unpickle (a pickled
    object other than tensors and containers) or is not a torch checkpoint at all.
    """
    from bar_lightning.weights import fetch_hint

    if path is None or str(path) == "":
        raise FileNotFoundError(
            f"no {what} given: {needed_by} needs it; pass the path of a local copy.{fetch_hint(None, mentioned=what)}"
        )
    weights_path = Path(path).expanduser()
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{what} not found at {weights_path}: {needed_by} needs it; pass the path of a local copy."
            f"{fetch_hint(weights_path)}"
        )
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{weights_path} ({what}, for {needed_by}) is refused: it is not a plain tensor checkpoint, reading it "
            f"would run arbitrary code ({str(error).splitlines()[0]}). Use the original file, or re-save its state "
            "dict with torch.save(state_dict) from a trusted source"
        ) from error
    except Exception as error:  # zip / pickle format errors: not a torch checkpoint
        raise ValueError(
            f"{weights_path} ({what}, for {needed_by}) is not a readable torch checkpoint: "
            f"{type(error).__name__}: {error}"
        ) from error
    return weights_path


# --------------------------------------------------------------------------------------------------------------
# ADM .npz files
# --------------------------------------------------------------------------------------------------------------


def _check_images_uint8(images: Any, *, name: str) -> np.ndarray:
    """``images`` as a uint8 ``[N, H, W, 3]`` numpy array, or a ValueError saying what is wrong and the fix."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or tensor uint8 [N, H, W, 3], got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(
            f"{name} has dtype {images.dtype}, expected uint8 [N, H, W, 3] in 0..255; convert images in [-1, 1] "
            "as the official sampler does: (255 * clip((x + 1) / 2, 0, 1)).astype(uint8)"
        )
    if images.ndim != 4:
        raise ValueError(f"{name} has shape {images.shape}, expected 4-D [N, H, W, 3]")
    if images.shape[-1] != 3:
        hint = " (channels first? transpose to [N, H, W, 3])" if images.shape[1] == 3 else ""
        raise ValueError(f"{name} has shape {images.shape}, expected 3 channels last [N, H, W, 3]{hint}")
    return images


def save_adm_npz(path: PathLike, images_uint8: ImagesLike, *, labels: np.ndarray | None = None) -> Path:
    """Save ``images_uint8 [N, H, W, 3]`` as ADM's ``arr_0`` (and ``labels [N]`` as ``arr_1``), atomically."""
    images = _check_images_uint8(images_uint8, name="images_uint8")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels has shape {labels.shape}, expected ({images.shape[0]},): one label per image")
        arrays["arr_1"] = labels
    npz_path = Path(path)
    # Writing to an open file keeps np.savez from appending ".npz" to the temporary name.
    atomic_write(npz_path, lambda file: np.savez(file, **arrays))
    return npz_path


def load_adm_npz(path: PathLike) -> np.ndarray:
    """``arr_0`` of an ADM ``.npz``: uint8 ``[N, H, W, 3]`` (never unpickles objects)."""
    npz_path = Path(path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} does not exist (expected an ADM .npz with arr_0 = uint8 [N, H, W, 3])")
    with np.load(npz_path, allow_pickle=False) as npz:
        if "arr_0" not in npz.files:
            hint = (
                "; it holds FID statistics only: pass it as a reference, or read them with load_reference_statistics"
                if {"mu", "sigma"} <= set(npz.files)
                else ""
            )
            raise ValueError(f"{npz_path} has no images (arr_0); it holds {sorted(npz.files)}{hint}")
        images = npz["arr_0"]
    return _check_images_uint8(images, name=f"{npz_path}:arr_0")


def load_reference_statistics(path: PathLike, *, spatial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` in float64 from an ADM reference ``.npz``: its pool statistics ``mu`` / ``sigma``,
    or with ``spatial=True`` its sFID statistics ``mu_s`` / ``sigma_s``."""
    npz_path = Path(path)
    keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} does not exist (expected an ADM reference .npz with {' and '.join(keys)})")
    with np.load(npz_path, allow_pickle=False) as npz:
        missing = [key for key in keys if key not in npz.files]
        if missing:
            what = "sFID statistics" if spatial else "FID statistics"
            raise ValueError(
                f"{npz_path} has no {what} {missing} (it holds {sorted(npz.files)}); use a reference batch with "
                f"{'/'.join(keys)} such as VIRTUAL_imagenet256_labeled.npz, or pass reference images"
            )
        mu, sigma = npz[keys[0]].astype(np.float64), npz[keys[1]].astype(np.float64)
    _check_statistics(mu, sigma, name=f"{npz_path} ({'/'.join(keys)})")
    return mu, sigma


def save_reference_statistics(
    path: PathLike,
    *,
    mu: np.ndarray,
    sigma: np.ndarray,
    mu_s: np.ndarray | None = None,
    sigma_s: np.ndarray | None = None,
) -> Path:
    """Save FID statistics (and sFID's ``mu_s`` / ``sigma_s``) as an ADM-style reference ``.npz``, atomically."""
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    _check_statistics(arrays["mu"], arrays["sigma"], name="statistics")
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("give both mu_s and sigma_s (sFID statistics), or neither")
    if mu_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = np.asarray(mu_s, dtype=np.float64), np.asarray(sigma_s, dtype=np.float64)
        _check_statistics(arrays["mu_s"], arrays["sigma_s"], name="spatial statistics")
    npz_path = Path(path)
    atomic_write(npz_path, lambda file: np.savez(file, **arrays))
    return npz_path


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, *, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D] FID statistics")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu / sigma contain NaN or inf")


@dataclass(frozen=True)
class ReferenceContents:
    """What a reference ``.npz`` holds, read from its array headers only (no image data is loaded)."""

    path: Path
    image_shape: tuple[int, ...] | None  # shape of arr_0, or None
    statistics_dim: int | None  # D of mu [D] / sigma [D, D], or None
    spatial_statistics_dim: int | None = None  # D of mu_s [D] / sigma_s [D, D] (sFID), or None


def inspect_reference_npz(path: PathLike) -> ReferenceContents:
    """Shapes of ``arr_0`` and ``mu`` in a reference ``.npz`` without loading it (cheap: for checks before sampling)."""
    npz_path = Path(path)
    if not npz_path.is_file():
        raise FileNotFoundError(
            f"reference {npz_path} does not exist: an ADM-style .npz with images (arr_0) or statistics "
            "(mu, sigma), e.g. VIRTUAL_imagenet256_labeled.npz"
        )
    try:
        shapes = _npz_array_shapes(npz_path)
    except (zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"reference {npz_path} is not a readable .npz file: {error}") from error
    dims: dict[str, int | None] = {}
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        dims[mu_key] = None
        if mu_key in shapes and sigma_key in shapes:
            mu_shape, sigma_shape = shapes[mu_key], shapes[sigma_key]
            if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]):
                raise ValueError(
                    f"reference {npz_path}: {mu_key} {mu_shape} / {sigma_key} {sigma_shape} are not [D] / [D, D]"
                )
            dims[mu_key] = mu_shape[0]
    contents = ReferenceContents(path=npz_path, image_shape=shapes.get("arr_0"), statistics_dim=dims["mu"],
                                 spatial_statistics_dim=dims["mu_s"])
    if contents.image_shape is None and contents.statistics_dim is None:
        raise ValueError(
            f"reference {npz_path} holds neither images (arr_0) nor statistics (mu, sigma): it has "
            f"{sorted(shapes)}"
        )
    return contents


def _npz_array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as file:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(file)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(file)
            shapes[member[: -len(".npy")]] = tuple(shape)
    return shapes


# --------------------------------------------------------------------------------------------------------------
# Feature statistics and the Frechet distance
# --------------------------------------------------------------------------------------------------------------


class RunningFeatureStatistics:
    """Mean and unbiased covariance of feature rows given in chunks, in float64.

    Chunks are merged with Chan et al.'s pairwise update (each chunk's mean and centred scatter, then a rank-1
    correction), which is numerically stable and makes the result independent of how the rows were chunked up
    to float64 rounding (~1e-12 relative). Each update costs one ``[D, D]`` outer product: pass batches, not rows.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # sum of outer products of centred rows, [D, D]

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        rows = _feature_rows_float64(features)
        if rows.shape[0] == 0:
            return
        chunk_count = rows.shape[0]
        chunk_mean = rows.mean(axis=0)
        centred = rows - chunk_mean
        chunk_scatter = centred.T @ centred
        if self.mean is None:
            self.count, self.mean, self.scatter = chunk_count, chunk_mean, chunk_scatter
            return
        if chunk_mean.shape != self.mean.shape:
            raise ValueError(f"feature chunk has dimension {chunk_mean.shape[0]}, earlier chunks {self.mean.shape[0]}")
        total = self.count + chunk_count
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (chunk_count / total)
        self.scatter = self.scatter + chunk_scatter + np.outer(delta, delta) * (self.count * chunk_count / total)
        self.count = total

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [D], sigma [D, D])``; sigma uses N - 1 like ``np.cov`` (and ADM's evaluator)."""
        if self.mean is None or self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        sigma = self.scatter / (self.count - 1)
        return self.mean.copy(), (sigma + sigma.T) / 2


def _feature_rows_float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    rows = np.asarray(features, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {rows.shape}")
    return rows


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` of ``features [N, D]`` (N >= 2), in float64, sigma unbiased (N - 1)."""
    statistics = RunningFeatureStatistics()
    statistics.update(features)
    return statistics.compute()


def _psd_eigenvalues_without_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0.

    A zero eigenvalue comes out of ``eigh`` as +-(size * eps * largest); its square root (~1e-8 of the scale)
    summed over thousands of null directions of a rank-deficient covariance would bias the trace term, so values
    under numpy's rank tolerance (as ``np.linalg.matrix_rank``) count as exact zeros.
    """
    largest = float(np.max(np.abs(eigenvalues), initial=0.0))
    tolerance = largest * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(_psd_eigenvalues_without_noise(eigenvalues))) @ eigenvectors.T


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    """``tr(matrix^(1/2))`` of a symmetric PSD matrix (symmetrised first: eigvalsh reads one triangle)."""
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(np.sqrt(_psd_eigenvalues_without_noise(eigenvalues)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, in float64 (FID's formula).

    The eigenvalues of ``sigma1 sigma2`` equal those of the symmetric PSD matrix ``S sigma2 S`` with
    ``S = sigma1^(1/2)``, so ``tr((sigma1 sigma2)^(1/2))`` is the sum of square roots of the eigenvalues of a
    symmetric matrix: two ``eigh`` calls, no complex rounding noise, and exact also for the singular covariances
    of fewer samples than feature dimensions (eigenvalues under the rank tolerance count as 0). This is what
    ``scipy.linalg.sqrtm`` (ADM, pytorch-fid) and torch-fidelity's ``eigvals(sigma1 @ sigma2)`` approximate; for
    full-rank covariances all agree to rounding (scipy is not a dependency of this project, and torch-fidelity's
    route is within 1e-9 relative in the tests). FID is >= 0 for PSD inputs, so a tiny negative result of rounding
    is returned as 0.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    _check_statistics(mu1, sigma1, name="first statistics")
    _check_statistics(mu2, sigma2, name="second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; compute both statistics with the same "
            f"network and layer (FID uses the {INCEPTION_FEATURE_DIM}-d Inception pool features)"
        )
    sqrt_sigma1 = _symmetric_psd_sqrt((sigma1 + sigma1.T) / 2)
    trace_sqrt_product = _trace_sqrt_psd(sqrt_sigma1 @ ((sigma2 + sigma2.T) / 2) @ sqrt_sigma1)
    mean_difference = mu1 - mu2
    distance = (
        float(mean_difference @ mean_difference)
        + float(np.trace(sigma1))
        + float(np.trace(sigma2))
        - 2.0 * trace_sqrt_product
    )
    return max(0.0, distance)


# --------------------------------------------------------------------------------------------------------------
# Inception features and metrics
# --------------------------------------------------------------------------------------------------------------


class UInt8ImageDataset(torch.utils.data.Dataset):
    """``uint8 [N, H, W, 3]`` images as torch-fidelity wants them: one ``uint8 [3, H, W]`` tensor per item.

    Items are converted on access, so a large sample set is not copied into a second layout.
    """

    def __init__(self, images_uint8: np.ndarray) -> None:
        self.images = images_uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[bool]:
    """Yields whether torch-fidelity should use CUDA; its ``.cuda()`` calls go to ``device``'s index."""
    if device.type == "cpu":
        yield False
        return
    if device.type != "cuda":
        raise ValueError(f"device={device}: torch-fidelity runs on 'cpu' or 'cuda[:index]'")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available; pass device='cpu'")
    with torch.cuda.device(device):
        yield True


def _load_inception_weights_checked(inception_weights: PathLike | None) -> Path:
    return check_weights_file(inception_weights, what=INCEPTION_WEIGHTS_HINT, needed_by="Inception metrics")


def _create_inception_extractor(weights_path: Path, feature_layers: Sequence[str], *, cuda: bool, verbose: bool):
    from torch_fidelity.utils import create_feature_extractor

    try:
        return create_feature_extractor(
            INCEPTION_EXTRACTOR_NAME, list(feature_layers), cuda=cuda,
            feature_extractor_weights_path=str(weights_path), verbose=verbose,
        )
    except RuntimeError as error:  # load_state_dict: wrong keys or shapes
        raise ValueError(
            f"{weights_path} is not the torch-fidelity Inception-v3 state dict ({INCEPTION_WEIGHTS_HINT}): "
            f"{str(error).splitlines()[0]}"
        ) from error


def extract_inception_features(
    images_uint8: ImagesLike,
    *,
    inception_weights: PathLike,
    feature_layers: Sequence[str] = (FID_FEATURE_LAYER,),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception features ``{layer: float32 [N, dim]}`` of ``images_uint8 [N, H, W, 3]``.

    Layers: ``"2048"`` (pool features: FID, KID, PRC), ``"mixed_6/conv"`` (sFID's 2023-d spatial features),
    ``"logits_unbiased"`` (IS), ``"64"``, ``"192"``, ``"768"``, ``"logits"``. Images are resized to 299x299 inside
    the network (TensorFlow-1 compatible bilinear).
    """
    images = _check_images_uint8(images_uint8, name="images_uint8")
    if images.shape[0] == 0:
        raise ValueError("images_uint8 is empty")
    _check_positive_int(batch_size, name="batch_size")
    weights_path = _load_inception_weights_checked(inception_weights)
    return _extract_features_vetted(
        images, weights_path=weights_path, feature_layers=feature_layers, batch_size=batch_size,
        device=torch.device(device), verbose=verbose,
    )


def _extract_features_vetted(
    images: np.ndarray,
    *,
    weights_path: Path,
    feature_layers: Sequence[str],
    batch_size: int,
    device: torch.device,
    verbose: bool,
) -> dict[str, torch.Tensor]:
    """:func:`extract_inception_features` for checked images and an already vetted weights file."""
    spatial = SFID_FEATURE_LAYER in feature_layers
    network_layers = [layer for layer in feature_layers if layer != SFID_FEATURE_LAYER] or [FID_FEATURE_LAYER]
    with _on_device(device) as cuda:
        extractor = _create_inception_extractor(weights_path, network_layers, cuda=cuda, verbose=verbose)
        features = _features_of(images, extractor, spatial=spatial, batch_size=batch_size, cuda=cuda, verbose=verbose)
    return {layer: features[layer] for layer in feature_layers}


@contextlib.contextmanager
def _spatial_features_recorded(extractor: Any, recorded: list[torch.Tensor], *, enabled: bool) -> Iterator[None]:
    """While open, every forward of ``extractor`` appends sFID's spatial features ``float32 [B, 2023]`` (on the
    device of the network) to ``recorded``."""
    if not enabled:
        yield
        return

    def record_spatial(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # [B, 192, 17, 17] -> [B, 17 * 17 * 7], flattened in TensorFlow's (height, width, channel) order
        first_channels = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1)
        recorded.append(first_channels.reshape(output.shape[0], -1).float())

    handle = extractor.Mixed_6d.branch1x1.register_forward_hook(record_spatial)
    try:
        yield
    finally:
        handle.remove()


def _features_of(
    images: np.ndarray, extractor: Any, *, spatial: bool, batch_size: int, cuda: bool, verbose: bool
) -> dict[str, torch.Tensor]:
    """The extractor's layers through torch-fidelity's own loop (as in calculate_metrics; save_cpu_ram: no
    DataLoader worker processes for an in-memory array), plus sFID's spatial features when ``spatial``."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    recorded: list[torch.Tensor] = []
    with _spatial_features_recorded(extractor, recorded, enabled=spatial):
        features = get_featuresdict_from_dataset(
            UInt8ImageDataset(images), extractor, batch_size, cuda, save_cpu_ram=True, verbose=verbose
        )
    if spatial:
        features[SFID_FEATURE_LAYER] = torch.cat(recorded).cpu()
    return features


def _network_layers(metric_names: Sequence[str]) -> list[str]:
    """The extractor layers the metrics read (sFID's spatial features come from a hook, not a layer)."""
    return [FID_FEATURE_LAYER] + ([ISC_FEATURE_LAYER] if "isc" in metric_names else [])


class InceptionFeatureStream:
    """Inception features of image batches as they are made, computed on the device that holds them.

    evaluate.py hands every decoded batch over while it is still on the GPU: the features are ready when sampling
    ends, and the 50,000 images are never copied back to the device for a second pass. The network, layers and
    conversion are those of :func:`compute_generation_metrics` (torch-fidelity's ``inception-v3-compat``), so
    :func:`metrics_of_sample_features` on these features gives its metrics (up to the float rounding of another
    batch composition).
    """

    def __init__(self, *, inception_weights: PathLike | None, metrics: Sequence[str],
                 device: str | torch.device = "cpu", verbose: bool = False) -> None:
        self.metric_names = _checked_metric_names(metrics)
        self.device = torch.device(device)
        weights_path = _load_inception_weights_checked(inception_weights)
        with _on_device(self.device) as cuda:
            self.extractor = _create_inception_extractor(weights_path, _network_layers(self.metric_names), cuda=cuda,
                                                         verbose=verbose)
        self.spatial = "sfid" in self.metric_names
        self._parts: dict[str, list[torch.Tensor]] = {}
        self.num_images = 0

    @torch.no_grad()
    def add(self, images_uint8: torch.Tensor) -> None:
        """Features of ``uint8 [B, 3, H, W]`` images (NCHW, as torch-fidelity takes them), kept on the device."""
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        recorded: list[torch.Tensor] = []
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext(), \
                _spatial_features_recorded(self.extractor, recorded, enabled=self.spatial):
            outputs = self.extractor.convert_features_tuple_to_dict(self.extractor(images_uint8.to(self.device)))
        if self.spatial:
            outputs[SFID_FEATURE_LAYER] = recorded[0]
        for layer, value in outputs.items():
            self._parts.setdefault(layer, []).append(value)
        self.num_images += images_uint8.shape[0]

    def features(self) -> dict[str, torch.Tensor]:
        """``{layer: float32 [N, dim]}`` on the CPU, in the order the batches were added."""
        if not self._parts:
            raise ValueError("no images were added to the feature stream")
        return {layer: torch.cat(parts).cpu() for layer, parts in self._parts.items()}


def inception_score(logits: torch.Tensor | np.ndarray, *, split_size: int = ISC_SPLIT_SIZE) -> tuple[float, float]:
    """ADM's Inception Score of ``logits [N, 1008]`` (the unbiased logits): ``(mean, std)`` of ``exp(KL(p(y|x) ||
    p(y)))`` over consecutive splits of ``split_size`` samples (the last one may be shorter), in float64."""
    _check_positive_int(split_size, name="isc_split_size")
    probabilities = torch.softmax(torch.as_tensor(logits).to("cpu", torch.float64), dim=1)
    scores = []
    for part in probabilities.split(split_size):
        marginal = part.mean(dim=0, keepdim=True)
        # xlogy: a probability of exactly 0 contributes 0 (p log p -> 0), not 0 * -inf
        divergence = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(divergence)))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` squared Euclidean distances (ADM's expansion ``|u|^2 - 2 u.v + |v|^2``, clamped at 0)."""
    return (rows.square().sum(1)[:, None] - 2.0 * rows @ columns.T + columns.square().sum(1)[None, :]).clamp_min_(0.0)


def _manifold_radii(features: torch.Tensor, neighbourhood: int, block_size: int) -> torch.Tensor:
    """Squared distance of each row to its ``neighbourhood``-th nearest other row (the 0th is itself)."""
    radii = []
    for rows in features.split(block_size):
        distances = torch.cat([_squared_distances(rows, columns) for columns in features.split(block_size)], dim=1)
        radii.append(distances.kthvalue(neighbourhood + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_on_manifold(points: torch.Tensor, members: torch.Tensor, radii: torch.Tensor, block_size: int) -> float:
    """The fraction of ``points`` within the squared radius of at least one of ``members``."""
    inside = []
    for rows in points.split(block_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for columns, column_radii in zip(members.split(block_size), radii.split(block_size), strict=True):
            hit |= (_squared_distances(rows, columns) <= column_radii[None, :]).any(dim=1)
        inside.append(hit)
    return float(torch.cat(inside).double().mean())


def manifold_precision_recall(
    sample_features: torch.Tensor | np.ndarray,
    reference_features: torch.Tensor | np.ndarray,
    *,
    neighbourhood: int = 3,
    block_size: int = 10000,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """ADM's precision and recall (Kynkäänniemi et al.'s k-NN manifolds) of ``[N, D]`` / ``[M, D]`` features.

    Precision: the fraction of samples inside the reference manifold; recall: the fraction of reference points
    inside the sample manifold. Computed in float64 on ``device`` in ``block_size`` blocks (the distance matrix
    of 50,000 x 50,000 points is never held whole).
    """
    _check_positive_int(neighbourhood, name="prc_neighborhood")
    _check_positive_int(block_size, name="block_size")
    samples = torch.as_tensor(sample_features).to(device, torch.float64)
    reference = torch.as_tensor(reference_features).to(device, torch.float64)
    if samples.ndim != 2 or reference.ndim != 2 or samples.shape[1] != reference.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with one D, got {tuple(samples.shape)} and "
                         f"{tuple(reference.shape)}")
    for name, count in (("samples", samples.shape[0]), ("reference", reference.shape[0])):
        if count <= neighbourhood:
            raise ValueError(f"prc_neighborhood={neighbourhood} needs more than {neighbourhood} points; {name} has "
                             f"{count}")
    precision = _fraction_on_manifold(samples, reference, _manifold_radii(reference, neighbourhood, block_size),
                                      block_size)
    recall = _fraction_on_manifold(reference, samples, _manifold_radii(samples, neighbourhood, block_size), block_size)
    return precision, recall


def _check_positive_int(value: Any, *, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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


def _checked_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    metric_names = tuple(dict.fromkeys(metrics))
    unknown = [name for name in metric_names if name not in SUPPORTED_METRICS]
    if unknown or not metric_names:
        raise ValueError(f"metrics={list(metrics)}: choose one or more of {list(SUPPORTED_METRICS)}")
    return metric_names


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


def _frechet_distance_of_features(
    sample_features: torch.Tensor, reference: torch.Tensor | tuple[np.ndarray, np.ndarray]
) -> float:
    """FID of sample features against reference features or ``(mu, sigma)``.

    With fewer rows than feature dimensions a covariance ``A^T A / (n - 1)`` (``A``: centred rows ``[n, D]``) has
    rank < n, and the non-zero eigenvalues of ``sigma_a sigma_b`` are those of the ``n x n`` symmetric matrix
    ``A sigma_b A^T / (n - 1)``; using it is exact and avoids ``D x D`` eigen-decompositions (slow on CPU).
    """
    sample_rows = _feature_rows_float64(sample_features)
    reference_rows = None if isinstance(reference, tuple) else _feature_rows_float64(reference)

    def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
        return reference if reference_rows is None else feature_statistics(reference_rows)

    dimension = sample_rows.shape[1]
    if sample_rows.shape[0] - 1 < dimension:
        return _frechet_distance_low_rank(sample_rows, *reference_statistics())
    if reference_rows is not None and reference_rows.shape[0] - 1 < dimension:
        return _frechet_distance_low_rank(reference_rows, *feature_statistics(sample_rows))  # FID is symmetric
    return frechet_distance(*feature_statistics(sample_rows), *reference_statistics())


def _frechet_distance_low_rank(rows: np.ndarray, other_mu: np.ndarray, other_sigma: np.ndarray) -> float:
    """:func:`frechet_distance` between the statistics of ``rows [n, D]`` (n - 1 < D) and ``(mu, sigma)``."""
    count = rows.shape[0]
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {count}")
    mu = rows.mean(axis=0)
    if mu.shape != other_mu.shape:
        raise ValueError(f"feature dimensions differ: {mu.shape[0]} vs {other_mu.shape[0]}")
    centred = rows - mu
    trace_sqrt_product = _trace_sqrt_psd(centred @ ((other_sigma + other_sigma.T) / 2) @ centred.T / (count - 1))
    mean_difference = mu - other_mu
    distance = (
        float(mean_difference @ mean_difference)
        + float((centred * centred).sum()) / (count - 1)
        + float(np.trace(other_sigma))
        - 2.0 * trace_sqrt_product
    )
    return max(0.0, distance)
