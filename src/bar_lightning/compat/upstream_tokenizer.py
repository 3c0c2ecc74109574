"""Interoperability of the tokenizer with the official BAR code (`BAR_FSQ`, `SigLIP2Decoder`, `FSQ`).

Public entry points:
    tokenizer_kwargs(config, encoder=None, decoder=None) -> keyword arguments of `BarFSQTokenizer`
    load_tokenizer(config, state_dict, encoder=None, decoder=None, decode_only=False) -> BarFSQTokenizer
    import_tokenizer_state_dict(tokenizer, state_dict, decode_only=False) -> this model's keys, checked
    export_tokenizer_state_dict(tokenizer) -> dict with the official key names
    load_fsq(state_dict) -> BinaryFSQ
    load_decoder(config, state_dict, decoder=None) -> ViTPixelDecoder   (the official decoder saved on its own)

Key names. Ours differ from the official ones only in container names:

    official                                   here
    decoder.transformer.N.*                    decoder.blocks.N.*
    decoder.ffn.0.*                            decoder.to_pixels.*
    encoder.siglip.embeddings.*                encoder.embeddings.*
    encoder.siglip.encoder.layers.N.*          encoder.frozen_layers.N.*        (same tensors as ...
    encoder.frozen_encoder.layers.N.*          encoder.frozen_layers.N.*         ... in the official model)
    encoder.siglip.post_layernorm.*            encoder.frozen_post_layernorm.*  (same tensors as ...
    encoder.frozen_post_layernorm.*            encoder.frozen_post_layernorm.*   ... in the official model)
    encoder.siglip.head.*                      encoder.pooling_head.*           (unused by the tokenizer)
    encoder.trainable_encoder.layers.N.*       encoder.trainable_layers.N.*

The official state_dict lists every frozen tensor twice (two attribute paths to one module); both names are
accepted on import (they must hold equal values when both are present) and both are written on export.

SigLIP's attention-pooling head (`encoder.siglip.head.*`) is never used by the tokenizer. `load_tokenizer` keeps it
(frozen, `encoder.pooling_head`) when the checkpoint has it, so re-export is loss-free. A tokenizer built without it
exports no head keys; the official `BAR_FSQ` then needs `load_state_dict(..., strict=False)`, and the only missing
keys are `encoder.siglip.head.*`, which its constructor has already filled from the pretrained SigLIP2 weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from bar_lightning.compat.files import config_number, load_state_dict_file, strip_prefixes
from bar_lightning.compat.files import format_keys as _format_keys
from bar_lightning.compat.files import to_plain as _to_plain
from bar_lightning.models.fsq import BinaryFSQ
from bar_lightning.models.tokenizer import BarFSQTokenizer
from bar_lightning.models.vit import ViTPixelDecoder

# (official prefix, our prefix); the first official prefix of an aliased pair is the canonical one.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("decoder.transformer.", "decoder.blocks."),
    ("decoder.ffn.0.", "decoder.to_pixels."),
    ("encoder.siglip.embeddings.", "encoder.embeddings."),
    ("encoder.siglip.encoder.layers.", "encoder.frozen_layers."),
    ("encoder.frozen_encoder.layers.", "encoder.frozen_layers."),
    ("encoder.siglip.post_layernorm.", "encoder.frozen_post_layernorm."),
    ("encoder.frozen_post_layernorm.", "encoder.frozen_post_layernorm."),
    ("encoder.siglip.head.", "encoder.pooling_head."),
    ("encoder.trainable_encoder.layers.", "encoder.trainable_layers."),
)
POOLING_HEAD_PREFIX = "encoder.siglip.head."
# Order of the groups in the official state_dict (module registration order); export follows it.
OFFICIAL_GROUP_ORDER = (
    "decoder.",
    "encoder.siglip.embeddings.",
    "encoder.siglip.encoder.",
    "encoder.siglip.post_layernorm.",
    "encoder.siglip.head.",
    "encoder.frozen_encoder.",
    "encoder.trainable_encoder.",
    "encoder.frozen_post_layernorm.",
    "encoder.trainable_post_layernorm.",
    "quantize.",
)

# Official SigLIP2 vision-config names -> our keyword arguments.
ENCODER_SIZE_KEYS = {
    "hidden_size": "encoder_width",
    "intermediate_size": "encoder_mlp_width",
    "num_hidden_layers": "encoder_layers",
    "num_attention_heads": "encoder_heads",
    "patch_size": "encoder_patch_size",
    "num_patches": "encoder_position_rows",
    "layer_norm_eps": "encoder_layer_norm_eps",
}
# Vision-config entries we accept only with the value our encoder implements.
ENCODER_FIXED_KEYS = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0}
DECODER_SIZE_KEYS = {
    "width": "decoder_width",
    "num_layers": "decoder_layers",
    "num_heads": "decoder_heads",
    "mlp_ratio": "decoder_mlp_ratio",
}


# ---------------------------------------------------------------------------------------------------------------
# key mapping
# ---------------------------------------------------------------------------------------------------------------
def official_to_own_key(key: str) -> str:
    """Official tokenizer key -> our key (keys outside the renamed containers are identical)."""
    for official, own in KEY_RENAMES:
        if key.startswith(official):
            return own + key[len(official) :]
    return key


def own_to_official_keys(key: str) -> list[str]:
    """Our key -> every official key naming that tensor (two for the aliased frozen encoder)."""
    names = [official + key[len(own) :] for official, own in KEY_RENAMES if key.startswith(own)]
    return names or [key]


def _official_order(key: str) -> int:
    return next((rank for rank, prefix in enumerate(OFFICIAL_GROUP_ORDER) if key.startswith(prefix)), len(OFFICIAL_GROUP_ORDER))


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
def _section(config: Mapping[str, Any], *path: str) -> Any:
    node: Any = config
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(f"tokenizer config has no '{'.'.join(path)}' (missing '{name}')")
        node = node[name]
    return node


def _int(config: Mapping[str, Any], *path: str) -> int:
    return config_number(_section(config, *path), ".".join(path))


def tokenizer_kwargs(
    config: Mapping[str, Any],
    encoder: Mapping[str, Any] | None = None,
    decoder: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `BarFSQTokenizer` for an official tokenizer config.

    Args:
        config: `{"model": {"vq_model": {...}}, "dataset": {"preprocessing": {"crop_size": ...}}, "losses": {...}}`
            (a dict or an OmegaConf container), as given to the official `BAR_FSQ`.
        encoder: SigLIP2 vision-config overrides (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
            `num_attention_heads`, `patch_size`, `num_patches`, `layer_norm_eps`); None = so400m/16.
        decoder: decoder overrides (`width`, `num_layers`, `num_heads`, `mlp_ratio`); None = ViT-L.
    """
    config = _to_plain(config)
    vq = _section(config, "model", "vq_model")
    token_size = _int(config, "model", "vq_model", "token_size")
    codebook_size = vq.get("codebook_size")
    if codebook_size is not None and config_number(codebook_size, "model.vq_model.codebook_size") != 2**token_size:
        raise ValueError(
            f"model.vq_model.codebook_size={codebook_size} must equal 2**token_size = {2**token_size} "
            "(binary FSQ: two levels per bit)"
        )
    losses = config.get("losses") or {}
    kwargs: dict[str, Any] = {
        "image_size": _int(config, "dataset", "preprocessing", "crop_size"),
        "bits_per_token": token_size,
        "decoder_patch_size": _int(config, "model", "vq_model", "vit_dec_patch_size"),
        "clip_distillation": config_number(losses.get("clip_loss_weight", 0.0), "losses.clip_loss_weight", float) > 0,
        "clip_align_layer_id": config_number(vq.get("clip_align_layer_id", 2), "model.vq_model.clip_align_layer_id"),
        "use_checkpoint": bool(vq.get("use_checkpoint", False)),
    }
    for name, value in (_to_plain(encoder) or {}).items():
        if name in ENCODER_SIZE_KEYS:
            kwargs[ENCODER_SIZE_KEYS[name]] = float(value) if name == "layer_norm_eps" else int(value)
        elif name in ENCODER_FIXED_KEYS:
            if value != ENCODER_FIXED_KEYS[name]:
                raise ValueError(f"encoder {name}={value!r} is not supported; expected {ENCODER_FIXED_KEYS[name]!r}")
        else:
            raise ValueError(
                f"unknown encoder override {name!r}; expected one of {sorted(ENCODER_SIZE_KEYS) + sorted(ENCODER_FIXED_KEYS)}"
            )
    for name, value in (_to_plain(decoder) or {}).items():
        if name not in DECODER_SIZE_KEYS:
            raise ValueError(f"unknown decoder override {name!r}; expected one of {sorted(DECODER_SIZE_KEYS)}")
        kwargs[DECODER_SIZE_KEYS[name]] = float(value) if name == "mlp_ratio" else int(value)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------------
def _read(state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(state_dict, str | os.PathLike):
        state_dict = load_state_dict_file(state_dict)
    return strip_prefixes(state_dict)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return True  # layout checks on the meta device carry no values
    return a.shape == b.shape and torch.equal(a, b)


def import_tokenizer_state_dict(
    tokenizer: BarFSQTokenizer,
    state_dict: Mapping[str, torch.Tensor],
    *,
    decode_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Official keys -> this tokenizer's keys, checking names, shapes and aliased copies.

    With `decode_only=True` every `encoder.*` key is ignored (present or not). The pooling head is ignored when the
    tokenizer does not hold one. Raises ValueError listing missing and unexpected keys (official names).
    """
    state_dict = strip_prefixes(state_dict)
    own = tokenizer.state_dict()
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if decode_only and key.startswith("encoder."):
            continue
        own_key = official_to_own_key(key)
        if key.startswith(POOLING_HEAD_PREFIX) and own_key not in own:
            continue  # SigLIP's pooling head: never used by the tokenizer
        if own_key not in own:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[own_key].shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[own_key].shape)}; the config "
                "does not match the checkpoint (check crop_size, token_size, vit_dec_patch_size, clip_loss_weight "
                "and the encoder/decoder size overrides)"
            )
        if own_key in converted:
            if not _same_values(converted[own_key], value):
                raise ValueError(
                    f"{source_of[own_key]} and {key} name the same tensor in the official model but hold different "
                    "values in this checkpoint"
                )
            continue
        converted[own_key] = value
        source_of[own_key] = key
    missing = [own_to_official_keys(key)[0] for key in own if key not in converted]
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the tokenizer: "
            f"missing keys [{_format_keys(missing)}]; unexpected keys [{_format_keys(sorted(unexpected))}]"
        )
    return converted


def _build_and_load(module_factory, converted_of) -> Any:
    with torch.device("meta"):
        module = module_factory()
    converted = converted_of(module)
    module = module.to_empty(device="cpu")
    module.load_state_dict(converted, strict=True)
    return module.eval()


def load_tokenizer(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    encoder: Mapping[str, Any] | None = None,
    decoder: Mapping[str, Any] | None = None,
    *,
    decode_only: bool = False,
) -> BarFSQTokenizer:
    """Build a `BarFSQTokenizer` for an official config and load official weights strictly (eval mode, CPU).

    `state_dict` is a mapping or a `.safetensors` / `.bin` / `.pt` path (read without executing code);
    `_orig_mod.` / `module.` prefixes are stripped. `decode_only=True` builds no encoder and needs only the
    `decoder.*` and `quantize.*` keys (enough for `decode_bits`).
    """
    state_dict = _read(state_dict)
    kwargs = tokenizer_kwargs(config, encoder, decoder)
    kwargs["build_encoder"] = not decode_only
    kwargs["with_pooling_head"] = not decode_only and any(k.startswith(POOLING_HEAD_PREFIX) for k in state_dict)
    projector_out = state_dict.get("decoder.clip_projector.4.weight")
    if projector_out is not None:
        # The official projector's output width is a constant (1152), not the encoder width.
        kwargs["clip_target_width"] = int(projector_out.shape[0])
    return _build_and_load(
        lambda: BarFSQTokenizer(**kwargs),
        lambda model: import_tokenizer_state_dict(model, state_dict, decode_only=decode_only),
    )


def load_fsq(state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> BinaryFSQ:
    """Official `FSQ` weights (`in_proj.*`, `out_proj.*`, optionally under `quantize.`) -> `BinaryFSQ`."""
    state_dict = _read(state_dict)
    if state_dict and all(key.startswith("quantize.") for key in state_dict):
        state_dict = {key[len("quantize.") :]: value for key, value in state_dict.items()}
    for required in ("in_proj.weight", "out_proj.weight"):
        if required not in state_dict:
            raise ValueError(f"FSQ checkpoint has no {required!r}; keys: [{_format_keys(sorted(state_dict))}]")
    bits, in_channels = state_dict["in_proj.weight"].shape
    out_channels, out_bits = state_dict["out_proj.weight"].shape
    if out_bits != bits:
        raise ValueError(f"in_proj produces {bits} bits but out_proj.weight expects {out_bits}")

    def checked(model: BinaryFSQ) -> dict[str, torch.Tensor]:
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the FSQ: missing keys [{_format_keys(missing)}]; "
                f"unexpected keys [{_format_keys(unexpected)}]"
            )
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
        return dict(state_dict)

    return _build_and_load(lambda: BinaryFSQ(int(in_channels), int(out_channels), int(bits)), checked)


def load_decoder(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    decoder: Mapping[str, Any] | None = None,
) -> ViTPixelDecoder:
    """The official `SigLIP2Decoder` saved on its own (keys without `decoder.`) -> `ViTPixelDecoder`."""
    state_dict = _read(state_dict)
    config = _to_plain(config)
    vq = _section(config, "model", "vq_model")
    sizes = {"width": 1024, "num_layers": 24, "num_heads": 16, "mlp_ratio": 4.0}
    for name, value in (_to_plain(decoder) or {}).items():
        if name not in sizes:
            raise ValueError(f"unknown decoder override {name!r}; expected one of {sorted(sizes)}")
        sizes[name] = value
    losses = config.get("losses") or {}
    clip_on = config_number(losses.get("clip_loss_weight", 0.0), "losses.clip_loss_weight", float) > 0
    projector_out = state_dict.get("clip_projector.4.weight")
    kwargs = dict(
        image_size=_int(config, "dataset", "preprocessing", "crop_size"),
        patch_size=_int(config, "model", "vq_model", "vit_dec_patch_size"),
        width=int(sizes["width"]),
        num_layers=int(sizes["num_layers"]),
        num_heads=int(sizes["num_heads"]),
        mlp_ratio=float(sizes["mlp_ratio"]),
        clip_target_width=(int(projector_out.shape[0]) if projector_out is not None else 1152) if clip_on else None,
        clip_align_layer_id=config_number(vq.get("clip_align_layer_id", 2), "model.vq_model.clip_align_layer_id"),
        use_checkpoint=bool(vq.get("use_checkpoint", False)),
    )
    prefixed = {"decoder." + key: value for key, value in state_dict.items()}

    def checked(model: ViTPixelDecoder) -> dict[str, torch.Tensor]:
        own = {"decoder." + key: value for key, value in model.state_dict().items()}
        converted, unexpected = {}, []
        for key, value in prefixed.items():
            own_key = official_to_own_key(key)
            if own_key not in own:
                unexpected.append(key[len("decoder.") :])
            elif tuple(value.shape) != tuple(own[own_key].shape):
                raise ValueError(
                    f"{key[len('decoder.'):]}: checkpoint shape {tuple(value.shape)} != model shape "
                    f"{tuple(own[own_key].shape)}"
                )
            else:
                converted[own_key[len("decoder.") :]] = value
        missing = [own_to_official_keys(k)[0][len("decoder.") :] for k in own if k[len("decoder.") :] not in converted]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the decoder: missing keys [{_format_keys(missing)}]; "
                f"unexpected keys [{_format_keys(sorted(unexpected))}]"
            )
        return converted

    return _build_and_load(lambda: ViTPixelDecoder(**kwargs), checked)


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
def export_tokenizer_state_dict(tokenizer: BarFSQTokenizer) -> dict[str, torch.Tensor]:
    """This tokenizer's weights under the official key names, in the official order.

    The frozen encoder tensors are written under both of their official names (independent copies, so the
    result can be saved with safetensors). Loads strictly into the official `BAR_FSQ` when the tokenizer holds
    the pooling head; otherwise see the module docstring. Needs the encoder and its frozen branch: the official
    model always has them.
    """
    encoder = tokenizer.encoder
    if encoder is None or encoder.frozen_layers is None:
        raise ValueError(
            "the official BAR_FSQ always has the SigLIP2 encoder with its frozen copy; this tokenizer was built "
            "without it (build_encoder=False or with_frozen_branch=False) and cannot be exported"
        )
    exported: dict[str, torch.Tensor] = {}
    for key, value in tokenizer.state_dict().items():
        for official_key in own_to_official_keys(key):
            exported[official_key] = value.detach().clone() if not value.is_meta else value
    order = {key: index for index, key in enumerate(exported)}
    return dict(sorted(exported.items(), key=lambda item: (_official_order(item[0]), order[item[0]])))


__all__ = [
    "export_tokenizer_state_dict",
    "import_tokenizer_state_dict",
    "load_decoder",
    "load_fsq",
    "load_tokenizer",
    "official_to_own_key",
    "own_to_official_keys",
    "tokenizer_kwargs",
]
