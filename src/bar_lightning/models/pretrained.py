"""Local pretrained weights for the tokenizer's losses and discriminator, and how frozen networks are held.

Nothing here downloads: every network is built without weights and filled from a file the user supplies, and a
missing file is reported at construction time together with the loss that needs it, how to switch that loss off
and the `python -m bar_lightning.weights fetch NAME` command that downloads and checks it.

Frozen networks (VGG16, ConvNeXt-S, the DINO backbone) are held by `ModuleWithFrozenNetworks` in a plain dict
instead of as submodules. Keeping them out of the module tree is what keeps them out of `state_dict()` (checkpoints
stay small and never pin a copy of public ImageNet weights), out of `parameters()` (optimisers, DDP and gradient
clipping never see them) and out of `train()` (they stay in eval mode). The one thing a submodule would get for free,
following `.to()` / `.cuda()` / `.half()`, is restored by forwarding `_apply` to them. The alternative, submodules
filtered out with state-dict hooks, needs a save hook, a load hook that forgives the missing keys and a `train()`
override, and still leaks the networks into `parameters()`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
CONVNEXT_SMALL_WEIGHTS_FILE = "convnext_small-0c510722.pth"
LPIPS_VGG_WEIGHTS_FILE = "vgg.pth"  # LPIPS v0.1 linear heads; the same file is shipped as `vgg_lpips.pth`
DINO_VIT_S8_WEIGHTS_FILE = "dino_deitsmall8_pretrain.pth"

VGG16_WEIGHTS_DESCRIPTION = f"torchvision VGG16 ImageNet weights ({VGG16_WEIGHTS_FILE})"
CONVNEXT_SMALL_WEIGHTS_DESCRIPTION = (
    f"torchvision ConvNeXt-Small ImageNet weights ({CONVNEXT_SMALL_WEIGHTS_FILE})"
)
LPIPS_VGG_WEIGHTS_DESCRIPTION = (
    f"LPIPS v0.1 VGG linear-head weights ({LPIPS_VGG_WEIGHTS_FILE} / vgg_lpips.pth)"
)
DINO_VIT_S8_WEIGHTS_DESCRIPTION = (
    f"DINO ViT-S/8 backbone weights ({DINO_VIT_S8_WEIGHTS_FILE} or timm vit_small_patch8_224.dino)"
)


def require_weights(
    path: str | os.PathLike[str] | None, *, what: str, needed_by: str, how_to_disable: str | None = None
) -> Path:
    """Return `path` as a `Path` if it is an existing file, else raise a `FileNotFoundError` saying what to do.

    Args:
        path: the configured location of the file, or None if none was configured.
        what: what the file is, including its usual file name, e.g. "torchvision VGG16 ImageNet weights
            (vgg16-397923af.pth)".
        needed_by: who needs it (and its config key), e.g. "the Gram loss (gram_weight=10.0)".
        how_to_disable: how to run without the file, where one can (e.g. "set that loss's weight to 0").
    """
    from bar_lightning.weights import fetch_hint

    otherwise = f", or {how_to_disable} (then no file is needed)" if how_to_disable else ""
    if path is None or str(path) == "":
        raise FileNotFoundError(
            f"No path was given for the {what}; {needed_by} needs it. Pass the path of a local copy (nothing is "
            f"downloaded at run time){otherwise}.{fetch_hint(None, mentioned=what)}"
        )
    weights_path = Path(path).expanduser()
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"The {what} were not found at '{weights_path}'; {needed_by} needs it. Copy the file there or pass its "
            f"actual path (nothing is downloaded at run time){otherwise}.{fetch_hint(weights_path)}"
        )
    return weights_path


def check_weights_file(path: str | os.PathLike[str] | None, *, what: str, needed_by: str) -> Path:
    """``path`` as a Path after `require_weights` and a check that it holds only tensors (no code runs to read it).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when ``torch.load(...,
    weights_only=True)`` refuses it: such a file needs arbitrary code to unpickle (a pickled object other than
    tensors and containers) or is not a torch checkpoint at all.
    """
    weights_path = require_weights(path, what=what, needed_by=needed_by)
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


def load_torch_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat `{name: tensor}` state dict on the CPU from a `.safetensors` file or a `torch.save` file.

    `torch.load` runs with `weights_only=True`, so a weight file cannot execute code when it is read.
    """
    weights_path = Path(path)
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights_path), device="cpu")
    else:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ValueError(
            f"'{weights_path}' does not hold a flat state dict of tensors (got {type(state).__name__}); "
            "save the network's `state_dict()` itself, not a training checkpoint that wraps it."
        )
    return dict(state)


def load_state_dict_strictly(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path, what: str
) -> None:
    """`module.load_state_dict(state, strict=True)`, with a `ValueError` naming the file when keys or shapes differ."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"'{source}' does not match the {what}: {error}") from error


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the network is used as a fixed function."""
    module.requires_grad_(False)
    return module.eval()


class FrozenPretrainedNetwork(nn.Module):
    """Base for a pretrained network used as a fixed function: it ignores `train()` and stays in eval mode.

    Staying in eval mode matters for ConvNeXt (stochastic depth) and for anything with dropout or batch norm.
    """

    def train(self, mode: bool = True) -> FrozenPretrainedNetwork:
        return super().train(False)


class ModuleWithFrozenNetworks(nn.Module):
    """Base for modules that use frozen networks without saving, training or exposing them (see module docstring).

    Subclasses register networks with `hold_frozen(name, network)` and fetch them with `frozen(name)`.
    """

    def __init__(self) -> None:
        super().__init__()
        # A plain dict is invisible to nn.Module's registries: no state_dict, parameters, train() or repr entries.
        self._frozen_networks: dict[str, nn.Module] = {}

    def hold_frozen(self, name: str, network: nn.Module) -> nn.Module:
        if name in self._frozen_networks:
            raise ValueError(f"A frozen network named '{name}' is already held; pick another name.")
        self._frozen_networks[name] = freeze(network)
        return network

    def frozen(self, name: str) -> nn.Module:
        return self._frozen_networks[name]

    def frozen_names(self) -> tuple[str, ...]:
        return tuple(self._frozen_networks)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> ModuleWithFrozenNetworks:
        # `.to()`, `.cuda()`, `.half()`, `.to_empty()` all funnel through `_apply`: forward it so the frozen networks
        # always live on the same device (and in the same dtype) as the module that uses them.
        super()._apply(fn, recurse=recurse)
        for network in self._frozen_networks.values():
            network._apply(fn, recurse=recurse)
        return self

    def extra_repr(self) -> str:
        if not self._frozen_networks:
            return ""
        held = ", ".join(f"{name}={type(net).__name__}" for name, net in self._frozen_networks.items())
        return f"frozen (not saved): {held}"


def build_vgg16_features(weights_path: str | Path) -> nn.Sequential:
    """torchvision VGG16 `features` (13 convs + ReLUs + 5 max-pools) filled strictly from a local file.

    The file is torchvision's `vgg16-397923af.pth` (keys `features.*` and `classifier.*`) or a features-only
    subset of it; the classifier is never used by the losses, so its keys are accepted and dropped, and any
    other key is an error.
    """
    state = load_torch_weights(weights_path)
    unexpected = sorted(key for key in state if not key.startswith(("features.", "classifier.")))
    if unexpected:
        raise ValueError(
            f"'{weights_path}' is not a torchvision VGG16 state dict: unexpected keys {unexpected[:5]}; expected "
            f"the keys of {VGG16_WEIGHTS_FILE} ('features.*', optionally 'classifier.*')."
        )
    features_state = {
        key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")
    }
    # Built on the meta device: the 120M-parameter classifier is never allocated or initialised, and every
    # features tensor is then overwritten by the strict load.
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    load_state_dict_strictly(features, features_state, source=weights_path, what="torchvision VGG16 features")
    return features


def build_convnext_small(weights_path: str | Path) -> nn.Module:
    """torchvision ConvNeXt-Small classifier (1000 ImageNet logits) filled strictly from a local file."""
    state = load_torch_weights(weights_path)
    with torch.device("meta"):
        convnext = torchvision.models.convnext_small(weights=None)
    convnext = convnext.to_empty(device="cpu")
    load_state_dict_strictly(convnext, state, source=weights_path, what="torchvision ConvNeXt-Small")
    return convnext
