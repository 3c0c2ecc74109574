"""Statistics of Inception features: feature statistics, the Fréchet distance, Inception Score, precision/recall.

FID (and sFID) is :func:`frechet_distance` on float64 statistics instead of torch-fidelity's
``eigvals(sigma1 @ sigma2)``: the same formula, but exact for the rank-deficient covariances of small sets. The
Inception Score and precision/recall follow ADM's evaluator (``guided-diffusion/evaluations/evaluator.py``):

* the Inception Score is the mean of ``exp(KL)`` over consecutive splits of 5000 samples (no shuffling), from the
  softmax of the unbiased logits (``isc_std``: their standard deviation);
* precision and recall use ADM's k = 3 manifold estimate on the 2048-d pool features: a point lies on a set's
  manifold when its squared distance to some member is at most that member's squared distance to its k-th nearest
  neighbour (itself excluded). Distances are computed in float64 in blocks on ``device``.

Part of the generation metrics; :mod:`bar_lightning.eval.metrics` re-exports the public names.
"""

from __future__ import annotations

import numpy as np
import torch

from bar_lightning.eval.adm_files import _check_statistics
from bar_lightning.eval.inception import INCEPTION_FEATURE_DIM, ISC_SPLIT_SIZE, _check_positive_int

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


# --------------------------------------------------------------------------------------------------------------
# Inception Score and precision/recall
# --------------------------------------------------------------------------------------------------------------


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
