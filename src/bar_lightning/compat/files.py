"""Reading checkpoint files safely and normalising their keys (shared by the generator and tokenizer bridges)."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

STRIPPED_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and by DDP wrappers


class UpstreamConfigError(ValueError):
    """An official yaml that cannot be read or used; the message names the file and the key."""


def load_yaml_config(path: str | os.PathLike, *, key: str) -> dict[str, Any]:
    """An official yaml file as a plain dict with `${...}` interpolations resolved; errors name `key`, file, entry."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        from bar_lightning.weights import fetch_hint

        raise FileNotFoundError(f"{key}={path} does not exist (the official yaml of that model).{fetch_hint(path)}")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml's scanner and parser errors have many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UpstreamConfigError(f"{key}={path} is not a readable YAML file ({first_line})") from None
    if not isinstance(config, DictConfig):
        raise UpstreamConfigError(f"{key}={path} holds a list, not a mapping like the official configs")
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        where = getattr(error, "full_key", None) or "?"
        message = str(error).strip().splitlines()[0]
        raise UpstreamConfigError(f"{key}={path}: entry {where} cannot be resolved ({message})") from None


def config_number(value: Any, where: str, kind: type = int) -> Any:
    """`value` as an int (or float) for the config entry `where`; anything else raises naming the entry."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where}={value!r} is not a number")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ValueError(f"{where}={value!r} is not an integer")
    return number


def to_plain(config: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, so callers may pass either."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, DictConfig | ListConfig):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return config


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from `.safetensors`, or from `.bin`/`.pt`/`.pth`/`.ckpt` with `weights_only=True`.

    Nothing in the file is executed: a pickle that needs arbitrary code is refused with an explanation.
    """
    path = Path(path)
    if not path.is_file():
        from bar_lightning.weights import fetch_hint

        raise FileNotFoundError(f"checkpoint file not found: {path}.{fetch_hint(path)}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is truncated or corrupt and cannot be loaded ({error})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (unpickling it would run code: {error}). "
            "Only load files you trust; convert them to .safetensors with a trusted tool first."
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is truncated or corrupt and cannot be loaded ({first_line})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]  # a Lightning or training checkpoint
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a mapping of parameter names to tensors")
    return dict(loaded)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `_orig_mod.` / `module.` prefixes (in any nesting) from every key."""
    cleaned = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
