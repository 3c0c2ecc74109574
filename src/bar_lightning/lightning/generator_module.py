"""LightningModule that trains the BAR generator on bit tokens."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim.lr_scheduler import LambdaLR

from bar_lightning.config.schema import compiles_with_cuda_graphs, inductor_options
from bar_lightning.lightning.loss_check import NonFiniteLossCheck
from bar_lightning.lightning.optimization import (
    clip_gradient_norm,
    fused_adamw_wanted,
    parameter_groups,
    random_order_ratio,
    warmup_cosine,
)
from bar_lightning.lightning.step_logging import log_number
from bar_lightning.lightning.strategies import automatic_compile_mode
from bar_lightning.models.bar import NULL_LABEL, BARGenerator
from bar_lightning.models.sampler import SamplingSettings

# Lightning notes that a module's `on_before_batch_transfer` is used beside a DataModule: that is the intent here.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but")


class GeneratorModule(L.LightningModule):
    """Trains `BARGenerator` with random-order annealing, class dropout and AdamW + warmup-cosine.

    All arguments are plain dicts from the validated Hydra config (`model`, `optim`, `training`, `sampling`), saved
    as hyper-parameters so `GeneratorModule.load_from_checkpoint(path)` rebuilds the network with no other input.
    `tags` (the config's top-level `tags`) only name the run: saved with them, so the loggers record them.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        training: dict[str, Any],
        sampling: dict[str, Any],
        tags: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generator = BARGenerator(**model)
        self.random_ratio = random_order_ratio(0, training["randomness_anneal_start"], training["randomness_anneal_end"])
        self._compiled_forward = None
        self._compiled_with_cuda_graphs = False
        self.loss_check = NonFiniteLossCheck()  # given every training loss; on the Trainer by configure_callbacks
        self._batch_checked_on_host = False  # set by on_before_batch_transfer, read by the next step

    # ----------------------------------------------------------------- training
    def configure_model(self) -> None:
        training = self.hparams.training
        if self._compiled_forward is None and self.compile_training_step(training.get("compile")):
            mode = self.training_compile_mode()
            options = inductor_options(training.get("compile_options"))
            compiled = torch.compile(self.generator, mode=None if mode == "default" else mode, options=options or None)
            self._compiled_with_cuda_graphs = compiles_with_cuda_graphs(mode, options)
            # Not registered as a submodule: it wraps `self.generator`, whose weights would be saved twice (under
            # `_compiled_forward._orig_mod.`) and then fail to load into an uncompiled module.
            object.__setattr__(self, "_compiled_forward", compiled)

    def compile_training_step(self, setting: bool | None) -> bool:
        """`training.compile`, with None resolved for this run: compiled on CUDA devices except under FSDP."""
        if setting is not None:
            return bool(setting)
        if self._trainer is None:
            return False
        strategy = self.trainer.strategy
        return not isinstance(strategy, FSDPStrategy) and strategy.root_device.type == "cuda"

    def training_compile_mode(self) -> str:
        """`training.compile_mode`, with None resolved for this run: CUDA graphs ("reduce-overhead") for one device
        without gradient accumulation, "default" otherwise or when `training.compile_options` are given."""
        training = self.hparams.training
        mode = training.get("compile_mode")
        if mode is not None:
            return mode
        if inductor_options(training.get("compile_options")) or self._trainer is None:
            return "default"
        # A replay reuses its output memory, so gradients of one micro-batch would be overwritten by the next.
        return automatic_compile_mode(self.trainer.strategy,
                                      cuda_graphs_allowed=self.trainer.accumulate_grad_batches == 1)

    def align_head_matmuls(self, device: torch.device) -> bool:
        """`training.align_head_matmuls`, with None resolved: on for CUDA devices."""
        setting = self.hparams.training.get("align_head_matmuls")
        return device.type == "cuda" if setting is None else bool(setting)

    def _loss(self, bits: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled_forward is not None and self.training
        forward = self._compiled_forward if compiled else self.generator
        cuda_graphs = compiled and self._compiled_with_cuda_graphs
        loss = forward(bits, labels, orders, None, self.align_head_matmuls(bits.device))
        # A graph output lives in memory that the next replay overwrites; the logged loss needs its own copy.
        return loss.clone() if cuda_graphs else loss

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Checked on the host before the copy: the same check of device tensors would stall every step on a sync.
        if isinstance(batch, dict):
            self._check_batch(batch)
            self._batch_checked_on_host = True
        return batch

    def _check_batch(self, batch: dict[str, Any]) -> None:
        if self.hparams.training.get("check_inputs", True):
            self.generator.check_bits(batch["bits"])
            self.generator.check_labels(batch["label"])

    def _check_batch_unless_done_on_host(self, batch: dict[str, Any]) -> None:
        # A DataModule that overrides `on_before_batch_transfer` replaces this module's hook (Lightning calls one of
        # the two): the batch is then checked here, on the device.
        if not self._batch_checked_on_host:
            self._check_batch(batch)
        self._batch_checked_on_host = False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._check_batch_unless_done_on_host(batch)
        bits, labels = batch["bits"], batch["label"]
        training = self.hparams.training
        self.random_ratio = random_order_ratio(
            self.global_step, training["randomness_anneal_start"], training["randomness_anneal_end"]
        )
        # Orders are drawn outside the (possibly compiled) forward, as upstream, so the ratio never recompiles it.
        orders = self.generator.sample_orders(bits.shape[0], self.random_ratio, bits.device)
        dropped = torch.rand(labels.shape[0], device=labels.device) < training["class_label_dropout"]
        labels = torch.where(dropped, torch.full_like(labels, NULL_LABEL), labels)
        loss = self._loss(bits, labels, orders)
        self.loss_check.note(loss)
        batch_size = bits.shape[0]
        # No prog_bar=True (Lightning would read those values on the host after every step: the bar reads them itself,
        # callbacks.SHOWN_TRAINING_METRICS); host numbers go through log_number (a plain float is a blocking copy).
        self.log("train/loss", loss, batch_size=batch_size)
        log_number(self, "train/random_ratio", self.random_ratio, batch_size=batch_size)
        log_number(self, "train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._check_batch_unless_done_on_host(batch)
        bits, labels = batch["bits"], batch["label"]
        # Fixed masks per batch index so validation losses are comparable across steps.
        generator = torch.Generator(device=bits.device).manual_seed(10_000 + batch_idx)
        loss = self.generator(bits, labels, None, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bits.shape[0])
        return loss

    def configure_callbacks(self) -> list[L.Callback]:
        """The non-finite-loss check, attached by every Trainer that fits this module: no run can go without it."""
        return [self.loss_check]

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        # Parameters of the strategy-wrapped model (DDP/FSDP), as Lightning recommends.
        source = self.trainer.model if self._trainer is not None else self
        groups = parameter_groups(source.named_parameters(), optim["weight_decay"], optim["no_decay_rule"])
        optimizer = torch.optim.AdamW(
            groups, lr=optim["learning_rate"], betas=tuple(optim["betas"]),
            fused=fused_adamw_wanted(self, optim.get("fused")) or None,
        )
        schedule = LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, warmup_steps=optim["warmup_steps"], total_steps=optim["total_steps"],
                base_lr=optim["learning_rate"], end_lr=optim["end_lr"],
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The global gradient norm by `clip_gradient_norm` (Lightning refuses to clip for a fused AdamW under bf16
        autocast and for FSDP); other algorithms by Lightning.

        The norm the clipping computed (before clipping) is logged as `train/grad_norm`, once per optimiser step: it
        is not computed a second time, so it is logged only where gradients are clipped by norm (the recipes' default,
        `trainer.gradient_clip_val=1.0`) and not under 16-mixed.
        """
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        norm = clip_gradient_norm(self, optimizer, gradient_clip_val)
        if norm is not None:
            self.log("train/grad_norm", norm)

    # ----------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["random_ratio"] = self.random_ratio

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.random_ratio = checkpoint.get("random_ratio", self.random_ratio)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, **overrides: Any) -> torch.Tensor:
        """Generate flat bits for `labels` with the `sampling` settings (keyword arguments override them)."""
        values = {**self.hparams.sampling, **overrides}
        settings = SamplingSettings.from_values(self.generator, values)
        # Training previews stay eager: a captured graph would hold device memory for the rest of the run.
        cuda_graph = bool(values.get("cuda_graph", False)) and not self.training and labels.is_cuda
        return self.generator.generate(labels, settings, generator=generator, cuda_graph=cuda_graph)
