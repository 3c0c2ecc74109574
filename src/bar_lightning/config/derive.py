"""Settings a run takes from its inputs instead of asking the user to copy them.

Training a generator on pretokenized data: the bits per token, tokens per image and number of classes are properties
of the token folder (`<data.root>/metadata.json`, the class folders under `train/`), not choices. A config value that
disagrees with them is replaced by the data's value, with one line saying so, unless the user set it on the command
line: then a value the data cannot satisfy is refused, naming both values, and a larger class count is kept with a
warning. Settings that follow from those (the sampling allocation, the preview classes) are derived the same way.

Evaluating a generator: the sampling settings (guidance, temperature, allocation, order) come from the model unless
the command line chooses them: a checkpoint of this project carries the settings it was trained with, and the
released models get their README's settings. `sampling=<group>` on the command line uses that group, and single
`sampling.<key>=` overrides apply on top of either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# The sampling method's settings (the rest of the sampling group, cuda_graph/compile/precision, is about speed).
SAMPLING_METHOD_KEYS = ("guidance_scale", "temperature", "tokens_allocation", "random_order")
# Proportions of BAR-B's allocation [2, 2, 5, 7]: the default shape of a derived allocation.
ALLOCATION_SHAPE = (2, 2, 5, 7)
PREVIEW_CLASSES = 10


def command_line_overrides() -> list[str] | None:
    """The overrides of the running Hydra job (command line and sweep), or None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def overridden_keys(overrides: Iterable[str] | None) -> set[str]:
    """`model.num_classes=3`, `+x=1`, `~y` -> their keys; group choices (`sampling=bar_b`) appear as the group."""
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides or ()}


def default_tokens_allocation(bits_per_step: int) -> list[int]:
    """An allocation for `bits_per_step` bits shaped like BAR-B's [2, 2, 5, 7] (the same for 16 bits)."""
    steps = min(len(ALLOCATION_SHAPE), bits_per_step)
    shape = ALLOCATION_SHAPE[-steps:]
    allocation = [max(1, bits_per_step * weight // sum(shape)) for weight in shape]
    while sum(allocation) > bits_per_step:  # the floor of 1 may overshoot: take back from the largest
        allocation[allocation.index(max(allocation))] -= 1
    allocation[-1] += bits_per_step - sum(allocation)
    return sorted(allocation)


def token_data_properties(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`bits_per_token`, `num_tokens`, `num_classes` (and `class_folders`) of a pretokenized folder, or None.

    Read from `metadata.json` (written by pretokenize.py and by the official script); the class count falls back on
    the class folders under `train/` (labels are their sorted order). Values that are not positive integers are
    left out: the token data module reports them when it reads the folder.
    """
    root = Path(root)
    metadata_path = root / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict):
        return None

    def positive(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    properties: dict[str, Any] = {
        "bits_per_token": positive(metadata.get("token_size")),
        "num_tokens": positive(metadata.get("num_tokens")),
        "num_classes": positive(metadata.get("num_classes")),
    }
    train = root / "train"
    if properties["num_classes"] is None and train.is_dir():
        folders = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
        properties["num_classes"] = len(folders) or None
    if isinstance(metadata.get("class_folders"), list):
        properties["class_folders"] = [str(name) for name in metadata["class_folders"]]
    return properties


def derive_generator_settings(cfg: DictConfig, overrides: Sequence[str] | None) -> DictConfig:
    """Fill the generator's data-given settings of `cfg` (in place) from its token folder; returns `cfg`.

    Only runs with `data.source=pretokenized` and a readable `metadata.json`. `overrides` are the command line's
    (None when unknown: then every config value counts as a default that the data may replace).
    """
    from bar_lightning.config.schema import ConfigError

    data = cfg.get("data")
    if cfg.get("task") != "generator" or data is None or data.get("source") != "pretokenized" or not data.get("root"):
        return cfg
    properties = token_data_properties(data.root)
    if properties is None:
        return cfg
    explicit = overridden_keys(overrides)
    source = f"{data.root}/metadata.json"
    model = cfg.model
    with open_dict(cfg):
        for key, what in (("bits_per_token", "bits per token"), ("num_tokens", "tokens per image")):
            found = properties[key]
            if found is None or model[key] == found:
                continue
            if f"model.{key}" in explicit:
                raise ConfigError(
                    f"model.{key}={model[key]} (command line), but the tokens in {data.root} have {found} {what} "
                    f"({source}): drop the override, or pretokenize with the tokenizer that makes {model[key]}"
                )
            log.info("model.%s=%s -> %s: the %s of the tokens (%s)", key, model[key], found, what, source)
            model[key] = found
        classes = properties["num_classes"]
        if classes is not None and model.num_classes != classes:
            if "model.num_classes" not in explicit:
                log.info("model.num_classes=%s -> %s: the classes of the tokens in %s (set model.num_classes on the "
                         "command line to keep another count)", model.num_classes, classes, data.root)
                model.num_classes = classes
            elif model.num_classes < classes:
                raise ConfigError(
                    f"model.num_classes={model.num_classes} (command line), but the tokens in {data.root} have "
                    f"{classes} classes (labels 0..{classes - 1}): raise it to at least {classes} or drop it"
                )
            else:
                log.warning("model.num_classes=%s but the tokens in %s have %s classes: classes %s..%s get no "
                            "training data", model.num_classes, data.root, classes, classes, model.num_classes - 1)
        _derive_allocation(cfg, explicit)
        _derive_preview_classes(cfg, explicit)
    return cfg


def _derive_allocation(cfg: DictConfig, explicit: set[str]) -> None:
    sampling = cfg.get("sampling")
    if sampling is None or "sampling" in explicit or "sampling.tokens_allocation" in explicit:
        return
    bits_per_step = int(cfg.model.bits_per_token) * int(cfg.model.get("patch_size", 1)) ** 2
    allocation = list(sampling.tokens_allocation)
    if sum(allocation) == bits_per_step:
        return
    derived = default_tokens_allocation(bits_per_step)
    log.info("sampling.tokens_allocation=%s -> %s: an allocation of the %d bits per step of these tokens (set "
             "sampling.tokens_allocation to choose another)", allocation, derived, bits_per_step)
    sampling.tokens_allocation = derived


def _derive_preview_classes(cfg: DictConfig, explicit: set[str]) -> None:
    training = cfg.get("training")
    if training is None or "training.preview_classes" in explicit or "preview_classes" not in training:
        return
    classes = int(cfg.model.num_classes)
    preview = list(training.preview_classes)
    if all(0 <= label < classes for label in preview):
        return
    derived = list(range(min(PREVIEW_CLASSES, classes)))
    log.info("training.preview_classes=%s -> %s: the model has %d classes", preview, derived, classes)
    training.preview_classes = derived


# ------------------------------------------------------------------------------------------------------------------
# Evaluation: the sampling settings of the model
# ------------------------------------------------------------------------------------------------------------------

# The released generators (upstream README) by architecture: (hidden_size, layers, patch_size, tokens per image).
RELEASED_GENERATORS = {
    (768, 24, 1, 256): "bar_b",
    (768, 24, 2, 256): "bar_b_patch2",
    (768, 24, 4, 256): "bar_b_patch4",
    (1280, 32, 1, 256): "bar_l",
    (1280, 32, 1, 1024): "bar_l_res512",
}


def released_sampling_group(upstream_config: dict[str, Any]) -> str | None:
    """The conf/sampling group with the README settings of a released generator's official yaml, or None."""
    generator = (upstream_config.get("model") or {}).get("generator") or {}
    signature = tuple(generator.get(key) for key in ("hidden_size", "num_hidden_layers", "patch_size",
                                                       "image_seq_len"))
    if generator.get("patch_size") is None:
        signature = (*signature[:2], 1, signature[3])
    return RELEASED_GENERATORS.get(signature)


def upstream_sampling_settings(upstream_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings an official yaml itself carries (its training-time previews)."""
    generator = (upstream_config.get("model") or {}).get("generator") or {}
    head = generator.get("mbm_head") or {}
    settings = {
        "guidance_scale": generator.get("guidance_scale"),
        "temperature": head.get("randomize_temperature"),
        "tokens_allocation": head.get("tokens_allocation"),
    }
    return {key: value for key, value in settings.items() if value is not None}


def sampling_group(name: str) -> dict[str, Any]:
    """The sampling method's values of conf/sampling/<name>.yaml (not its defaults list: the GPU speed settings it
    includes are evaluate.py's own)."""
    from bar_lightning.paths import config_dir

    path = config_dir() / "sampling" / f"{name}.yaml"
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {key: value for key, value in values.items() if key in SAMPLING_METHOD_KEYS}


def model_sampling_settings(generator_source: DictConfig) -> tuple[dict[str, Any], str] | None:
    """The sampling settings of the generator `generator_source` names, and where they come from; None if unknown."""
    if generator_source.get("checkpoint"):
        from bar_lightning.checkpoint_files import read_module_checkpoint

        checkpoint = read_module_checkpoint(generator_source.checkpoint, expected="generator",
                                            key="generator.checkpoint", mmap=True)
        sampling = checkpoint.get("hyper_parameters", {}).get("sampling") or {}
        settings = {key: sampling[key] for key in SAMPLING_METHOD_KEYS if key in sampling}
        return (settings, f"the checkpoint {generator_source.checkpoint}") if settings else None
    if generator_source.get("upstream_config"):
        from bar_lightning.compat.files import load_yaml_config

        config = load_yaml_config(generator_source.upstream_config, key="generator.upstream_config")
        group = released_sampling_group(config)
        if group is not None:
            return sampling_group(group), f"the upstream README's settings for {group} (sampling={group})"
        settings = upstream_sampling_settings(config)
        return (settings, f"the official yaml {generator_source.upstream_config}") if settings else None
    return None


def derive_evaluation_sampling(cfg: DictConfig, overrides: Sequence[str] | None) -> DictConfig:
    """Take the sampling method's settings of `cfg` (in place) from the generator unless the command line sets them.

    With `overrides=None` (not a Hydra run) the config is used as it is.
    """
    if overrides is None:
        return cfg
    explicit = overridden_keys(overrides)
    if "sampling" in explicit:
        return cfg
    found = model_sampling_settings(cfg.generator)
    if found is None:
        return cfg
    settings, origin = found
    taken = {key: value for key, value in settings.items()
             if key in SAMPLING_METHOD_KEYS and f"sampling.{key}" not in explicit}
    if not taken:
        return cfg
    with open_dict(cfg):
        for key, value in taken.items():
            cfg.sampling[key] = value
    log.info("sampling settings from %s: %s (sampling=<group> or sampling.<key>=... on the command line choose "
             "others)", origin, ", ".join(f"{key}={cfg.sampling[key]}" for key in taken))
    return cfg
