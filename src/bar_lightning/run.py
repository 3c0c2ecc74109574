"""What train.py does once the config is composed: validate, instantiate, fit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from bar_lightning.config.derive import command_line_overrides, derive_generator_settings
from bar_lightning.config.history import record_config
from bar_lightning.config.printing import print_config_tree
from bar_lightning.config.schema import ConfigError, check_preview_files, validate_train_config
from bar_lightning.console import quiet_known_noise
from bar_lightning.io import available_cpus, default_num_workers, remove_stale_temporaries
from bar_lightning.lightning.callbacks import GlobalBatchMonitor, RunProvenanceLog
from bar_lightning.lightning.checkpointing import (
    CHECKPOINT_KINDS,
    LAST_CHECKPOINT_NAME,
    AtomicCheckpointIO,
    CheckpointKindError,
    CheckpointReadError,
    FinalCheckpoint,
    RunIdentity,
    check_nothing_is_overwritten,
    checkpoint_to_resume,
    inspect_checkpoint,
    scan_checkpoints,
)
from bar_lightning.lightning.generator_module import GeneratorModule
from bar_lightning.lightning.image_datamodule import (
    ImageDataModule,
    SyntheticImageDataModule,
    check_shard_sources,
)
from bar_lightning.lightning.preemption import DEFAULT_PREEMPTION_EXIT_CODE, Preempted, PreemptionCheckpoint
from bar_lightning.lightning.random_state import RandomStateCheckpoint
from bar_lightning.lightning.strategies import strategy_for_task
from bar_lightning.lightning.token_datamodule import TokenDataModule
from bar_lightning.lightning.tokenizer_module import TokenizerModule
from bar_lightning.run_lock import run_lock

log = logging.getLogger(__name__)


def _instantiate_all(section: DictConfig | dict | None) -> list[Any]:
    """Instantiate every `_target_` entry of a name -> config mapping (callbacks, loggers)."""
    if not section:
        return []
    return [hydra.utils.instantiate(entry) for entry in section.values() if entry and "_target_" in entry]


def checkpoint_folder(cfg: DictConfig) -> Path:
    """`<run dir>/checkpoints`: where this run's checkpoints (and its preemption checkpoint) are written."""
    return Path(cfg.paths.output_dir) / "checkpoints"


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """The Trainer of `cfg`, with the reliability pieces every run gets.

    Checkpoints are written atomically and read without running code (`AtomicCheckpointIO`), carry the global
    random states of every rank (`RandomStateCheckpoint`, which also gives each rank its own streams), `last.ckpt`
    holds the final step when training ends (`FinalCheckpoint`), the effective global batch and the sample
    throughput are logged (`GlobalBatchMonitor`), the resolved config and the git commit go to every logger
    (`RunProvenanceLog`), and a preemption signal saves `last.ckpt` at the next step boundary
    (`PreemptionCheckpoint`, last in the list so every other callback has finished the step).
    """
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # Each a name ("ddp", "simple") or a config with _target_ (trainer=fsdp, debug=profiler).
    for key in ("strategy", "profiler"):
        if isinstance(trainer_kwargs.get(key), dict):
            trainer_kwargs[key] = hydra.utils.instantiate(cfg.trainer[key])
    trainer_kwargs["strategy"] = strategy_for_task(trainer_kwargs.get("strategy", "auto"), cfg.task)
    trainer_kwargs.update(overrides)
    callbacks = _instantiate_all(cfg.callbacks)
    if trainer_kwargs.get("fast_dev_run"):
        # A dry run writes no checkpoint (Lightning's ModelCheckpoint would still save last.ckpt at the end).
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = [callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)]
        trainer_kwargs["enable_checkpointing"] = False
    if not trainer_kwargs.get("enable_progress_bar", True):
        # `trainer.enable_progress_bar=false` alone should be enough to silence the bar.
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    loggers = _instantiate_all(cfg.logger)
    if not loggers:
        # logger=none: Lightning's LearningRateMonitor refuses a trainer without a logger; there is nothing to log to.
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    else:
        callbacks.append(RunProvenanceLog(OmegaConf.to_container(cfg, resolve=True)))
    callbacks.append(RandomStateCheckpoint(seed=cfg.seed))
    callbacks.append(RunIdentity(run_identity(cfg)))
    callbacks.append(GlobalBatchMonitor(per_process_batch_size=cfg.data.batch_size))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if trainer_kwargs.get("enable_checkpointing", True) and not trainer_kwargs.get("fast_dev_run"):
        callbacks.append(FinalCheckpoint(checkpoint_folder(cfg) / LAST_CHECKPOINT_NAME))
    preemption = cfg.get("preemption")
    if preemption is not None and preemption.enabled:
        callbacks.append(PreemptionCheckpoint(
            checkpoint_path=checkpoint_folder(cfg) / LAST_CHECKPOINT_NAME, signals=list(preemption.signals),
            exit_code=preemption.exit_code, requeue=preemption.requeue, interrupt=preemption.interrupt,
        ))
        if SLURMEnvironment.detect():
            # Lightning's own SLURM handler saves inside the signal handler and requeues from there; ours saves at
            # the next step boundary instead, so Lightning's is switched off.
            plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=cfg.paths.output_dir,
        plugins=plugins,
        **trainer_kwargs,
    )


def build_generator_job(cfg: DictConfig, *, resuming: bool = False) -> tuple[GeneratorModule, TokenDataModule]:
    """The generator and its bit-token data (`data.source`: synthetic or pretokenized, both TokenDataModule).

    `resuming` is the builders' common signature (`TRAINING_JOBS`); a fresh generator run loads nothing extra.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = GeneratorModule(
        model=plain["model"], optim=plain["optim"], training=plain["training"], sampling=plain["sampling"],
        tags=plain["tags"],
    )
    datamodule = TokenDataModule(**plain["data"])
    return module, datamodule


def synthetic_image_data(data: dict[str, Any]) -> SyntheticImageDataModule:
    """`data.source=synthetic` of a tokenizer run: seeded random images of the crop size."""
    return SyntheticImageDataModule(
        image_size=data["crop_size"], batch_size=data["batch_size"], num_samples=data["synthetic_num_samples"],
        val_num_samples=data["synthetic_val_num_samples"], seed=data["seed"], num_workers=data["num_workers"],
        pin_memory=data["pin_memory"], persistent_workers=data["persistent_workers"],
    )


def webdataset_image_data(data: dict[str, Any]) -> ImageDataModule:
    """`data.source=webdataset` of a tokenizer run: the shards, checked before any data is read (a wrong path fails
    naming its key)."""
    check_shard_sources(train_shards=data["train_shards"], eval_shards=data["eval_shards"])
    unused = ("source", "synthetic_num_samples", "synthetic_val_num_samples")
    return ImageDataModule(**{key: value for key, value in data.items() if key not in unused})


# The image DataModule of each `data.source` of a tokenizer run (config/structured.py's IMAGE_DATA_SOURCES).
IMAGE_DATA_MODULES: dict[str, Callable[[dict[str, Any]], L.LightningDataModule]] = {
    "synthetic": synthetic_image_data,
    "webdataset": webdataset_image_data,
}


def build_tokenizer_job(cfg: DictConfig, *, resuming: bool = False) -> tuple[TokenizerModule, L.LightningDataModule]:
    """The tokenizer (its encoder initialised from `training.encoder_init_weights` unless `resuming`) and its image
    data (`IMAGE_DATA_MODULES`)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    encoder_init = plain["training"].get("encoder_init_weights")
    if encoder_init and not Path(encoder_init).is_file():
        raise FileNotFoundError(
            f"training.encoder_init_weights={encoder_init} not found: the SigLIP2 checkpoint that initialises the "
            "tokenizer encoder (a local copy of google/siglip2-so400m-patch16-naflex); set it to null to start from "
            "random weights"
        )
    # Building the module checks every pretrained file the losses and the discriminator need, before any data.
    module = TokenizerModule(
        model=plain["model"], loss=plain["loss"], discriminator=plain["discriminator"], optim=plain["optim"],
        training=plain["training"], evaluation=plain["evaluation"], tags=plain["tags"],
    )
    datamodule = IMAGE_DATA_MODULES[plain["data"]["source"]](plain["data"])  # shard paths checked before the load
    if encoder_init and not resuming:
        initialise_encoder(module, encoder_init)
    return module, datamodule


def initialise_encoder(module: TokenizerModule, weights: str) -> None:
    """Load SigLIP2 weights into both encoder branches (fresh runs only; a resumed run has its own)."""
    encoder = getattr(module.tokenizer, "encoder", None)
    if encoder is None or not hasattr(encoder, "load_siglip2_vision"):
        raise ValueError("training.encoder_init_weights is only meaningful for model.family=bar_fsq with an encoder")
    encoder.load_siglip2_vision(weights)
    if module.ema is not None:
        module.ema.averaged.load_state_dict(module.tokenizer.state_dict())
    log.info("initialised the tokenizer encoder from %s", weights)


# What train.py builds for each `task` (the schemas of config/structured.py name the same tasks).
TRAINING_JOBS: dict[str, Callable[..., tuple[L.LightningModule, L.LightningDataModule]]] = {
    "generator": build_generator_job,
    "tokenizer": build_tokenizer_job,
}


def resolve_num_workers(cfg: DictConfig) -> None:
    """`data.num_workers=auto`: the data-loading processes this machine affords each training process."""
    if cfg.data.get("num_workers") != "auto":
        return
    processes = local_processes(cfg.trainer)
    cfg.data.num_workers = default_num_workers(processes)
    if cfg.data.num_workers == 0 and cfg.data.get("persistent_workers"):
        cfg.data.persistent_workers = False  # nothing to keep alive without worker processes
    log.info("data.num_workers=auto -> %d (%d CPU cores for %d training process(es) on this machine)",
             cfg.data.num_workers, available_cpus(), processes)


def local_processes(trainer: DictConfig) -> int:
    """Training processes on this machine: `trainer.devices` when it is a count or a list, else one per GPU."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    if hasattr(devices, "__len__") and not isinstance(devices, str):
        return max(1, len(devices))
    if trainer.get("accelerator") != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def model_parameter_count(model: DictConfig) -> int:
    """Parameters of the generator `model` describes, counted on the meta device (nothing is allocated)."""
    from bar_lightning.models.bar import BARGenerator

    with torch.device("meta"):
        generator = BARGenerator(**OmegaConf.to_container(model, resolve=True))
    return sum(parameter.numel() for parameter in generator.parameters())


# A generator above this many parameters takes minutes per step on a CPU: refused there unless asked for.
CPU_PARAMETER_LIMIT = 50_000_000


def check_model_fits_the_machine(cfg: DictConfig) -> None:
    """Refuse a full-size generator on a CPU-only run (plain `python train.py` composes BAR-B) unless asked."""
    if cfg.task != "generator" or cfg.get("allow_large_model_on_cpu"):
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or cfg.trainer.get("fast_dev_run"):
        return
    parameters = model_parameter_count(cfg.model)
    if parameters > CPU_PARAMETER_LIMIT:
        raise ConfigError(
            f"this generator (experiment_name={cfg.get('experiment_name')}) has {parameters / 1e6:.0f}M parameters "
            "and would train on the CPU, minutes per step: on GPUs add trainer=gpu (or trainer=ddp); to try things "
            "here use experiment=tiny_generator (seconds) or `make demo`; allow_large_model_on_cpu=true runs it anyway"
        )


def run_identity(cfg: DictConfig) -> dict[str, Any] | None:
    """What makes a run this run and no other: its task, seed and model (not its schedule, devices or paths).

    Stamped into every checkpoint (`RunIdentity`): a checkpoint whose identity differs was written by another run.
    """
    if cfg.get("model") is None:
        return None
    model = OmegaConf.to_container(cfg.model, resolve=True) if isinstance(cfg.model, DictConfig) else cfg.model
    return {"task": cfg.get("task"), "seed": cfg.get("seed"), "model": model}


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint this run resumes from: the user's `ckpt_path`, else the most advanced one this run wrote.

    Only two sources are ever loaded: the file the user named, and the checkpoints in this run directory's own
    `checkpoints/` folder written by this run (same identity: task, seed, model). Among those the highest
    `global_step` wins, `last.ckpt` on a tie; a truncated or corrupt file is reported by name and skipped. All are
    read with `weights_only=True` (again without running code). The run refuses to start where it would overwrite
    another run's checkpoints or a later step of its own.
    """
    scan = scan_checkpoints(checkpoint_folder(cfg), run_identity(cfg))
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        try:
            named = inspect_checkpoint(cfg.ckpt_path)
        except CheckpointReadError as error:
            raise CheckpointReadError(f"ckpt_path: {error}") from error
        task = cfg.get("task")
        if task in CHECKPOINT_KINDS and named.kind not in (task, "unknown"):
            raise CheckpointKindError(
                f"ckpt_path={cfg.ckpt_path} is {CHECKPOINT_KINDS[named.kind]}, but this is a {task} run (task={task}); "
                f"resume it from a {task} checkpoint"
            )
        check_nothing_is_overwritten(scan, start_step=named.global_step, start=f"ckpt_path={cfg.ckpt_path}")
        log.info("Resuming from %s at step %d (ckpt_path)", cfg.ckpt_path, named.global_step)
        return str(cfg.ckpt_path)
    chosen = checkpoint_to_resume(scan)
    check_nothing_is_overwritten(
        scan, start_step=chosen.global_step if chosen is not None else 0,
        start=f"resuming from {chosen.path.name}" if chosen is not None else "a fresh start",
    )
    if chosen is not None:
        log.info("Resuming from %s at step %d (the most advanced checkpoint of this run)", chosen.path,
                 chosen.global_step)
        return str(chosen.path)
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate `cfg`, build the job it describes and fit it; returns the final logged metrics.

    The run directory is held by this process for the whole run (`run.lock`): a second train.py started in it stops
    at once naming this one. Temporary files left by a killed save are removed first.
    """
    quiet_known_noise()
    cfg = validate_train_config(derive_generator_settings(cfg, command_line_overrides()))
    check_model_fits_the_machine(cfg)
    check_preview_files(cfg.preview)
    if cfg.print_config:
        print_config_tree(cfg)
    output_dir = Path(cfg.paths.output_dir).resolve()
    log.info("Output dir: %s", output_dir)
    try:
        with run_lock(cfg.paths.output_dir, purpose="train.py") as lock:
            if lock is not None:
                for folder in (Path(cfg.paths.output_dir), checkpoint_folder(cfg)):
                    remove_stale_temporaries(folder)
            return _fit(cfg)
    finally:
        log.info("Output dir: %s", output_dir)


def _fit(cfg: DictConfig) -> dict[str, float]:
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    ckpt_path = resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    resolve_num_workers(cfg)
    module, datamodule = TRAINING_JOBS[cfg.task](cfg, resuming=ckpt_path is not None)
    trainer = build_trainer(cfg)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    # Every process of a multi-process run composes the same config into the same run directory; one writes it.
    # (The rank is known here: from LOCAL_RANK in the processes Lightning starts, from SLURM or torchrun otherwise.)
    if trainer.is_global_zero:
        # config.yaml keeps the run's first config; a resumed attempt's changes go to config_history.yaml.
        resumed_step = inspect_checkpoint(ckpt_path).global_step if ckpt_path is not None else None
        record_config(cfg, cfg.paths.output_dir, resumed_step=resumed_step)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as error:
        # Lightning's own SIGTERM path (a signal before our handlers are installed, i.e. before training starts)
        # exits with status 0; report it as a preemption so schedulers and wrappers do not take it for success.
        exit_code = cfg.preemption.exit_code if cfg.get("preemption") is not None else DEFAULT_PREEMPTION_EXIT_CODE
        raise Preempted(exit_code) from error
    return {key: float(value) for key, value in trainer.callback_metrics.items()}
