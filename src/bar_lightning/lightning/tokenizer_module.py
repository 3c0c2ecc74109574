"""LightningModule that trains a binary-FSQ tokenizer with a GAN discriminator (manual optimisation)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from bar_lightning.config.schema import compiles_with_cuda_graphs
from bar_lightning.lightning.ema import EMA
from bar_lightning.lightning.loss_check import NonFiniteLossCheck
from bar_lightning.lightning.optimization import (
    clip_gradient_norm,
    fused_adamw_wanted,
    upstream_no_decay,
    warmup_cosine,
)
from bar_lightning.lightning.step_logging import log_number
from bar_lightning.lightning.strategies import automatic_compile_mode
from bar_lightning.models.losses import (
    TokenizerReconstructionLoss,
    generator_adversarial_loss,
    hinge_d_loss,
    quantize_to_uint8_grid,
)
from bar_lightning.models.registry import TOKENIZER_FAMILIES, build_discriminator, build_tokenizer


def bit_entropy(bits: torch.Tensor) -> torch.Tensor:
    """Entropy (in bits) of each FSQ channel over all tokens of `bits [..., Cb]`; 1.0 = a perfectly used bit."""
    p = bits.reshape(-1, bits.shape[-1]).float().mean(0).clamp(1e-6, 1 - 1e-6)
    return -(p * p.log2() + (1 - p) * (1 - p).log2())  # [Cb]


class TokenizerModule(L.LightningModule):
    """Autoencoder (G) and discriminator (D) trained with the official schedule.

    Before `training.discriminator_start` every batch is a G step. From then on G and D steps alternate batch by
    batch (G first), so `global_step` counts both kinds, as upstream. A D batch recomputes the reconstructions with
    the autoencoder in eval mode and without gradients. The EMA of the autoencoder is updated after every batch and
    is what validation and export use.
    """

    def __init__(
        self,
        model: dict[str, Any],
        loss: dict[str, Any],
        discriminator: dict[str, Any] | None,
        optim: dict[str, Any],
        training: dict[str, Any],
        evaluation: dict[str, Any] | None = None,
        tags: list[str] | None = None,  # only name the run: saved with the hyper-parameters, so the loggers record them
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Losses and discriminator first: they check their pretrained files before the (large) tokenizer is built.
        self.loss = TokenizerReconstructionLoss(**loss)
        self.discriminator = build_discriminator(discriminator) if discriminator and training["gan_weight"] > 0 else None
        self.tokenizer = build_tokenizer(model)
        self.ema = EMA(self.tokenizer, decay=training["ema_decay"]) if training.get("ema", True) else None
        # Given the loss of every G and D step, on the device; on the Trainer by configure_callbacks.
        self.loss_check = NonFiniteLossCheck()
        self.evaluation = evaluation or {}
        self._val_outputs: dict[str, list[torch.Tensor]] = {}
        # Compiled forwards of the tokenizer, the losses and the discriminator (training.compile, and for the
        # discriminator training.compile_discriminator), kept out of the module tree so that checkpoints hold no
        # `_orig_mod.` keys.
        object.__setattr__(self, "_compiled", None)
        # Whether those forwards replay CUDA graphs (training.compile_mode): their outputs are then overwritten by the
        # next step's replay, so what outlives the step (logged and checked losses) is copied.
        object.__setattr__(self, "_cuda_graphs", False)

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        wanted = bool(self.hparams.training.get("compile", False))
        if wanted and strategy.root_device.type == "cuda" and not isinstance(strategy, FSDPStrategy):
            mode = self.training_compile_mode()
            cuda_graphs = compiles_with_cuda_graphs(mode, None)
            if cuda_graphs and not isinstance(strategy, SingleDeviceStrategy):
                # Measured and tested on one GPU only; DDP's gradient hooks around replayed backward graphs are not.
                raise ValueError(
                    f"training.compile_mode={mode!r} replays CUDA graphs and is offered on one GPU only; this run "
                    f"uses {type(strategy).__name__} on {self.trainer.world_size} process(es): use "
                    "training.compile_mode=default"
                )
            compiled = {name: torch.compile(getattr(self, name), mode=None if mode == "default" else mode)
                        for name in ("tokenizer", "loss")}
            if self.discriminator is not None and self.hparams.training.get("compile_discriminator", False):
                # Default mode whatever compile_mode says: the D step calls it twice (real, then fake images) before
                # using either output, and a CUDA-graph replay reuses its output memory.
                compiled["discriminator"] = torch.compile(self.discriminator)
            object.__setattr__(self, "_compiled", compiled)
            object.__setattr__(self, "_cuda_graphs", cuda_graphs)

    def training_compile_mode(self) -> str:
        """`training.compile_mode`, with None (automatic) resolved for this run: CUDA graphs ("reduce-overhead") on
        one device, "default" under DDP, where replayed backward graphs are not measured or tested."""
        # Checkpoints written before training.compile_mode existed hold no such key: automatic as well.
        mode = self.hparams.training.get("compile_mode")
        return mode if mode is not None else automatic_compile_mode(self.trainer.strategy)

    def _forward(self, name: str) -> nn.Module:
        """The compiled forward of `name` ("tokenizer", "loss", "discriminator") where training.compile (and for the
        discriminator training.compile_discriminator) compiled it, else the module."""
        compiled = self._compiled or {}
        return compiled[name] if name in compiled else getattr(self, name)

    # ----------------------------------------------------------------- schedule
    def uses_discriminator(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.hparams.training["discriminator_start"]

    def is_generator_step(self, step: int) -> bool:
        """G before the discriminator starts; afterwards G on even offsets from the start, D on odd ones."""
        if not self.uses_discriminator(step):
            return True
        return (step - self.hparams.training["discriminator_start"]) % 2 == 0

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        step = self.global_step
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        if not isinstance(optimizers, list):
            optimizers, schedulers = [optimizers], [schedulers]
        training = self.hparams.training
        batch_size = images.shape[0]
        if self._cuda_graphs:
            # A new step: the graphs' outputs of the last one are no longer read.
            torch.compiler.cudagraph_mark_step_begin()

        if self.is_generator_step(step):
            if self.discriminator is not None:
                self.discriminator.requires_grad_(False)  # G step: D is a fixed critic
            output = self._forward("tokenizer")(images)
            total, terms = self._forward("loss")(output.reconstruction, images, output.clip_prediction,
                                                 output.clip_target)
            if self.uses_discriminator(step):
                adversarial = generator_adversarial_loss(self._forward("discriminator")(output.reconstruction))
                total = total + training["gan_weight"] * adversarial
                terms["gan"] = adversarial.detach()
            if self._cuda_graphs:
                total = total.clone()
                terms = {name: value.clone() for name, value in terms.items()}
            self.loss_check.note(total, "autoencoder")
            self._optimizer_step(optimizers[0], schedulers[0], total)
            self.log("train/loss", total.detach(), batch_size=batch_size)
            for name, value in terms.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
            self.log("train/bit_entropy", bit_entropy(output.bits).mean(), batch_size=batch_size)
        else:
            self.discriminator.requires_grad_(True)
            with torch.no_grad():
                self.tokenizer.eval()
                reconstruction = self._forward("tokenizer")(images).reconstruction
                self.tokenizer.train()
            discriminator = self._forward("discriminator")
            logits_real = discriminator(images)
            logits_fake = discriminator(quantize_to_uint8_grid(reconstruction))
            loss = hinge_d_loss(logits_real, logits_fake)
            self.loss_check.note(loss, "discriminator")
            self._optimizer_step(optimizers[1], schedulers[1], loss)
            self.log("train/d_loss", loss.detach(), batch_size=batch_size)
            self.log("train/logits_real", logits_real.detach().mean(), batch_size=batch_size)
            self.log("train/logits_fake", logits_fake.detach().mean(), batch_size=batch_size)
        # No prog_bar=True (Lightning would read those values on the host after every step: the bar reads them itself,
        # callbacks.SHOWN_TRAINING_METRICS); host numbers go through log_number (a plain float is a blocking copy).
        log_number(self, "train/generator_step", self.is_generator_step(step), batch_size=batch_size)
        skip_counter = getattr(getattr(self._trainer, "datamodule", None), "skip_counter", None)
        if skip_counter is not None:
            log_number(self, "data/skipped", skip_counter.skipped, batch_size=batch_size)
        log_number(self, "train/lr", optimizers[0].param_groups[-1]["lr"], batch_size=batch_size)
        if self.ema is not None:
            self.ema.update(self.tokenizer)

    def _optimizer_step(self, optimizer: Any, scheduler: Any, loss: torch.Tensor) -> None:
        """Backward, clip, step and advance the schedule of one of the two optimisers."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.training["gradient_clip_val"]:
            clip_gradient_norm(self, optimizer, self.hparams.training["gradient_clip_val"])
        optimizer.step()
        scheduler.step()
        # Applied gradients are released at once, not at the next step of this optimiser: under CUDA graphs
        # (training.compile_mode=reduce-overhead) they are outputs of the backward graph that the next replay
        # overwrites, and anything that reads them later fails (Lightning's teardown moves every `.grad` to the CPU);
        # and the G step's gradients need no memory during the D step.
        optimizer.zero_grad(set_to_none=True)

    def configure_callbacks(self) -> list[L.Callback]:
        """The non-finite-loss check, attached by every Trainer that fits this module: it stops training at the
        first non-finite G or D loss before that step applies (skipped on the device by the fused AdamW, with no
        host read per step; and on every process of a distributed run together, where a raise on one alone would leave
        the others in the gradient all-reduce)."""
        return [self.loss_check]

    # ----------------------------------------------------------------- optimisers
    def configure_optimizers(self) -> list[dict[str, Any]]:
        optim = self.hparams.optim
        source = self.trainer.model if self._trainer is not None else self
        base_lr, encoder_lr = optim["learning_rate"], optim["learning_rate"] * optim["encoder_lr_multiplier"]
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        discriminator_params = []
        for name, parameter in source.named_parameters():
            if not parameter.requires_grad:  # frozen encoder parts, EMA copy, pretrained loss networks
                continue
            if "discriminator" in name:
                discriminator_params.append(parameter)
                continue
            part = "encoder" if "encoder" in name else "other"
            groups.setdefault((part, upstream_no_decay(name, parameter)), []).append(parameter)
        param_groups = [
            {"params": params, "lr": encoder_lr if part == "encoder" else base_lr,
             "weight_decay": 0.0 if no_decay else optim["weight_decay"]}
            for (part, no_decay), params in sorted(groups.items())
        ]
        betas = tuple(optim["betas"])

        def schedule(optimizer: torch.optim.Optimizer, peak_lr: float) -> dict[str, Any]:
            scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(
                step, warmup_steps=optim["warmup_steps"], total_steps=optim["total_steps"],
                base_lr=peak_lr, end_lr=optim["end_lr"],
            ))
            return {"scheduler": scheduler, "interval": "step"}

        fused = fused_adamw_wanted(self, optim.get("fused")) or None
        autoencoder_optimizer = torch.optim.AdamW(param_groups, lr=base_lr, betas=betas, fused=fused)
        configs = [{"optimizer": autoencoder_optimizer, "lr_scheduler": schedule(autoencoder_optimizer, base_lr)}]
        if self.discriminator is not None:
            disc_lr = optim["discriminator_learning_rate"]
            discriminator_optimizer = torch.optim.AdamW(
                discriminator_params, lr=disc_lr, betas=betas, weight_decay=optim["weight_decay"], fused=fused
            )
            configs.append({"optimizer": discriminator_optimizer,
                            "lr_scheduler": schedule(discriminator_optimizer, disc_lr)})
        return configs

    # ----------------------------------------------------------------- validation
    def eval_tokenizer(self) -> nn.Module:
        """The EMA weights when they exist (used for validation and export), else the live ones."""
        return self.ema.averaged if self.ema is not None else self.tokenizer

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {"mse": [], "psnr": [], "ssim": [], "lpips": [], "bits": []}
        if self.evaluation.get("rfid", False):
            self._fid().reset()

    def _fid(self):
        if not hasattr(self, "_fid_metric"):
            from torchmetrics.image.fid import FrechetInceptionDistance

            from bar_lightning.models.pretrained import check_weights_file

            # Vetted with weights_only=True first: torchmetrics/torch-fidelity would unpickle it unrestricted.
            weights = check_weights_file(
                self.evaluation.get("inception_weights"),
                what="FID Inception weights (weights-inception-2015-12-05-6726825d.pth)",
                needed_by="validation rFID [evaluation.inception_weights]; set evaluation.rfid=false to skip it",
            )
            metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
            # Kept outside the module's children so the Inception weights never enter checkpoints.
            object.__setattr__(self, "_fid_metric", metric.to(self.device))
        return self._fid_metric

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from torchmetrics.functional.image import structural_similarity_index_measure

        images = batch["image"]
        tokenizer = self.eval_tokenizer()
        output = tokenizer(images)
        reconstruction = output.reconstruction.clamp(-1, 1)
        real01, fake01 = (images + 1) / 2, (reconstruction + 1) / 2
        # PSNR per image, then averaged (the usual reconstruction protocol), rather than PSNR of the pooled MSE.
        per_image_mse = ((real01 - fake01) ** 2).flatten(1).mean(1)
        self._val_outputs["mse"].append(per_image_mse)
        self._val_outputs["psnr"].append(-10 * torch.log10(per_image_mse.clamp_min(1e-10)))
        self._val_outputs["ssim"].append(
            structural_similarity_index_measure(fake01, real01, data_range=1.0, reduction="none").reshape(-1)
        )
        lpips = self._lpips_network()
        if lpips is not None:
            self._val_outputs["lpips"].append(lpips(reconstruction, images).reshape(-1))
        self._val_outputs["bits"].append(output.bits.reshape(-1, output.bits.shape[-1]))
        if self.evaluation.get("rfid", False):
            self._fid().update(real01, real=True)
            self._fid().update(fake01, real=False)
        if batch_idx == 0:
            self._log_grid(images, reconstruction)

    def on_validation_epoch_end(self) -> None:
        outputs = {key: torch.cat(values) for key, values in self._val_outputs.items() if values}
        if not outputs:
            return
        for key in ("mse", "psnr", "ssim", "lpips"):
            if key in outputs:
                self.log(f"val/{key}", outputs[key].mean(), sync_dist=True)
        entropy = bit_entropy(outputs["bits"])
        self.log("val/bit_entropy", entropy.mean(), sync_dist=True)
        self.log("val/bit_entropy_min", entropy.min(), sync_dist=True)
        if self.evaluation.get("rfid", False):
            self.log("val/rfid", self._fid().compute())

    def _lpips_network(self) -> nn.Module | None:
        """The training loss's LPIPS network, reused for validation LPIPS when the perceptual loss has one."""
        if "perceptual" not in self.loss.frozen_names():
            return None
        return self.loss.frozen("perceptual").lpips

    def _log_grid(self, images: torch.Tensor, reconstruction: torch.Tensor) -> None:
        count = min(8, images.shape[0])
        pairs = torch.stack([images[:count], reconstruction[:count]], dim=1).flatten(0, 1)  # real, recon, real, ...
        grid = torchvision.utils.make_grid((pairs + 1) / 2, nrow=2 * int(math.ceil(count / 2)), value_range=(0, 1))
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/reconstructions", grid.clamp(0, 1), global_step=self.global_step)

    # ----------------------------------------------------------------- export
    @classmethod
    def load_tokenizer(cls, checkpoint_path: str | Path, *, use_ema: bool = True, decode_only: bool = False,
                       key: str = "tokenizer.checkpoint") -> nn.Module:
        """The tokenizer alone from a training checkpoint, without building losses or discriminators.

        No pretrained loss network is needed; `decode_only=True` drops the encoder too (sampling needs only the
        decoder). A file of another kind (a generator checkpoint, bare weights) is refused naming `key`.
        """
        from bar_lightning.lightning.checkpointing import (
            CheckpointReadError,
            check_weights_fit,
            read_module_checkpoint,
        )

        # weights_only: a crafted file is refused with its name instead of running code.
        checkpoint = read_module_checkpoint(checkpoint_path, expected="tokenizer", key=key)
        hparams = checkpoint["hyper_parameters"]
        if not isinstance(hparams.get("model"), dict) or hparams["model"].get("family") not in TOKENIZER_FAMILIES:
            raise CheckpointReadError(f"{key}={checkpoint_path}: its hyper-parameters name no tokenizer family")
        has_ema = any(key.startswith("ema.averaged.") for key in checkpoint["state_dict"])
        prefix = "ema.averaged." if use_ema and has_ema else "tokenizer."
        state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
        overrides = {"build_encoder": False} if decode_only else {}
        if decode_only:
            state = {key: value for key, value in state.items() if not key.startswith("encoder.")}
        # Built first on the meta device: hyper-parameters that claim a huge network cost nothing and are refused.
        check_weights_fit(lambda: build_tokenizer(hparams["model"], **overrides), state, what=f"{key}={checkpoint_path}")
        tokenizer = build_tokenizer(hparams["model"], **overrides)
        tokenizer.load_state_dict(state, strict=True)
        return tokenizer.eval()
