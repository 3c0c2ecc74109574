"""Callbacks used by the training configs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies import FSDPStrategy

from bar_lightning.console import format_learning_rate, is_learning_rate_metric
from bar_lightning.lightning.step_logging import log_number

log = logging.getLogger(__name__)


@contextlib.contextmanager
def full_weights(trainer: L.Trainer, module: torch.nn.Module) -> Iterator[None]:
    """Run `module` with its full weights under FSDP; nothing to do under other strategies. Every rank must enter.

    Sampling calls the blocks' decode methods, which FSDP does not intercept, and calls their `forward` too, after
    which an FSDP unit reshards itself. So every rank gathers the full weights (`summon_full_params`, a collective)
    and, while they are gathered, the units are swapped for the modules they wrap; the weights are not written back.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        units = [
            (parent, name, child)
            for parent in module.modules()
            for name, child in parent.named_children()
            if isinstance(child, FullyShardedDataParallel)
        ]
        for parent, name, child in units:
            setattr(parent, name, child.module)
        try:
            yield
        finally:
            for parent, name, child in reversed(units):
                setattr(parent, name, child)


def log_image_grid(trainer: L.Trainer, tag: str, grid: torch.Tensor, step: int) -> None:
    """Log a `[3, H, W]` uint8 image grid to every logger of `trainer` that takes images.

    TensorBoard through its writer's `add_image`, wandb through `WandbLogger.log_image` (a `wandb.Image`); loggers
    without images (CSV) are skipped. uint8, because wandb reads tensors as 0..255 and TensorBoard takes either.
    """
    from lightning.pytorch.loggers import WandbLogger  # importable without wandb installed

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[grid], step=step)
            continue
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid, global_step=step)


def to_uint8_grid(tiles: torch.Tensor, nrow: int, pad_value: float) -> torch.Tensor:
    """`[B, C, H, W]` tiles in [0, 1] -> one `[3, H', W']` uint8 grid (`torchvision.utils.make_grid`), on the CPU."""
    grid = torchvision.utils.make_grid(tiles.detach().float().cpu(), nrow=nrow, pad_value=pad_value)
    return (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def check_preview_tokenizer_fits(generator: torch.nn.Module, tokenizer: torch.nn.Module) -> None:
    """The preview tokenizer must decode the generator's tokens: same token count and bits per token."""
    if generator.num_tokens != tokenizer.num_tokens or generator.bits_per_token != tokenizer.bits_per_token:
        raise ValueError(
            f"preview.tokenizer decodes {tokenizer.num_tokens} tokens of {tokenizer.bits_per_token} bits but this "
            f"generator makes {generator.num_tokens} tokens of {generator.bits_per_token} bits: give the tokenizer "
            "the training tokens were made with, or leave preview.tokenizer unset for bit maps"
        )


class GeneratorPreview(L.Callback):
    """Every `every_n_steps` steps, sample one image's bits per class in `classes` and log them.

    With a `tokenizer` source (`preview.tokenizer`: `checkpoint`, or `upstream_weights` with `upstream_config`, the
    keys evaluate.py's `tokenizer.*` takes) the bits are decoded and logged as an image grid (`preview/images`, one
    tile per class); without one they are logged as a grid of bit maps (`preview/bits`: one row of tokens per grid
    row, bits side by side). Both go to every logger that takes images (`log_image_grid`), and the bits' mean as a
    scalar. The tokenizer is read and checked against the generator when fitting starts, on global rank 0 (the rank
    that previews), so a wrong file stops the run before training; it moves to the module's device on the first
    preview. It is held by this callback, not the module: it is in no checkpoint, and it is never trained (eval mode,
    no gradients).
    """

    def __init__(
        self, every_n_steps: int, classes: list[int], seed: int = 1234, tokenizer: Mapping[str, Any] | None = None
    ) -> None:
        self.every_n_steps = every_n_steps
        self.classes = list(classes)
        self.seed = seed
        self.tokenizer_source = dict(tokenizer) if tokenizer and any(dict(tokenizer).values()) else None
        self.tokenizer: torch.nn.Module | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.tokenizer_source is None or self.tokenizer is not None or not trainer.is_global_zero:
            return
        from omegaconf import OmegaConf

        from bar_lightning.lightning.model_sources import load_tokenizer_from_source

        tokenizer = load_tokenizer_from_source(OmegaConf.create(self.tokenizer_source), decode_only=True,
                                               key_prefix="preview.tokenizer")
        check_preview_tokenizer_fits(pl_module.generator, tokenizer)
        self.tokenizer = tokenizer.requires_grad_(False).eval()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps:
            return
        # Under FSDP every rank gathers the full weights (a collective), then rank 0 samples with them.
        with full_weights(trainer, pl_module.generator):
            if not trainer.is_global_zero:
                return
            # Sampling uses its own generator so previews never disturb the training random stream.
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            labels = torch.tensor(self.classes, device=pl_module.device)
            was_training = pl_module.training
            pl_module.eval()
            bits = pl_module.sample(labels, generator=generator)  # [B, L0 * Cb]
            pl_module.train(was_training)
        pl_module.log("preview/bit_mean", bits.float().mean(), rank_zero_only=True)
        nrow = min(len(self.classes), 5)
        if self.tokenizer is not None:
            log_image_grid(trainer, "preview/images", to_uint8_grid(self.decode(bits), nrow, pad_value=1.0), step)
            return
        model = pl_module.generator
        side = model.latent_height
        tiles = bits.reshape(len(self.classes), side, side * model.bits_per_token).float()  # [B, H, W*Cb]
        log_image_grid(trainer, "preview/bits", to_uint8_grid(tiles.unsqueeze(1), nrow, pad_value=0.5), step)

    @torch.no_grad()
    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits `[B, L0 * Cb]` -> images `[B, 3, H, W]` in [0, 1], decoded on the bits' device."""
        if next(self.tokenizer.parameters()).device != bits.device:
            self.tokenizer.to(bits.device)
        images = self.tokenizer.decode_bits(bits)  # [-1, 1], unclamped
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class BatchKeyLog(L.Callback):
    """Appends the sample keys of every training batch to a JSON-lines file: `{"step": s, "keys": [...]}`.

    An audit of which data each optimiser step saw (e.g. to check that a resumed run continued exactly where the
    interrupted one stopped). `step` is the global step the batch is trained in, counted from 0. Under DDP each rank
    writes `<path stem>.rank<r><suffix>`. Lines are flushed one by one, so a killed run keeps every line it wrote.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"])}) + "\n")


class GlobalBatchMonitor(L.Callback):
    """The effective global batch, logged once when training starts, and the global sample throughput.

    The global batch is `per_process_batch_size x world_size x accumulate_grad_batches`: the samples behind one
    optimiser step. It is logged as hyper-parameters (`global_batch_size`, `world_size`, `per_process_batch_size`,
    `accumulate_grad_batches`) and in the log. Every `log_every_n_steps` optimiser steps, `train/samples_seen`
    (global_step x global batch) and `train/samples_per_second` (global samples per second of rank 0's wall clock
    since the previous log; ranks step in lockstep under DDP) are logged. The learning-rate schedule counts
    optimiser steps, so it does not depend on the world size; only the samples per step do.
    """

    def __init__(self, per_process_batch_size: int) -> None:
        if per_process_batch_size <= 0:
            raise ValueError(f"per_process_batch_size={per_process_batch_size} must be positive")
        self.per_process_batch_size = per_process_batch_size
        self.global_batch_size = per_process_batch_size
        self._last_step = 0
        self._last_time = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.global_batch_size = self.per_process_batch_size * trainer.world_size * trainer.accumulate_grad_batches
        scale = {
            "global_batch_size": self.global_batch_size,
            "per_process_batch_size": self.per_process_batch_size,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }
        if trainer.is_global_zero:
            log.info(
                "global batch %d = data.batch_size %d x %d processes x trainer.accumulate_grad_batches %d",
                self.global_batch_size, self.per_process_batch_size, trainer.world_size,
                trainer.accumulate_grad_batches,
            )
        for logger in trainer.loggers:  # loggers write on global rank 0 only
            logger.log_hyperparams(scale)
        self._last_step, self._last_time = trainer.global_step, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % max(1, trainer.log_every_n_steps):
            return
        now = time.perf_counter()
        samples = (step - self._last_step) * self.global_batch_size
        log_number(pl_module, "train/samples_seen", step * self.global_batch_size, rank_zero_only=True)
        log_number(pl_module, "train/samples_per_second", samples / max(now - self._last_time, 1e-9),
                   rank_zero_only=True)
        self._last_step, self._last_time = step, now


class RunProvenanceLog(L.Callback):
    """What made this run, logged once to every logger when training starts: the resolved config and the code.

    `config` (the validated, resolved config) and `code` (`provenance.code_version()`: package version, git commit,
    whether tracked files were modified; the record metrics.json and metadata.json carry) go in as hyper-parameters:
    wandb's run config, TensorBoard's hparams, the CSV logger's hparams.yaml. TensorBoard also gets both as text
    (`run/config`, `run/code`), readable where its hparams table flattens a config into hundreds of columns.
    Global rank 0 only (loggers write there; the git query is not repeated on every rank).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        from omegaconf import OmegaConf

        from bar_lightning.provenance import code_version

        code = code_version()
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config, "code": code})
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard; indented lines are a code block in its Markdown
                for tag, record in (("run/config", self.config), ("run/code", code)):
                    text = OmegaConf.to_yaml(OmegaConf.create(record))
                    experiment.add_text(tag, "\n".join("    " + line for line in text.splitlines()),
                                        global_step=trainer.global_step)


# The training values the progress bar and the plain progress lines show, read from `trainer.callback_metrics`.
# The modules log them without `prog_bar=True`: Lightning converts every progress-bar value of a step to a Python
# number at the end of that step (`.item()`, a host-device wait per step), with or without a bar.
SHOWN_TRAINING_LOSSES = ("train/loss", "train/d_loss")
SHOWN_TRAINING_METRICS = (*SHOWN_TRAINING_LOSSES, "train/lr")


def shown_training_values(trainer: L.Trainer, names: tuple[str, ...]) -> dict[str, float]:
    """The latest logged values of `names` (those logged so far) as numbers: a host read of each, so call it rarely."""
    metrics = trainer.callback_metrics
    return {name: float(metrics[name]) for name in names if name in metrics}


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, titled for step-based runs: "Epoch 3 · 1250/250000 steps".

    The recipes stop at `trainer.max_steps` with `max_epochs=-1`, which the stock title shows as "Epoch 3/-2";
    the optimiser step in the title follows every batch.

    It shows the training loss (and the tokenizer's `train/d_loss`) and learning rate from the logged values
    (`SHOWN_TRAINING_METRICS`), read at most every `metrics_refresh_seconds` during training, not after every batch
    as Lightning's bar reads its values: reading a logged device tensor makes the host wait for the GPU, and a wait
    per step leaves the device idle while the host runs the loop between steps. The step count and the title still
    follow every batch; validation and the end of an epoch refresh the metrics as before.
    """

    def __init__(self, *args: Any, metrics_refresh_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        if metrics_refresh_seconds < 0:
            raise ValueError(f"metrics_refresh_seconds={metrics_refresh_seconds} must be >= 0 (0: after every batch)")
        super().__init__(*args, **kwargs)
        self.metrics_refresh_seconds = metrics_refresh_seconds
        self.clock = clock
        self._metrics_read_at: float | None = None  # when the training metrics were last read
        self._in_train_batch_end = False

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_train_batch_end:
            now = self.clock()
            if self._metrics_read_at is not None and now - self._metrics_read_at < self.metrics_refresh_seconds:
                return
            self._metrics_read_at = now
        super()._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        """The shown training values and Lightning's progress-bar metrics, learning rates as `3.0e-04` (the bar rounds
        floats to 3 decimals: 3e-4 shows 0.0)."""
        metrics = {**shown_training_values(trainer, SHOWN_TRAINING_METRICS), **super().get_metrics(trainer, pl_module)}
        return {
            name: format_learning_rate(value) if is_learning_rate_metric(name) and isinstance(value, float) else value
            for name, value in metrics.items()
        }

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._in_train_batch_end = True
        try:
            super().on_train_batch_end(trainer, *args, **kwargs)
        finally:
            self._in_train_batch_end = False
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            description += f" · {trainer.global_step}/{trainer.max_steps} steps"
        return f"{description:{len(self.validation_description)}}"


PLAIN_LINE_MODES = ("auto", "always", "never")


def format_duration(seconds: float) -> str:
    """`h:mm:ss`, hours unbounded (`53:07:02`): the ETA of a progress line."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def plain_lines_wanted(mode: str, stdout_is_terminal: bool, progress_bar_shown: bool) -> bool:
    """`auto`: lines unless a live bar is drawn on a terminal (a bar in a file shows nothing until the run ends)."""
    if mode == "auto":
        return not (stdout_is_terminal and progress_bar_shown)
    return mode == "always"


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


class ProgressLog(L.Callback):
    """Plain progress lines through logging, for output that goes to a file (a SLURM `.out`, `> log`, `| tee`).

    `step 1200/400000 | loss 5.4312 | lr 3.00e-04 | 812.4 img/s | ETA 6:48:12` every `log_every_n_steps` optimiser
    steps or `log_every_n_seconds` seconds, whichever comes first (None turns one off). The losses are the logged
    `SHOWN_TRAINING_LOSSES` (global rank 0's; a host read per line), lr the first optimiser's first
    parameter group; img/s (global batch from `GlobalBatchMonitor` x steps / seconds) and the ETA to `max_steps`
    are measured since the previous line. `plain_lines`: `auto` writes them unless the rich bar is drawn on a
    terminal (so also with `trainer.enable_progress_bar=false`), `always`, `never`. Global rank 0 only.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = 100,
        log_every_n_seconds: float | None = 60.0,
        plain_lines: str = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if plain_lines not in PLAIN_LINE_MODES:
            raise ValueError(f"plain_lines={plain_lines!r} must be one of {', '.join(PLAIN_LINE_MODES)}")
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be positive, or null for no step trigger")
        if log_every_n_seconds is not None and log_every_n_seconds <= 0:
            raise ValueError(f"log_every_n_seconds={log_every_n_seconds} must be positive, or null for no time trigger")
        self.log_every_n_steps = log_every_n_steps
        self.log_every_n_seconds = log_every_n_seconds
        self.plain_lines = plain_lines
        self.clock = clock
        self.enabled = False
        self._last_step = 0
        self._last_time = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        has_trigger = self.log_every_n_steps is not None or self.log_every_n_seconds is not None
        self.enabled = has_trigger and trainer.is_global_zero and plain_lines_wanted(
            self.plain_lines, _stdout_is_terminal(), trainer.progress_bar_callback is not None
        )
        self._last_step, self._last_time = trainer.global_step, self.clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.enabled or step == self._last_step:
            return  # off, or no optimiser step in this batch (gradient accumulation)
        now = self.clock()
        due_by_steps = self.log_every_n_steps is not None and step % self.log_every_n_steps == 0
        due_by_time = self.log_every_n_seconds is not None and now - self._last_time >= self.log_every_n_seconds
        if due_by_steps or due_by_time:
            log.info("%s", self.progress_line(trainer, step, now))
            self._last_step, self._last_time = step, now

    def progress_line(self, trainer: L.Trainer, step: int, now: float) -> str:
        total = _total_steps(trainer)
        parts = [f"step {step}/{total}" if total is not None else f"step {step}"]
        for name, value in shown_training_values(trainer, SHOWN_TRAINING_LOSSES).items():
            parts.append(f"{name.removeprefix('train/')} {value:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
        monitor = next((callback for callback in trainer.callbacks if isinstance(callback, GlobalBatchMonitor)), None)
        if monitor is not None:
            parts.append(f"{monitor.global_batch_size * steps_per_second:.1f} img/s")
        if total is not None:
            parts.append(f"ETA {format_duration((total - step) / steps_per_second)}")
        return " | ".join(parts)


def _total_steps(trainer: L.Trainer) -> int | None:
    """The optimiser steps the run ends at: `max_steps`, else Lightning's estimate for an epoch-based run."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else None
