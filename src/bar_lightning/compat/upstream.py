"""Interoperability with the official BAR code: its configs, its checkpoint key names and files.

Public entry points:
    load_generator(config, state_dict) -> BARGenerator
    export_generator_state_dict(model) -> dict with upstream key names (loads strictly into the official `BAR`)
    generator_kwargs(config) -> keyword arguments of `BARGenerator` for an upstream config
    load_state_dict_file(path) -> a tensor mapping, read without executing code
and, for the tokenizer, `load_fsq`, `load_tokenizer`, `export_tokenizer_state_dict` (see `upstream_tokenizer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bar_lightning.compat.files import (
    config_number,
    format_keys,
    load_state_dict_file,
    strip_prefixes,
    to_plain,
)
from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.layers import rope_2d_tables

ROPE_BUFFER_SUFFIXES = ("attn.rope.freqs_cos", "attn.rope.freqs_sin")
MODULE_PREFIX = "generator."  # GeneratorModule's attribute holding the network


def generator_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `BARGenerator` from an upstream config `{"model": {"vq_model", "generator"}}`."""
    config = to_plain(config)
    try:
        model = config["model"]
        vq_model, generator = model["vq_model"], model["generator"]
    except (KeyError, TypeError) as error:
        raise ValueError(
            "an upstream config must look like {'model': {'vq_model': {...}, 'generator': {...}}} "
            f"(as in the official configs/generator/*.yaml); missing {error}"
        ) from error
    if not isinstance(generator, Mapping) or not isinstance(vq_model, Mapping):
        raise ValueError("model.generator and model.vq_model must be mappings, as in the official configs")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "image_seq_len", "condition_num_classes"]
    missing = [key for key in required if key not in generator]
    if "token_size" not in vq_model:
        missing.append("vq_model.token_size")
    if missing:
        raise ValueError(f"upstream generator config lacks {missing}")

    def number(section: Mapping[str, Any], name: str, where: str, default: Any = None, kind: type = int) -> Any:
        value = section.get(name, default)
        return config_number(default if value is None else value, f"model.{where}.{name}", kind)

    codebook = number(generator, "target_codebook_size", "generator", 2)
    if codebook != 2:
        raise ValueError(f"model.generator.target_codebook_size={codebook}: BAR predicts bits, it must be 2")
    token_size = number(vq_model, "token_size", "vq_model")
    if "codebook_size" in vq_model and number(vq_model, "codebook_size", "vq_model") != 2**token_size:
        raise ValueError(
            f"model.vq_model.codebook_size={vq_model['codebook_size']} != 2**token_size={2**token_size}; "
            "a binary FSQ tokenizer with token_size bits has 2**token_size codes"
        )
    head = generator.get("mbm_head", {}) or {}
    if not isinstance(head, Mapping):
        raise ValueError(f"model.generator.mbm_head={head!r} must be a mapping (width, num_layers)")
    latent = {name: generator.get(name) for name in ("latent_height", "latent_width")}
    return {
        "hidden_size": number(generator, "hidden_size", "generator"),
        "num_layers": number(generator, "num_hidden_layers", "generator"),
        "num_heads": number(generator, "num_attention_heads", "generator"),
        "num_tokens": number(generator, "image_seq_len", "generator"),
        "bits_per_token": token_size,
        "num_classes": number(generator, "condition_num_classes", "generator"),
        "patch_size": number(generator, "patch_size", "generator", 1) or 1,
        **{name: None if value is None else number(generator, name, "generator") for name, value in latent.items()},
        "repeat_class_condition": number(generator, "repeat_class_condition", "generator", 32),
        "dropout": number(generator, "dropout", "generator", 0.0, kind=float),
        "head": "mbm",
        "head_width": number(head, "width", "generator.mbm_head", 2048),
        "head_layers": number(head, "num_layers", "generator.mbm_head", 3),
        "use_checkpoint": bool(generator.get("use_checkpoint", False)),
    }


def import_generator_state_dict(model: BARGenerator, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream keys -> this model's keys, checking names, shapes and the per-block RoPE tables."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    if not set(state_dict) & set(own) and any(key.startswith(MODULE_PREFIX) for key in state_dict):
        # This project's Lightning checkpoint (<run>/checkpoints/*.ckpt): the network sits under `generator.`.
        state_dict = {key[len(MODULE_PREFIX):]: value for key, value in state_dict.items()
                      if key.startswith(MODULE_PREFIX)}
    rope_cos, rope_sin = rope_2d_tables(model.hidden_size // model.num_heads, model.step_grid_side, model.prefix_len)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("blocks.") and key.endswith(ROPE_BUFFER_SUFFIXES):
            # Upstream stores one RoPE table per block (the same tensor); ours is computed. They must agree, or
            # the checkpoint was made for another grid / head size.
            table = rope_cos if key.endswith("cos") else rope_sin
            if tuple(value.shape) != tuple(table.shape) or not torch.allclose(value.float(), table, atol=1e-5):
                raise ValueError(
                    f"{key} {tuple(value.shape)} does not match the RoPE table {tuple(table.shape)} of this config "
                    "(grid side, patch_size, repeat_class_condition or head size differ from the checkpoint's)"
                )
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}; "
                "the config does not match the checkpoint (check hidden_size, token_size, patch_size, "
                "condition_num_classes and mbm_head.width)"
            )
        converted[key] = value
    missing = sorted(set(own) - set(converted))
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing keys [{format_keys(missing)}]; unexpected keys [{format_keys(sorted(unexpected))}]"
        )
    return converted


def load_generator(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> BARGenerator:
    """Build a `BARGenerator` from an upstream config and load upstream weights strictly (eval mode, CPU).

    `state_dict` may also be a checkpoint of this project (`<run>/checkpoints/last.ckpt`): its `generator.` keys are
    the network's."""
    if isinstance(state_dict, str | os.PathLike):
        state_dict = load_state_dict_file(state_dict)
    with torch.device("meta"):
        model = BARGenerator(**generator_kwargs(config))
    converted = import_generator_state_dict(model, state_dict)
    # Buffers that are not in the state dict (RoPE tables) are rebuilt on CPU; parameters come from the file.
    model = model.to_empty(device="cpu")
    model.init_non_persistent_buffers()
    model.load_state_dict(converted, strict=True, assign=False)
    return model.eval()


def export_generator_state_dict(model: BARGenerator) -> dict[str, torch.Tensor]:
    """This model's weights under upstream key names, RoPE tables included, ready for the official `BAR`."""
    if model.head_type != "mbm":
        raise ValueError(f"the official code has no {model.head_type!r} head; only head='mbm' models can be exported")
    exported: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        exported[key] = value.detach().cpu().clone()
        if key.startswith("blocks.") and key.endswith(".attn.proj.bias"):
            block_prefix = key[: -len("proj.bias")]
            exported[block_prefix + "rope.freqs_cos"] = model.rope_cos.detach().cpu().clone()
            exported[block_prefix + "rope.freqs_sin"] = model.rope_sin.detach().cpu().clone()
    return exported


def save_generator_for_upstream(model: BARGenerator, path: str | os.PathLike) -> Path:
    """Write `export_generator_state_dict(model)` as a `.bin` (torch.save) or `.safetensors` file, atomically."""
    path = Path(path)
    tensors = export_generator_state_dict(model)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared storage; the per-block RoPE copies are already independent clones.
        save_file(tensors, str(tmp))
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path


# The tokenizer half of the compatibility layer, re-exported so users need one import.
from bar_lightning.compat.upstream_tokenizer import (  # noqa: E402
    export_tokenizer_state_dict,
    load_fsq,
    load_tokenizer,
)

__all__ = [
    "export_generator_state_dict",
    "export_tokenizer_state_dict",
    "generator_kwargs",
    "import_generator_state_dict",
    "load_fsq",
    "load_generator",
    "load_state_dict_file",
    "load_tokenizer",
    "save_generator_for_upstream",
    "strip_prefixes",
]
