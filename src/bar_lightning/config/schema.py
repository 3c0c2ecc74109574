"""Config validation: every key and type a run may set, checked before anything is built.

`validate_train_config(cfg)` merges the composed Hydra config into the dataclasses of `config/structured.py`
(re-exported here), so a typo (`trainer.max_step`)
or a wrong type (`model.hidden_size: big`) stops the run with the full key path, then checks cross-field rules
(`sampling.tokens_allocation` against the bits per AR step, anneal window, head choice) with messages that say the fix.
"""

from __future__ import annotations

import difflib
import math
import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bar_lightning.config.structured import (  # noqa: F401 - the schemas, re-exported with the checks
    IMAGE_DATA_SOURCES,
    SCHEMAS,
    TOKEN_DATA_SOURCES,
    TRAINING_COMPILE_MODES,
    AppConfig,
    ConfigError,
    EvaluateConfig,
    GeneratorModelConfig,
    GeneratorTrainConfig,
    GeneratorTrainingConfig,
    ImageDataConfig,
    MetricsConfig,
    ModelSourceConfig,
    OptimConfig,
    PathsConfig,
    PreemptionConfig,
    PreviewConfig,
    SamplingConfig,
    SaveConfig,
    SpeedConfig,
    TokenDataConfig,
    TokenizerEvaluationConfig,
    TokenizerLossConfig,
    TokenizerOptimConfig,
    TokenizerTrainConfig,
    TokenizerTrainingConfig,
    TrainerConfig,
)
from bar_lightning.models.heads import GENERATOR_HEADS
from bar_lightning.models.sampler import SAMPLING_PRECISIONS


def inductor_options(options: Any) -> dict[str, Any]:
    """Flat Inductor option names: Hydra's `+training.compile_options.triton.cudagraphs=true` nests the dotted name."""
    if options is None:
        return {}
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in dict(options).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in inductor_options(value).items()})
        else:
            flat[key] = value
    return flat


def compiles_with_cuda_graphs(compile_mode: str, compile_options: Any) -> bool:
    """Whether a torch.compile mode / Inductor options replay the compiled code as CUDA graphs."""
    return compile_mode in ("reduce-overhead", "max-autotune") or bool(
        inductor_options(compile_options).get("triton.cudagraphs", False)
    )


def check_compile_options(training: DictConfig) -> None:
    """`training.compile_options` must name real Inductor options and cannot be combined with a compile mode."""
    options = inductor_options(training.compile_options)
    if not options:
        return
    if training.compile_mode not in (None, "default"):
        raise ConfigError(
            f"training.compile_options={options} and training.compile_mode={training.compile_mode!r} are both set; "
            "torch.compile takes one of them: keep compile_mode=default, or drop compile_options"
        )
    import torch._inductor

    known = set(torch._inductor.list_options())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"training.compile_options has unknown Inductor option(s) {unknown}; see torch._inductor.list_options() "
            "for the names (e.g. cpp_wrapper, coordinate_descent_tuning)"
        )


# The signals a run can treat as "save and stop": SLURM sends SIGTERM at the time limit and on preemption,
# `#SBATCH --signal=USR1@<seconds>` sends SIGUSR1 ahead of the limit, and the submitit launcher
# (hydra/launcher=slurm) asks for SIGUSR2 ahead of it.
PREEMPTION_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2,
                      "SIGINT": signal.SIGINT}


def check_preemption(preemption: DictConfig) -> None:
    unknown = sorted(set(preemption.signals) - set(PREEMPTION_SIGNALS))
    if unknown:
        raise ConfigError(f"preemption.signals has unknown signal(s) {unknown}; use some of {sorted(PREEMPTION_SIGNALS)}")
    if preemption.interrupt and "SIGINT" in preemption.signals:
        raise ConfigError("preemption.signals lists SIGINT while preemption.interrupt=true handles it; remove it from "
                          "preemption.signals, or set preemption.interrupt=false to treat it as a preemption signal")
    if not 2 <= preemption.exit_code <= 125:
        raise ConfigError(
            f"preemption.exit_code={preemption.exit_code} must be in 2..125 (0 and 1 mean success and error; "
            "126 and above are reserved by shells)"
        )


def check_preview(merged: DictConfig) -> None:
    """`preview.tokenizer`: at most one source, released weights with their yaml, and only for generator runs."""
    tokenizer = merged.preview.tokenizer
    if not any(tokenizer.values()):
        return
    if merged.task != "generator":
        raise ConfigError(
            f"preview.tokenizer is set for a {merged.task} run; it decodes the generator's training previews: remove "
            "it (a tokenizer run validates its own reconstructions)"
        )
    if tokenizer.checkpoint and tokenizer.upstream_weights:
        raise ConfigError("give one of preview.tokenizer.checkpoint or preview.tokenizer.upstream_weights, not both")
    if tokenizer.upstream_weights and not tokenizer.upstream_config:
        raise ConfigError(
            "preview.tokenizer.upstream_weights needs preview.tokenizer.upstream_config=<the official tokenizer yaml>"
        )
    if tokenizer.upstream_config and not tokenizer.upstream_weights:
        raise ConfigError(
            "preview.tokenizer.upstream_config needs preview.tokenizer.upstream_weights=<the released tokenizer .bin>"
        )


# Loggers whose package is an optional extra: logger class name -> (package to import, how to install it).
OPTIONAL_LOGGER_PACKAGES = {"WandbLogger": ("wandb", "pip install 'bar_lightning[wandb]'")}


def check_loggers(logger: DictConfig) -> None:
    """Every logger's package is installed: a missing optional one (wandb) stops the run before any work."""
    import importlib.util

    for name, entry in logger.items():
        target = entry.get("_target_") if isinstance(entry, DictConfig) else None
        if not target or target.rsplit(".", 1)[-1] not in OPTIONAL_LOGGER_PACKAGES:
            continue
        package, install = OPTIONAL_LOGGER_PACKAGES[target.rsplit(".", 1)[-1]]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logger.{name} ({target}) needs the {package} package, which is not installed: {install} "
                "(or choose another logger: logger=tensorboard, csv, none)"
            )


def check_preview_files(preview: DictConfig) -> None:
    """Every file `preview.tokenizer` names exists: checked when the run starts, not at the first preview."""
    for key in ("checkpoint", "upstream_weights", "upstream_config"):
        value = preview.tokenizer.get(key)
        if value and not Path(value).is_file():
            raise FileNotFoundError(
                f"preview.tokenizer.{key}={value} does not exist: the tokenizer that decodes the training previews "
                "(a tokenizer checkpoint of this project, or released weights with their yaml); fix the path, or "
                "remove preview.tokenizer to preview bit maps"
            )


def check_keyword_arguments(section: str, values: dict[str, Any], target: Any, exclude: tuple[str, ...] = ()) -> None:
    """Every key of `values` must be a keyword argument of `target` (a class or function)."""
    import inspect

    accepted = set(inspect.signature(target).parameters) - set(exclude)
    unknown = sorted(set(values) - accepted)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; accepted: {sorted(accepted)}")


def validate_tokenizer_config(merged: DictConfig) -> None:
    from bar_lightning.models.registry import DISCRIMINATOR_KINDS, TOKENIZER_FAMILIES

    if merged.discriminator is not None and len(merged.discriminator) == 0:
        merged.discriminator = None  # `~discriminator` on the command line removes it
    model = dict(merged.model)
    family = model.pop("family", None)
    if family not in TOKENIZER_FAMILIES:
        raise ConfigError(f"model.family={family!r} is not a tokenizer family; use one of {sorted(TOKENIZER_FAMILIES)}")
    check_keyword_arguments("model", model, TOKENIZER_FAMILIES[family])
    if merged.discriminator is not None:
        discriminator = dict(merged.discriminator)
        kind = discriminator.pop("kind", None)
        if kind not in DISCRIMINATOR_KINDS:
            raise ConfigError(f"discriminator.kind={kind!r} is unknown; use one of {sorted(DISCRIMINATOR_KINDS)}")
        check_keyword_arguments("discriminator", discriminator, DISCRIMINATOR_KINDS[kind])
    training, data = merged.training, merged.data
    if training.gan_weight > 0 and merged.discriminator is None:
        raise ConfigError(f"training.gan_weight={training.gan_weight} needs a discriminator (discriminator=dino|patch)")
    if not 0.0 <= training.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay={training.ema_decay} must be in [0, 1)")
    if training.compile_mode is not None and training.compile_mode not in TRAINING_COMPILE_MODES:
        raise ConfigError(
            f"training.compile_mode={training.compile_mode!r} is not offered for the tokenizer; use null (automatic) "
            f"or one of {TRAINING_COMPILE_MODES}"
        )
    if merged.trainer.gradient_clip_val is not None:
        raise ConfigError(
            "trainer.gradient_clip_val must be null for the tokenizer (manual optimisation clips each optimiser "
            "itself); set training.gradient_clip_val instead"
        )
    if merged.trainer.accumulate_grad_batches != 1:
        # Lightning refuses it at fit start, after the full-size networks are built; say so before any work.
        raise ConfigError(
            f"trainer.accumulate_grad_batches={merged.trainer.accumulate_grad_batches} is not supported for the "
            "tokenizer: it alternates G and D steps with manual optimisation, which Lightning does not accumulate; "
            "keep it at 1 and raise data.batch_size or the number of GPUs for a larger batch"
        )
    if "fsdp" in str(merged.trainer.strategy).lower():
        raise ConfigError(
            "trainer=fsdp is not supported for the tokenizer: it uses manual optimisation with two optimisers, "
            "which Lightning's FSDP strategy does not support; use trainer=ddp"
        )
    if data.source not in IMAGE_DATA_SOURCES:
        raise ConfigError(f"data.source={data.source!r}: use one of {', '.join(IMAGE_DATA_SOURCES)}")
    if data.source == "webdataset" and not data.train_shards:
        raise ConfigError("data.source=webdataset needs data.train_shards=<shard pattern, e.g. /data/train-{000000..000320}.tar>")
    if data.crop_size != merged.model.get("image_size"):
        raise ConfigError(f"data.crop_size={data.crop_size} does not match model.image_size={merged.model.get('image_size')}")
    if merged.evaluation.rfid and not merged.evaluation.inception_weights:
        raise ConfigError("evaluation.rfid=true needs evaluation.inception_weights=<FID Inception weights file>")


def merge_with_schema(cfg: DictConfig, schema: type, *, written_by: str | None = None) -> DictConfig:
    """Merge `cfg` into `schema`; unknown keys, wrong types and keys without a value raise ConfigError with the key
    path. `written_by`: where `cfg` came from when it is not a composed config the user can fix on the command line
    (e.g. a checkpoint's hyper-parameters)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as error:
        # OmegaConf's message names the key and the types; its traceback (merge internals) would bury it.
        raise ConfigError(f"invalid configuration: {error}{closest_key_hint(error, schema)}") from None
    unset = sorted(OmegaConf.missing_keys(merged))
    if unset and written_by is not None:
        raise ConfigError(f"no value for {', '.join(unset)} in {written_by}")
    if unset:
        # The schemas type every key and give no values: conf/ holds each default once, so a key no yaml sets is
        # a config that was assembled without its group (or a value set to ???), not a default to fall back on.
        raise ConfigError(
            f"no value for {', '.join(unset)}: set it on the command line (e.g. {unset[0]}=...) or in the config "
            "group that holds it (conf/, see docs/configuration.md)"
        )
    OmegaConf.set_struct(merged, True)
    return merged


def tags_as_list(cfg: DictConfig) -> DictConfig:
    """`cfg` with `tags` as a list: `tags=foo` on the command line is the one-element list `[foo]`, `tags=null` none.

    Hydra reads `tags=foo` as a string, which the schema's list would refuse with a type error; one tag is what was
    meant. A value that already is a list is left to the schema.
    """
    if "tags" not in cfg or isinstance(cfg.tags, (list, ListConfig)):
        return cfg
    return OmegaConf.merge(cfg, {"tags": [] if cfg.tags is None else [str(cfg.tags)]})


def check_tags(tags: ListConfig) -> None:
    """Tags name a run in its loggers and metrics.json: each one a non-empty string."""
    empty = [index for index, tag in enumerate(tags) if not tag.strip()]
    if empty:
        raise ConfigError(
            f"tags={list(tags)}: tag {empty[0]} is empty; give names, e.g. tags=[baseline,lr-sweep] "
            "(or tags=[] for none)"
        )


# Keys that moved: where their value is set now.
MOVED_KEYS = {
    "sampling.seed": "seed (top level): a run has one seed, recorded in metrics.json under provenance.seed",
}


def closest_key_hint(error: OmegaConfBaseException, schema: type) -> str:
    """For an unknown key, the schema's keys at the same place that are spelt like it ('' when none is)."""
    if not isinstance(error, ConfigKeyError) or not getattr(error, "full_key", None):
        return ""
    if str(error.full_key) in MOVED_KEYS:
        return f"\n    {error.full_key} is set as {MOVED_KEYS[str(error.full_key)]}"
    *parents, key = str(error.full_key).split(".")
    node = OmegaConf.structured(schema)
    for parent in parents:
        node = node.get(parent) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return ""
    matches = difflib.get_close_matches(key, [str(name) for name in node.keys()], n=2, cutoff=0.75)
    if not matches:
        return ""
    prefix = ".".join(parents) + "." if parents else ""
    return "\n    did you mean: " + " or ".join(prefix + match for match in matches) + "?"


def check_sampling(sampling: DictConfig, bits_per_step: int, head: str) -> list[int]:
    """The one check of sampling settings (train.py, evaluate.py): values, then the schedule against the model.

    Returns the tokens allocation a generator with `bits_per_step` bits per AR step samples with.
    """
    check_sampling_values(sampling)
    try:
        return GENERATOR_HEADS[head].sampling_allocation(list(sampling.tokens_allocation), bits_per_step)
    except ValueError as error:
        raise ConfigError(f"sampling.tokens_allocation={list(sampling.tokens_allocation)}: {error}") from error


def check_sampling_values(sampling: DictConfig) -> None:
    """Sampling values that need no model: finite guidance >= 1, finite temperature >= 0, a known precision."""
    guidance, temperature = sampling.guidance_scale, sampling.temperature
    if not math.isfinite(guidance) or guidance < 1:
        raise ConfigError(
            f"sampling.guidance_scale={guidance} must be a finite number >= 1: 1 turns classifier-free guidance off, "
            "larger values strengthen it (BAR guides only above 1, so a smaller value would sample like 1 and be "
            "recorded as if used)"
        )
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(
            f"sampling.temperature={temperature} must be a finite number >= 0 (0 picks the most likely bits)"
        )
    if sampling.precision not in SAMPLING_PRECISIONS:
        raise ConfigError(f"sampling.precision={sampling.precision!r} is unknown; use one of {list(SAMPLING_PRECISIONS)}")


def check_generator_model(model: DictConfig) -> int:
    """Check model sizes; returns the bits per AR step."""
    for key in ("hidden_size", "num_layers", "num_heads", "num_tokens", "bits_per_token", "num_classes",
                "patch_size", "head_width", "head_layers"):
        if model[key] <= 0:
            raise ConfigError(f"model.{key}={model[key]} must be positive")
    if model.head not in GENERATOR_HEADS:
        raise ConfigError(f"model.head={model.head!r} is not a head; use one of {sorted(GENERATOR_HEADS)} ('mbm' is "
                          "the paper's, 'linear' the softmax baseline)")
    if model.hidden_size % model.num_heads or model.num_heads % 2:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} must be divisible by model.num_heads={model.num_heads}, "
            "and num_heads must be even (target-aware RoPE)"
        )
    if (model.hidden_size // model.num_heads) % 4:
        raise ConfigError(f"head size {model.hidden_size // model.num_heads} must be divisible by 4 (2-D RoPE)")
    side = int(round(model.num_tokens**0.5))
    if side * side != model.num_tokens or side % model.patch_size:
        raise ConfigError(
            f"model.num_tokens={model.num_tokens} must be a square grid whose side is divisible by "
            f"model.patch_size={model.patch_size}"
        )
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} must be in [0, 1)")
    bits_per_step = model.bits_per_token * model.patch_size**2
    limit = GENERATOR_HEADS[model.head].max_bits_per_step
    if limit is not None and bits_per_step > limit:
        raise ConfigError(
            f"model.head={model.head} supports at most {limit} bits per AR step, this model has {bits_per_step} "
            f"(2^{bits_per_step} output classes for the linear head); use head=mbm"
        )
    return bits_per_step


def check_num_workers(value: Any) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    raise ConfigError(f"data.num_workers={value!r}: use a count >= 0 (0 loads in the training process) or auto "
                      "(the cores of this machine per training process)")


def check_token_data(data: DictConfig, model: DictConfig) -> None:
    """The generator's `data` values, the one place they are checked (`TokenDataModule` trusts them); the token
    files themselves are checked where they are read (`data/tokens.py`, `TokenDataModule.setup`)."""
    if data.source not in TOKEN_DATA_SOURCES:
        raise ConfigError(f"data.source={data.source!r}: use one of {', '.join(TOKEN_DATA_SOURCES)}")
    if data.source == "pretokenized" and not data.root:
        raise ConfigError("data.source=pretokenized needs data.root=<folder with train/<class>/*.npz>")
    if data.batch_size <= 0:
        raise ConfigError(f"data.batch_size={data.batch_size} must be positive")
    for key, model_key in (("tokens", "num_tokens"), ("bits_per_token", "bits_per_token"), ("num_classes", "num_classes")):
        if data[key] != model[model_key]:
            raise ConfigError(f"data.{key}={data[key]} does not match model.{model_key}={model[model_key]}")
    if data.persistent_workers and data.num_workers == 0:
        raise ConfigError("data.persistent_workers=true needs worker processes: set data.num_workers > 0 (or auto), "
                          "or data.persistent_workers=false")
    if not 0.0 <= data.flip_probability <= 1.0:
        raise ConfigError(f"data.flip_probability={data.flip_probability} must be in [0, 1] (the chance that an "
                          "image is read as its horizontally flipped tokens)")
    if data.seed < 0:
        raise ConfigError(f"data.seed={data.seed} must be >= 0 (it follows the top-level seed unless set)")
    if data.source == "pretokenized":
        if data.val_num_samples:
            raise ConfigError(f"data.val_num_samples={data.val_num_samples} applies only to data.source=synthetic "
                              "(pretokenized data has no validation split here); set it to 0")
        return
    if data.synthetic_num_samples <= 0:
        raise ConfigError(f"data.synthetic_num_samples={data.synthetic_num_samples} must be positive")
    if not 0.0 <= data.synthetic_noise <= 1.0:
        raise ConfigError(f"data.synthetic_noise={data.synthetic_noise} must be in [0, 1] (the chance that a bit "
                          "differs from its class prototype)")
    if data.val_num_samples < 0:
        raise ConfigError(f"data.val_num_samples={data.val_num_samples} must be >= 0 (0: no validation set)")


def validate_train_config(cfg: DictConfig) -> DictConfig:
    """Validate a composed training config before any model or data is built."""
    task = cfg.get("task", None)
    if task not in SCHEMAS:
        raise ConfigError(f"task={task!r} is unknown; use one of {sorted(SCHEMAS)} (set by the experiment)")
    preview = cfg.get("preview")
    preview_tokenizer = preview.get("tokenizer") if isinstance(preview, DictConfig) else None
    if preview_tokenizer is not None and not isinstance(preview_tokenizer, DictConfig):
        # OmegaConf's own message for this names neither the key nor the fix.
        raise ConfigError(
            f"preview.tokenizer={preview_tokenizer} is not a tokenizer source: give "
            "preview.tokenizer.checkpoint=<tokenizer .ckpt of this project>, or preview.tokenizer.upstream_weights="
            "<released .bin> with preview.tokenizer.upstream_config=<its yaml> (the keys of evaluate.py's tokenizer.*)"
        )
    merged = merge_with_schema(tags_as_list(cfg), SCHEMAS[task])
    check_tags(merged.tags)
    check_preemption(merged.preemption)
    check_preview(merged)
    check_loggers(merged.logger)
    check_num_workers(merged.data.get("num_workers"))
    if merged.trainer.max_steps <= 0 and not merged.trainer.fast_dev_run:
        raise ConfigError(
            f"trainer.max_steps={merged.trainer.max_steps} must be a positive number of optimiser steps (runs are "
            "step-based: the learning-rate schedule, optim.total_steps, follows it)"
        )
    if task == "tokenizer":
        validate_tokenizer_config(merged)
        return merged
    bits_per_step = check_generator_model(merged.model)
    check_sampling(merged.sampling, bits_per_step, merged.model.head)
    training, optim = merged.training, merged.optim
    if not 0.0 <= training.class_label_dropout < 1.0:
        raise ConfigError(f"training.class_label_dropout={training.class_label_dropout} must be in [0, 1)")
    if training.compile_mode is not None and training.compile_mode not in TRAINING_COMPILE_MODES:
        raise ConfigError(
            f"training.compile_mode={training.compile_mode!r} is not offered; use null (automatic) or one of "
            f"{TRAINING_COMPILE_MODES}"
        )
    check_compile_options(training)
    explicit_mode = training.compile_mode or "default"
    if merged.trainer.accumulate_grad_batches > 1 and compiles_with_cuda_graphs(explicit_mode, training.compile_options):
        raise ConfigError(
            f"CUDA graphs in the training step (training.compile_mode={training.compile_mode!r}, compile_options="
            f"{inductor_options(training.compile_options)}) cannot accumulate gradients: the next micro-batch's "
            f"replay overwrites them (trainer.accumulate_grad_batches={merged.trainer.accumulate_grad_batches}). "
            "Use training.compile_mode=default, or accumulate_grad_batches=1"
        )
    if training.randomness_anneal_end < training.randomness_anneal_start:
        raise ConfigError(
            f"training.randomness_anneal_end={training.randomness_anneal_end} is before "
            f"randomness_anneal_start={training.randomness_anneal_start}; set both to -1 for raster-only training"
        )
    if optim.warmup_steps < 0 or optim.total_steps <= 0 or optim.learning_rate <= 0:
        raise ConfigError("optim.warmup_steps must be >= 0, optim.total_steps and optim.learning_rate > 0")
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(optim.betas)} must have two values")
    if optim.no_decay_rule not in ("upstream", "none"):
        raise ConfigError(f"optim.no_decay_rule={optim.no_decay_rule!r}: use 'upstream' or 'none'")
    check_token_data(merged.data, merged.model)
    if any(not 0 <= c < merged.model.num_classes for c in training.preview_classes):
        raise ConfigError(
            f"training.preview_classes={list(training.preview_classes)} has a class outside 0..{merged.model.num_classes - 1}"
        )
    return merged


def check_model_sources(merged: DictConfig) -> None:
    """The generator and tokenizer keys of evaluate.py and the sampler page (`ckpt_path` becomes
    `generator.checkpoint`, in place): exactly one generator source, released weights with their yaml."""
    source = merged.generator
    if merged.ckpt_path:
        # train.py's key for a Lightning checkpoint, accepted here too: from now on it is generator.checkpoint.
        if source.checkpoint and Path(source.checkpoint).resolve() != Path(merged.ckpt_path).resolve():
            raise ConfigError(
                f"ckpt_path={merged.ckpt_path} and generator.checkpoint={source.checkpoint} name different "
                "checkpoints; both mean the generator checkpoint: give one of them"
            )
        source.checkpoint = merged.ckpt_path
    if bool(source.checkpoint) == bool(source.upstream_weights):
        raise ConfigError(
            "give exactly one of generator.checkpoint=<this project's .ckpt> (or ckpt_path=) or "
            "generator.upstream_weights=<released .bin> (with generator.upstream_config=<its yaml>)"
        )
    if source.upstream_weights and not source.upstream_config:
        raise ConfigError("generator.upstream_weights needs generator.upstream_config=<the upstream yaml of that model>")
    tokenizer = merged.tokenizer
    if tokenizer.checkpoint and tokenizer.upstream_weights:
        raise ConfigError("give one of tokenizer.checkpoint or tokenizer.upstream_weights, not both")
    if tokenizer.upstream_weights and not tokenizer.upstream_config:
        raise ConfigError("tokenizer.upstream_weights needs tokenizer.upstream_config=<the official tokenizer yaml>")


def validate_evaluate_config(cfg: DictConfig) -> DictConfig:
    merged = merge_with_schema(tags_as_list(cfg), EvaluateConfig)
    check_tags(merged.tags)
    check_model_sources(merged)
    if merged.num_samples_per_class <= 0 or merged.batch_size <= 0:
        raise ConfigError("num_samples_per_class and batch_size must be positive")
    # The model-dependent half (tokens_allocation against the bits per step) runs once the generator is loaded.
    check_sampling_values(merged.sampling)
    if merged.metrics.feature_network not in ("inception", "demo_classifier"):
        raise ConfigError(
            f"metrics.feature_network={merged.metrics.feature_network!r}: use 'inception' or 'demo_classifier'"
        )
    if merged.speed.enabled and (merged.speed.timed_batches <= 0 or merged.speed.warmup_batches < 0):
        raise ConfigError("speed.timed_batches must be > 0 and speed.warmup_batches >= 0")
    return merged


def validate_app_config(cfg: DictConfig) -> DictConfig:
    """The sampler page's config: evaluate.py's source and sampling checks, a tokenizer (the page shows images), the
    server's limits."""
    merged = merge_with_schema(cfg, AppConfig)
    check_model_sources(merged)
    if not (merged.tokenizer.checkpoint or merged.tokenizer.upstream_weights):
        raise ConfigError(
            "the sampler page shows images: give tokenizer.checkpoint=<this project's tokenizer .ckpt> or "
            "tokenizer.upstream_weights=<released .bin> with tokenizer.upstream_config=<its yaml>"
        )
    check_sampling_values(merged.sampling)
    if not 0 <= merged.port <= 65535:
        raise ConfigError(f"port={merged.port} is not a TCP port; use 1..65535, or 0 for any free port")
    if merged.max_images <= 0 or merged.max_grid_columns < 2:
        raise ConfigError(
            f"max_images={merged.max_images} must be >= 1 and max_grid_columns={merged.max_grid_columns} >= 2"
        )
    return merged
