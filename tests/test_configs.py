"""Every experiment composes and validates; bad configs stop before any model is built, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import MISSING as MISSING_VALUE
from omegaconf import DictConfig, open_dict

from bar_lightning.config.schema import ConfigError, validate_train_config
from bar_lightning.config.structured import SCHEMAS, AppConfig, EvaluateConfig
from bar_lightning.models.bar import BARGenerator

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = ["bar_b", "bar_b_patch2", "bar_b_patch4", "bar_l", "bar_l_res512", "tiny_generator", "demo_generator",
               "demo_generator_linear"]


def compose_train(overrides: list[str], output_dir: Path | str = "/tmp/unused") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # outside a Hydra run there is no runtime output dir
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = validate_train_config(compose_train([f"experiment={experiment}"]))
    assert cfg.experiment_name == experiment
    assert cfg.data.tokens == cfg.model.num_tokens and cfg.data.bits_per_token == cfg.model.bits_per_token


# README / upstream values that reproduce the paper's table.
EXPECTED = {
    "bar_b": dict(hidden=768, layers=24, patch=1, g=5.0, T=2.5, alloc=[2, 2, 5, 7], batch=128, steps=250_000),
    "bar_b_patch2": dict(hidden=768, layers=24, patch=2, g=5.5, T=2.0, alloc=[16] * 4, batch=128, steps=250_000),
    "bar_b_patch4": dict(hidden=768, layers=24, patch=4, g=9.6, T=1.4, alloc=[64] * 4, batch=128, steps=250_000),
    "bar_l": dict(hidden=1280, layers=32, patch=1, g=5.3, T=3.0, alloc=[2, 2, 5, 7], batch=64, steps=250_000),
    "bar_l_res512": dict(hidden=1280, layers=32, patch=1, g=4.2, T=2.8, alloc=[2, 2, 2, 4], batch=32, steps=125_000),
}


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_experiments_reproduce_the_upstream_recipes(experiment):
    cfg = validate_train_config(compose_train([f"experiment={experiment}"]))
    want = EXPECTED[experiment]
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.patch_size) == (want["hidden"], want["layers"], want["patch"])
    assert cfg.sampling.guidance_scale == want["g"] and cfg.sampling.temperature == want["T"]
    assert list(cfg.sampling.tokens_allocation) == want["alloc"]
    assert cfg.data.batch_size == want["batch"] and cfg.trainer.max_steps == want["steps"]
    assert cfg.optim.total_steps == want["steps"] and cfg.optim.learning_rate == 4e-4
    assert list(cfg.optim.betas) == [0.9, 0.96] and cfg.optim.weight_decay == 0.03
    assert cfg.training.class_label_dropout == 0.1 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.trainer.precision == "bf16-mixed"


def test_res512_recipe_uses_the_10_bit_tokenizer_layout():
    cfg = validate_train_config(compose_train(["experiment=bar_l_res512"]))
    assert (cfg.model.num_tokens, cfg.model.bits_per_token, cfg.model.dropout) == (1024, 10, 0.2)
    assert (cfg.optim.warmup_steps, cfg.training.randomness_anneal_start, cfg.training.randomness_anneal_end) == (
        31_250, 62_500, 93_750)


def test_bar_b_config_builds_the_415m_model():
    cfg = validate_train_config(compose_train(["experiment=bar_b"]))
    with torch.device("meta"):
        model = BARGenerator(**cfg.model)
    parameters = sum(p.numel() for p in model.parameters()) + model.lm_head.t_embedder.W.numel()
    assert round(parameters / 1e6, 1) == 415.3


def test_debug_overlay_is_tiny_and_deterministic():
    cfg = validate_train_config(compose_train(["experiment=bar_b", "debug=default"]))
    assert cfg.model.hidden_size == 64 and cfg.trainer.accelerator == "cpu" and cfg.trainer.deterministic
    assert cfg.data.source == "synthetic"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.tokens_allocation=[2,2,5,6]", r"sampling\.tokens_allocation.*sums to 15.*16 bits"),
        ("sampling.tokens_allocation=[0,2,7,7]", r"sampling\.tokens_allocation.*non-positive"),
        ("sampling.tokens_allocation=[7,5,2,2]", r"sampling\.tokens_allocation.*non-decreasing"),
        ("+model.hiden_size=3", r"hiden_size(.|\n)*did you mean: model\.hidden_size\?"),
        ("+trainer.max_step=3", r"max_step(.|\n)*did you mean: trainer\.max_steps\?"),
        ("+optim.learnig_rate=1e-4", r"learnig_rate(.|\n)*did you mean: optim\.learning_rate\?"),
        ("+colour=3", r"Key 'colour' not in(?!(.|\n)*did you mean)"),
        ("model.hidden_size=big", r"hidden_size"),
        ("model.head=softmax", r"model\.head='softmax'"),
        ("model.num_heads=5", r"num_heads=5"),
        ("data.source=imagenet", r"data\.source='imagenet'"),
        ("training.randomness_anneal_end=10", r"randomness_anneal_end=10"),
        ("training.compile_mode=fastest", r"training\.compile_mode='fastest' is not offered"),
        ("+training.compile_options.cpp_wraper=true", r"unknown Inductor option\(s\) \['cpp_wraper'\]"),
    ],
)
def test_invalid_configs_name_the_key(override, message):
    cfg = compose_train(["experiment=bar_b", override])
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


def test_compile_options_are_flattened_and_exclude_a_compile_mode():
    from bar_lightning.config.schema import compiles_with_cuda_graphs, inductor_options

    cfg = validate_train_config(compose_train(
        ["experiment=bar_b", "+training.compile_options.triton.cudagraphs=true",
         "+training.compile_options.coordinate_descent_tuning=true"]
    ))
    options = inductor_options(cfg.training.compile_options)
    assert options == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    assert compiles_with_cuda_graphs("default", options) and compiles_with_cuda_graphs("reduce-overhead", {})
    assert not compiles_with_cuda_graphs("default", {"coordinate_descent_tuning": True})
    # CUDA graphs would overwrite accumulated gradients (seen on an H200: "accessing tensor output of CUDAGraphs
    # that has been overwritten by a subsequent run").
    for graphs in ("training.compile_mode=reduce-overhead", "+training.compile_options.triton.cudagraphs=true"):
        with pytest.raises(ConfigError, match=r"cannot accumulate gradients.*accumulate_grad_batches=2"):
            validate_train_config(compose_train(["experiment=bar_b", graphs, "trainer.accumulate_grad_batches=2"]))
    with pytest.raises(ConfigError, match=r"compile_mode='reduce-overhead' are both set"):
        validate_train_config(compose_train(
            ["experiment=bar_b", "training.compile_mode=reduce-overhead", "+training.compile_options.cpp_wrapper=true"]
        ))


def test_linear_head_config_switch_keeps_the_backbone():
    cfg = validate_train_config(compose_train(["experiment=tiny_generator", "model.head=linear"]))
    with torch.device("meta"):
        model = BARGenerator(**cfg.model)
    assert type(model.lm_head).__name__ == "LinearSoftmaxHead"
    with pytest.raises(ConfigError, match="2\\^64"):
        validate_train_config(compose_train(["experiment=bar_b_patch2", "model.head=linear"]))


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_trainer_configs_compose_and_strategies_instantiate(trainer):
    import hydra

    cfg = validate_train_config(compose_train(["experiment=bar_b", f"trainer={trainer}"]))
    if trainer == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from bar_lightning.models.bar_blocks import Block

        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy)
        assert Block in strategy.kwargs["auto_wrap_policy"]._module_classes
    elif trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1
    assert cfg.trainer.precision == ("32-true" if trainer == "cpu" else "bf16-mixed")


def test_demo_tokenizer_composes_and_matches_the_demo_generator():
    tokenizer = validate_train_config(compose_train(["experiment=demo_tokenizer"]))
    generator = validate_train_config(compose_train(["experiment=demo_generator"]))
    side = tokenizer.model.image_size // (tokenizer.model.patch_size * 2 ** (len(tokenizer.model.channel_multipliers) - 1))
    assert side * side == generator.model.num_tokens
    assert tokenizer.model.bits_per_token == generator.model.bits_per_token
    assert tokenizer.discriminator is None and tokenizer.training.gan_weight == 0.0


@pytest.mark.parametrize(
    "experiment", ["demo_generator", "demo_tokenizer", "tiny_generator", "tiny_tokenizer"]
)
def test_cpu_experiments_run_with_deterministic_algorithms(experiment):
    # The CPU backward of the position-table lookups otherwise adds in a thread-dependent order (the demo drifted).
    cfg = validate_train_config(compose_train([f"experiment={experiment}"]))
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.deterministic is True


def test_cpu_trainers_are_deterministic_and_the_gpu_trainer_is_not():
    def deterministic(trainer: str) -> bool:
        return validate_train_config(compose_train(["experiment=bar_b", f"trainer={trainer}"])).trainer.deterministic

    assert (deterministic("cpu"), deterministic("ddp_cpu"), deterministic("gpu")) == (True, True, False)


def schema_leaves_with_values(schema: type, prefix: str = "") -> list[str]:
    """Keys of `schema` (nested dataclasses followed) that carry a value of their own instead of MISSING."""
    found = []
    for item in dataclasses.fields(schema):
        if dataclasses.is_dataclass(item.type if isinstance(item.type, type) else None):
            found += schema_leaves_with_values(item.type, f"{prefix}{item.name}.")
            continue
        nested = item.default_factory() if item.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            found += schema_leaves_with_values(type(nested), f"{prefix}{item.name}.")
        elif item.default is not MISSING_VALUE or item.default_factory is not dataclasses.MISSING:
            found.append(prefix + item.name)
    return found


@pytest.mark.parametrize("schema", [*SCHEMAS.values(), EvaluateConfig, AppConfig], ids=lambda schema: schema.__name__)
def test_defaults_live_once_in_the_yaml_not_in_the_schemas(schema):
    assert schema_leaves_with_values(schema) == []


def test_a_key_no_yaml_sets_stops_the_run_naming_it():
    cfg = compose_train(["experiment=tiny_generator"])
    with open_dict(cfg):
        del cfg.trainer["log_every_n_steps"]
        del cfg.sampling["precision"]
    with pytest.raises(ConfigError, match=r"no value for sampling\.precision, trainer\.log_every_n_steps: set it on the "
                                          r"command line \(e\.g\. sampling\.precision=\.\.\.\)"):
        validate_train_config(cfg)


def test_every_task_and_data_source_the_schema_accepts_has_a_builder():
    from bar_lightning.config.structured import IMAGE_DATA_SOURCES
    from bar_lightning.run import IMAGE_DATA_MODULES, TRAINING_JOBS

    assert set(TRAINING_JOBS) == set(SCHEMAS)
    assert set(IMAGE_DATA_MODULES) == set(IMAGE_DATA_SOURCES)
    with pytest.raises(ConfigError, match=r"data\.source='tfrecord': use one of synthetic, pretokenized"):
        validate_train_config(compose_train(["experiment=tiny_generator", "data.source=tfrecord"]))
