"""Export a checkpoint of this project as the official release looks: weights under the official key names plus the
official yaml that describes them, so the official code (and `evaluate.py generator.upstream_weights=...
generator.upstream_config=...`) loads it with its own config.

    python -m bar_lightning.export generator.checkpoint=<run>/checkpoints/last.ckpt out=<dir>
    python -m bar_lightning.export tokenizer.checkpoint=<run>/checkpoints/last.ckpt out=<dir> format=safetensors

Writes `<out>/<name>.bin` (torch.save, what the release ships; `format=safetensors` for a `.safetensors` file) and
`<out>/<name>.yaml`; `name` defaults to the run's experiment name. Files are written atomically; an existing file is
only replaced with `overwrite=true`.

* Generator: the MBM-head BARGenerator (the official code has no linear head), its sampling settings (guidance scale,
  temperature, `tokens_allocation`, which the official sampler reads from the yaml) and its training recipe.
* Tokenizer: BAR-FSQ only (the official code has no convolutional tokenizer), the EMA weights when the checkpoint
  has them (what evaluation decodes with), and only at the official sizes (SigLIP2-so400m/16 encoder with its frozen
  copy, ViT-L decoder): the official `BAR_FSQ` builds exactly those, whatever its yaml says.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from bar_lightning.config.schema import ConfigError

log = logging.getLogger(__name__)

FORMATS = {"bin": ".bin", "safetensors": ".safetensors"}
# The tokenizer each released generator samples with (the official yaml's experiment.tokenizer_checkpoint), keyed
# by (tokens per image, bits per token).
RELEASED_TOKENIZERS = {
    (256, 16): "assets/tokenizer/bar_fsq_16bits_ft.bin",
    (1024, 10): "assets/tokenizer/bar_sfq_10bits_res512.bin",
}
# BarFSQTokenizer keyword arguments the official yaml cannot express: the official BAR_FSQ hard-codes them.
OFFICIAL_FIXED_SIZES = ("encoder_width", "encoder_layers", "encoder_heads", "encoder_mlp_width", "encoder_patch_size",
                        "encoder_layer_norm_eps", "decoder_width", "decoder_layers", "decoder_heads",
                        "decoder_mlp_ratio")


class ExportError(ValueError):
    """A checkpoint the official code cannot represent, or an export request that cannot be carried out."""


@dataclass
class SourceConfig:
    checkpoint: str | None = None


@dataclass
class ExportConfig:
    """`python -m bar_lightning.export` arguments (key=value, typos refused)."""

    generator: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: SourceConfig = field(default_factory=SourceConfig)
    out: str | None = None
    name: str | None = None
    format: str = "bin"
    overwrite: bool = False
    # The generator yaml's experiment.tokenizer_checkpoint (the official sampler decodes with it); null: the
    # released tokenizer of the generator's token grid, when there is one.
    tokenizer_checkpoint: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# the official yaml
# ---------------------------------------------------------------------------------------------------------------
def official_generator_config(hparams: dict[str, Any], *, name: str, weights_file: str,
                              tokenizer_checkpoint: str | None) -> dict[str, Any]:
    """The official generator yaml for a GeneratorModule's hyper-parameters (model, sampling, optim, training)."""
    model, sampling = hparams["model"], hparams.get("sampling") or {}
    optim, training = hparams.get("optim") or {}, hparams.get("training") or {}
    if model.get("head", "mbm") != "mbm":
        raise ExportError(f"model.head={model['head']!r}: the official code has only the MBM head; a "
                          "generator with another head cannot be exported")
    generator: dict[str, Any] = {
        "hidden_size": model["hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_heads"],
        "class_label_dropout": training.get("class_label_dropout", 0.1),
        "image_seq_len": model["num_tokens"],
        "condition_num_classes": model["num_classes"],
        "target_codebook_size": 2,
        "use_checkpoint": bool(model.get("use_checkpoint", False)),
        "randomness_anneal_start": training.get("randomness_anneal_start"),
        "randomness_anneal_end": training.get("randomness_anneal_end"),
        "repeat_class_condition": model.get("repeat_class_condition", 32),
        "patch_size": model.get("patch_size", 1),
        "dropout": float(model.get("dropout", 0.0)),
        "guidance_scale": sampling.get("guidance_scale"),
        "mbm_head": {
            "width": model.get("head_width", 2048),
            "num_layers": model.get("head_layers", 3),
            "randomize_temperature": sampling.get("temperature"),
            "tokens_allocation": list(sampling["tokens_allocation"]) if sampling.get("tokens_allocation") else None,
        },
    }
    for key in ("latent_height", "latent_width"):
        if model.get(key) is not None:
            generator[key] = model[key]
    generator = {key: value for key, value in generator.items() if value is not None}
    generator["mbm_head"] = {key: value for key, value in generator["mbm_head"].items() if value is not None}
    bits = int(model["bits_per_token"])
    experiment: dict[str, Any] = {"project": "bar", "name": name, "output_dir": name,
                                  "generator_checkpoint": weights_file}
    tokenizer = tokenizer_checkpoint or RELEASED_TOKENIZERS.get((int(model["num_tokens"]), bits))
    if tokenizer:
        experiment["tokenizer_checkpoint"] = tokenizer
    config: dict[str, Any] = {
        "experiment": experiment,
        "model": {"vq_model": {"codebook_size": 2**bits, "token_size": bits, "vit_dec_patch_size": 16},
                  "generator": generator},
    }
    if optim:
        betas = list(optim.get("betas") or (0.9, 0.96))
        config["optimizer"] = {"name": "adamw", "params": {
            "learning_rate": optim.get("learning_rate"), "beta1": betas[0], "beta2": betas[1],
            "weight_decay": optim.get("weight_decay")}}
        config["lr_scheduler"] = {"scheduler": "cosine", "params": {
            "learning_rate": optim.get("learning_rate"), "warmup_steps": optim.get("warmup_steps"),
            "end_lr": optim.get("end_lr")}}
    return config


def official_tokenizer_config(hparams: dict[str, Any], *, name: str) -> dict[str, Any]:
    """The official tokenizer yaml for a TokenizerModule's hyper-parameters."""
    model, loss = hparams["model"], hparams.get("loss") or {}
    optim = hparams.get("optim") or {}
    bits = int(model["bits_per_token"])
    clip_weight = float(loss.get("distill_weight", 0.7 if model.get("clip_distillation") else 0.0))
    if bool(model.get("clip_distillation")) != (clip_weight > 0):
        # The official model builds its distillation projection exactly when clip_loss_weight > 0.
        clip_weight = 0.7 if model.get("clip_distillation") else 0.0
    config: dict[str, Any] = {
        "experiment": {"project": "bar_fsq", "name": name, "output_dir": name},
        "model": {"vq_model": {
            "codebook_size": 2**bits, "token_size": bits,
            "encoder_lr_mult": optim.get("encoder_lr_multiplier", 0.1),
            "clip_align_layer_id": model.get("clip_align_layer_id", 2),
            "use_checkpoint": bool(model.get("use_checkpoint", False)),
            "vit_dec_patch_size": model.get("decoder_patch_size", 16),
        }},
        "losses": {"clip_loss_weight": clip_weight},
        "dataset": {"preprocessing": {"crop_size": model.get("image_size", 256)}},
    }
    for ours, official in (("l1_weight", "reconstruction_weight_l1"), ("l2_weight", "reconstruction_weight_l2"),
                           ("perceptual_weight", "perceptual_weight"), ("gram_weight", "gram_loss_weight")):
        if loss.get(ours) is not None:
            config["losses"][official] = loss[ours]
    return config


def unofficial_tokenizer_sizes(model: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (this tokenizer's value, the official one)}` for every size the official BAR_FSQ hard-codes."""
    from bar_lightning.models.tokenizer import BarFSQTokenizer

    defaults = {name: parameter.default for name, parameter in inspect.signature(BarFSQTokenizer).parameters.items()}
    return {key: (model[key], defaults[key]) for key in OFFICIAL_FIXED_SIZES
            if key in model and model[key] != defaults[key]}


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_export(out: Path, name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], *,
                 file_format: str, overwrite: bool) -> tuple[Path, Path]:
    """Write `<out>/<name><suffix>` and `<out>/<name>.yaml`, atomically; refuse to replace files unless asked."""
    if file_format not in FORMATS:
        raise ExportError(f"format={file_format!r}: use one of {sorted(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / f"{name}{FORMATS[file_format]}", out / f"{name}.yaml"
    existing = [str(path) for path in (weights_path, config_path) if path.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exist(s); pass overwrite=true to replace, or another "
                          "out= / name=")
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    if file_format == "safetensors":
        from safetensors.torch import save_file

        _atomic_write(weights_path, lambda tmp: save_file(tensors, str(tmp)))
    else:
        _atomic_write(weights_path, lambda tmp: torch.save(tensors, tmp))
    text = yaml.safe_dump(config, sort_keys=False)
    _atomic_write(config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return weights_path, config_path


def export_generator(checkpoint: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                     file_format: str = "bin", overwrite: bool = False,
                     tokenizer_checkpoint: str | None = None) -> tuple[Path, Path]:
    """A generator checkpoint of this project -> official weights + yaml. Returns both paths."""
    from bar_lightning.compat.upstream import export_generator_state_dict
    from bar_lightning.lightning.checkpointing import read_module_checkpoint
    from bar_lightning.lightning.generator_module import GeneratorModule

    record = read_module_checkpoint(checkpoint, expected="generator", key="generator.checkpoint", mmap=True)
    hparams = record["hyper_parameters"]
    name = name or _default_name(hparams, checkpoint, fallback="bar_generator")
    weights_file = f"{name}{FORMATS.get(file_format, '')}"
    config = official_generator_config(hparams, name=name, weights_file=weights_file,
                                       tokenizer_checkpoint=tokenizer_checkpoint)
    module = GeneratorModule.load_from_checkpoint(Path(checkpoint), map_location="cpu", weights_only=True)
    tensors = export_generator_state_dict(module.generator.eval())
    return write_export(Path(out), name, tensors, config, file_format=file_format, overwrite=overwrite)


def export_tokenizer(checkpoint: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                     file_format: str = "bin", overwrite: bool = False,
                     official_sizes_only: bool = True) -> tuple[Path, Path]:
    """A BAR-FSQ tokenizer checkpoint of this project (EMA weights when present) -> official weights + yaml.

    `official_sizes_only=False` exports a tokenizer of other sizes too (the key names and the yaml are the official
    ones, but the official code cannot build it; `compat.upstream.load_tokenizer(..., encoder=, decoder=)` can).
    """
    from bar_lightning.compat.upstream import export_tokenizer_state_dict
    from bar_lightning.lightning.checkpointing import read_module_checkpoint
    from bar_lightning.lightning.tokenizer_module import TokenizerModule

    record = read_module_checkpoint(checkpoint, expected="tokenizer", key="tokenizer.checkpoint", mmap=True)
    hparams = record["hyper_parameters"]
    model = hparams.get("model") or {}
    if model.get("family") != "bar_fsq":
        raise ExportError(f"tokenizer.checkpoint={checkpoint} is a {model.get('family')!r} tokenizer; the official "
                          "code has only BAR-FSQ (family bar_fsq), so only those can be exported")
    different = unofficial_tokenizer_sizes(model)
    if different and official_sizes_only:
        listed = ", ".join(f"{key}={ours} (official {theirs})" for key, ours, theirs in
                           ((key, *pair) for key, pair in different.items()))
        raise ExportError(f"tokenizer.checkpoint={checkpoint}: {listed}; the official BAR_FSQ always builds the "
                          "SigLIP2-so400m/16 encoder and the ViT-L decoder, so it could not load this export")
    name = name or _default_name(hparams, checkpoint, fallback="bar_fsq")
    config = official_tokenizer_config(hparams, name=name)
    tokenizer = TokenizerModule.load_tokenizer(Path(checkpoint), use_ema=True)
    tensors = export_tokenizer_state_dict(tokenizer)
    return write_export(Path(out), name, tensors, config, file_format=file_format, overwrite=overwrite)


def _default_name(hparams: dict[str, Any], checkpoint: str | os.PathLike, *, fallback: str) -> str:
    """The run's experiment name when the checkpoint's run folder has its config, else `fallback`."""
    run_config = Path(checkpoint).resolve().parent.parent / ".hydra" / "config.yaml"
    try:
        name = OmegaConf.load(run_config).get("experiment_name")
    except Exception:  # noqa: BLE001 - no readable run config: the fallback name
        name = None
    return str(name) if name and "/" not in str(name) else fallback


def parse_arguments(argv: Sequence[str]) -> ExportConfig:
    """key=value arguments against the `ExportConfig` schema (unknown keys and wrong types are refused)."""
    bad = [argument for argument in argv if "=" not in argument]
    if bad:
        raise ConfigError(f"{bad[0]!r}: arguments are key=value, e.g. generator.checkpoint=<ckpt> out=<dir>")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(list(argv)))
    except Exception as error:  # noqa: BLE001 - OmegaConf's validation errors: shown with the argument
        raise ConfigError(f"{error}".splitlines()[0] + f" (keys: {', '.join(ExportConfig.__dataclass_fields__)})"
                          ) from None
    config: ExportConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    sources = [key for key in ("generator", "tokenizer") if getattr(config, key).checkpoint]
    if len(sources) != 1:
        raise ConfigError("give exactly one of generator.checkpoint=<ckpt> and tokenizer.checkpoint=<ckpt>")
    if not config.out:
        raise ConfigError("out=<folder> is required: where the weights and the yaml are written")
    if config.format not in FORMATS:
        raise ConfigError(f"format={config.format!r}: use one of {sorted(FORMATS)}")
    if config.name is not None and (not config.name or "/" in config.name):
        raise ConfigError(f"name={config.name!r}: a file name without '/'")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = parse_arguments(sys.argv[1:] if argv is None else argv)
        if config.generator.checkpoint:
            paths = export_generator(config.generator.checkpoint, config.out, name=config.name,
                                     file_format=config.format, overwrite=config.overwrite,
                                     tokenizer_checkpoint=config.tokenizer_checkpoint)
            section = "generator"
        else:
            paths = export_tokenizer(config.tokenizer.checkpoint, config.out, name=config.name,
                                     file_format=config.format, overwrite=config.overwrite)
            section = "tokenizer"
    except (ConfigError, ExportError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    weights, config_path = paths
    print(f"wrote {weights} and {config_path}\nload it back: python evaluate.py {section}.upstream_weights={weights} "
          f"{section}.upstream_config={config_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
