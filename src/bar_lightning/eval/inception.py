"""The FID Inception network (torch-fidelity's ``inception-v3-compat``), its weights file and its features.

torch-fidelity downloads its Inception-v3 weights from a URL when it is not given a file; every entry point here
takes the weights file explicitly (``weights-inception-2015-12-05-6726825d.pth``, the FID Inception network
converted from TensorFlow) and vets it with :func:`check_weights_file` first, because torch-fidelity unpickles it
with ``weights_only=False`` (a malicious file would run code).

Features are extracted through torch-fidelity's own loop (:func:`extract_inception_features`), or batch by batch
on the device that holds the images (:class:`InceptionFeatureStream`); sFID's spatial features are recorded by a
forward hook. Part of the generation metrics; :mod:`bar_lightning.eval.metrics` re-exports the public names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bar_lightning.eval.adm_files import ImagesLike, PathLike, _check_images_uint8
from bar_lightning.models.pretrained import check_weights_file

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

# The metric names of compute_generation_metrics (metrics.py) and InceptionFeatureStream.
SUPPORTED_METRICS = ("fid", "sfid", "isc", "kid", "prc")


# --------------------------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Inception network and features
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


# --------------------------------------------------------------------------------------------------------------
# Argument checks (shared with the statistics and metrics.py)
# --------------------------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, *, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _checked_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    metric_names = tuple(dict.fromkeys(metrics))
    unknown = [name for name in metric_names if name not in SUPPORTED_METRICS]
    if unknown or not metric_names:
        raise ValueError(f"metrics={list(metrics)}: choose one or more of {list(SUPPORTED_METRICS)}")
    return metric_names
