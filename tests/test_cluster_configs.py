"""Cluster launch configs (no SLURM here): the submitit launchers compose, their sizes follow the trainer, and the
preemption signal submitit sends is one the training run handles."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bar_lightning.config.schema import ConfigError, validate_train_config
from bar_lightning.lightning.strategies import TOKENIZER_DDP_STRATEGY, strategy_for_task

ROOT = Path(__file__).resolve().parents[1]


def compose_with_hydra(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_runs_one_task_per_gpu_on_every_node_of_the_trainer():
    # docs/cluster.md: bar_b on 2 nodes x 8 GPUs, global batch 128 x 8 x 2 = 2048.
    cfg = compose_with_hydra("train", ["hydra/launcher=slurm", "experiment=bar_b", "trainer=ddp",
                                       "trainer.devices=8", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 2048
    submitit_launcher = hydra.utils.instantiate(launcher)
    assert submitit_launcher.params["tasks_per_node"] == 8 and submitit_launcher.params["nodes"] == 2
    # A sweep's run directory is resolved once, at submission: every task and every requeue of a job shares it.
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def test_submitit_preemption_signal_is_handled_by_training():
    from submitit.core.job_environment import JobEnvironment

    cfg = validate_train_config(_without_hydra(compose_with_hydra("train", ["experiment=tiny_generator"])))
    assert f"SIG{JobEnvironment.USR_SIG}" in cfg.preemption.signals  # submitit sends SIGUSR2 by default
    launcher = compose_with_hydra("train", ["hydra/launcher=slurm", "experiment=tiny_generator"]).hydra.launcher
    assert launcher.signal_delay_s >= 120 and launcher.max_num_timeout > 0


def test_evaluation_sweep_launcher_runs_each_point_on_one_gpu():
    cfg = compose_with_hydra("evaluate", ["hydra/launcher=slurm_evaluate", "+sweep=guidance",
                                          "generator.checkpoint=x.ckpt"])
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert cfg.hydra.sweeper.params  # the guidance sweep's points become one array job each


def test_ddp_strategy_searches_unused_parameters_for_the_tokenizer_only():
    assert strategy_for_task("ddp", "tokenizer") == TOKENIZER_DDP_STRATEGY == "ddp_find_unused_parameters_true"
    assert strategy_for_task("ddp", "generator") == "ddp"
    assert strategy_for_task("auto", "tokenizer") == "auto"


def test_fsdp_for_the_tokenizer_is_refused_with_the_fix():
    cfg = _without_hydra(compose_with_hydra("train", ["experiment=tiny_tokenizer", "trainer=fsdp"]))
    with pytest.raises(ConfigError, match="manual optimisation.*use trainer=ddp"):
        validate_train_config(cfg)


def _without_hydra(cfg):
    """What the task function receives: the composed config without the `hydra` node (and, outside a Hydra run, an
    explicit output directory)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del cfg["hydra"]
    cfg.paths.output_dir = "/tmp/unused"
    return cfg
