"""ADM (guided-diffusion) ``.npz`` files of sample and reference sets, read and written without unpickling.

Sample and reference sets use the ADM ``.npz`` layout: ``arr_0`` is ``uint8 [N, H, W, 3]``. An ADM reference
batch such as ``VIRTUAL_imagenet256_labeled.npz`` also holds ``mu`` / ``sigma``, the FID statistics of its
images computed by ADM's TensorFlow evaluator, and ``mu_s`` / ``sigma_s``, those of sFID's spatial features.

Part of the generation metrics; :mod:`bar_lightning.eval.metrics` re-exports the public names.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bar_lightning.io import atomic_write

ImagesLike = np.ndarray | torch.Tensor
PathLike = str | os.PathLike


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
