"""Where a generator or tokenizer for sampling, decoding or previews comes from: a checkpoint of this project (vetted
before it is loaded) or released weights with their official yaml. Used by evaluate.py, the sampler page,
pretokenize.py and the training previews.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bar_lightning.compat.files import UpstreamConfigError, load_yaml_config
from bar_lightning.compat.upstream import generator_kwargs, load_generator
from bar_lightning.config.schema import (
    ConfigError,
    GeneratorModelConfig,
    check_generator_model,
    merge_with_schema,
)
from bar_lightning.models.bar import BARGenerator


def load_generator_from_source(source: DictConfig) -> BARGenerator:
    """A generator in eval mode from `generator.checkpoint` (this project) or `generator.upstream_*` (released).

    A checkpoint is vetted first (no code runs, and a tokenizer checkpoint or bare weights are refused naming the
    key); an official yaml is read with its interpolations resolved and its entries checked, errors naming the file.
    """
    if source.checkpoint:
        from bar_lightning.lightning.checkpointing import (
            CheckpointReadError,
            check_weights_fit,
            read_module_checkpoint,
        )
        from bar_lightning.lightning.generator_module import GeneratorModule

        what = f"generator.checkpoint={source.checkpoint}"
        checkpoint = read_module_checkpoint(source.checkpoint, expected="generator", key="generator.checkpoint",
                                            mmap=True)
        model = checkpoint["hyper_parameters"]["model"]
        try:
            check_generator_model(merge_with_schema(model, GeneratorModelConfig, written_by="its model hyper-parameters"))
        except ConfigError as error:
            raise CheckpointReadError(f"{what}: its hyper-parameters are not a valid generator ({error})") from None
        weights = {key.removeprefix("generator."): value for key, value in checkpoint["state_dict"].items()}
        check_weights_fit(lambda: BARGenerator(**model), weights, what=what)
        module = GeneratorModule.load_from_checkpoint(Path(source.checkpoint), map_location="cpu", weights_only=True)
        return module.generator.eval()
    config = upstream_config(source.upstream_config, key="generator.upstream_config", kwargs_of=generator_kwargs)
    weights = Path(source.upstream_weights)
    if not weights.is_file():
        from bar_lightning.weights import fetch_hint

        raise FileNotFoundError(
            f"generator.upstream_weights={weights} does not exist (a released bar_*.bin).{fetch_hint(weights)}"
        )
    return load_generator(config, weights)


def load_tokenizer_from_source(
    source: DictConfig, *, decode_only: bool, key_prefix: str = "tokenizer"
) -> torch.nn.Module:
    """The tokenizer of `tokenizer.checkpoint` (this project, EMA weights) or `tokenizer.upstream_*` (released).

    `key_prefix` is where the source sits in the config (`preview.tokenizer` in train.py), for error messages.
    """
    if source.get("checkpoint"):
        from bar_lightning.lightning.tokenizer_module import TokenizerModule

        return TokenizerModule.load_tokenizer(Path(source.checkpoint), use_ema=True, decode_only=decode_only,
                                              key=f"{key_prefix}.checkpoint")
    from bar_lightning.compat.upstream import load_tokenizer
    from bar_lightning.compat.upstream_tokenizer import tokenizer_kwargs

    config = upstream_config(source.upstream_config, key=f"{key_prefix}.upstream_config", kwargs_of=tokenizer_kwargs)
    weights = Path(source.upstream_weights or "")
    if not weights.is_file():
        from bar_lightning.weights import fetch_hint

        raise FileNotFoundError(
            f"{key_prefix}.upstream_weights={weights} does not exist (e.g. bar_fsq_16bits_ft.bin).{fetch_hint(weights)}"
        )
    return load_tokenizer(config, weights, decode_only=decode_only)


def upstream_config(path: str | None, *, key: str, kwargs_of: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """An official yaml, resolved and checked by building the model's keyword arguments; errors name the file."""
    if not path:
        raise FileNotFoundError(f"{key} is not set: the official yaml of the released weights")
    config = load_yaml_config(path, key=key)
    try:
        kwargs_of(config)
    except (ValueError, TypeError) as error:
        raise UpstreamConfigError(f"{key}={path}: {error}") from None
    return config
