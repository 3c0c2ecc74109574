"""The non-finite-loss check of a training run, as a callback: a bad loss stops training before its step applies.

The module hands every micro-batch loss to :meth:`NonFiniteLossCheck.note` (a device-side "and"; no host read); the
callback resolves the check in `on_before_optimizer_step`, after the backward pass has been queued (with automatic
optimisation, and with manual optimisation at each `optimizer.step()` of the optimisers `self.optimizers()` returns):

* with a fused AdamW the flag becomes the optimiser's `found_inf`, so the kernel skips a bad step on the device, and
  the flag is copied to pinned host memory behind a CUDA event; it is read once it has arrived (at a later step),
  and always before a checkpoint is written and at the end of training. No step waits on the host.
* with any other optimiser the flag is read on the host there, once per optimiser step; raising skips the step.

Either way the weights in memory and every saved checkpoint stay finite.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import lightning as L
import torch


def non_finite_loss_error(loss: float, step: int, which: str = "training") -> FloatingPointError:
    where = f"{which} loss {loss}" if not math.isfinite(loss) else f"{which} loss on another process (here {loss})"
    return FloatingPointError(
        f"non-finite {where} at global step {step}; the last saved checkpoint is kept. Lower "
        "optim.learning_rate or check the data."
    )


def finite_on_every_process(finite: torch.Tensor) -> torch.Tensor:
    """`finite` and-ed over the processes of a distributed run, on the device (no host read)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return finite
    if torch.distributed.get_world_size() == 1:
        return finite
    every = finite.to(torch.float32).reshape(1)
    torch.distributed.all_reduce(every, op=torch.distributed.ReduceOp.MIN)
    return every.reshape(()) > 0


class LossCheck(NamedTuple):
    """The loss check of one optimiser step on its way to the host: `values` = (all finite, loss to report)."""

    step: int
    values: torch.Tensor
    copied: torch.cuda.Event | None  # None: `values` was computed synchronously (CPU)
    which: str = "training"

    @staticmethod
    def queue(step: int, finite: torch.Tensor, loss: torch.Tensor, which: str = "training") -> LossCheck:
        values = torch.stack([finite.to(torch.float32), loss.detach().to(torch.float32)])
        if values.device.type != "cuda":
            return LossCheck(step, values, None, which)
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LossCheck(step, host, copied, which)

    def arrived(self, wait: bool) -> bool:
        if self.copied is None or self.copied.query():
            return True
        if wait:
            self.copied.synchronize()
        return wait


class NonFiniteLossCheck(L.Callback):
    """Stops training with a `FloatingPointError` at the first non-finite loss, before that step reaches the weights.

    The module owns one, returns it from `configure_callbacks` (so no run can go without it) and passes each
    training loss to :meth:`note` before the optimiser step it drives (the tokenizer's manual G and D steps name
    theirs: "autoencoder", "discriminator"). A callback cannot read the loss itself in time: `on_train_batch_end`
    comes after the optimiser step, and `on_before_backward` sees the loss divided by the accumulation and scaled by
    the AMP grad scaler.
    """

    def __init__(self) -> None:
        # (all losses finite, the non-finite loss to report) since the last optimiser step, kept on the device.
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._which = "training"  # what the pending losses are, for the error
        self._queued: list[LossCheck] = []  # flags of steps a fused optimiser skips on the device, on their way

    def note(self, loss: torch.Tensor, which: str = "training") -> None:
        """Remember on the device whether every loss since the last optimiser step was finite (no host sync here);
        `which` names the loss in the error."""
        loss = loss.detach()
        finite = torch.isfinite(loss)
        if self._pending is None:
            self._pending, self._which = (finite, loss), which
        else:
            all_finite, reported = self._pending
            self._pending = (all_finite & finite, torch.where(finite, reported, loss))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._raise_for_arrived(wait=False)
        pending, self._pending = self._pending, None
        if pending is not None:
            # Under DDP the averaged gradients are non-finite on every process if one loss was: all must skip.
            pending = (finite_on_every_process(pending[0]), pending[1])
        if optimizer.defaults.get("fused") is True:
            # The fused AdamW kernel leaves weights, moments and step counts untouched where `found_inf` is set, so
            # this step needs no host read: its flag is copied out now and read once computed (at a later step,
            # before any checkpoint is written and at the end of training), raising then.
            optimizer.found_inf = None if pending is None else (~pending[0]).to(torch.float32)
            if pending is not None:
                self._queued.append(LossCheck.queue(trainer.global_step, *pending, self._which))
            return
        # Otherwise one host read per optimiser step, after the backward pass has been queued; raising here skips
        # the step, so the weights in memory and every saved checkpoint stay finite.
        if pending is not None and not bool(pending[0]):
            raise non_finite_loss_error(float(pending[1]), trainer.global_step, self._which)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A step whose loss was non-finite was skipped on the device; no checkpoint is written after it.
        self._raise_for_arrived(wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_for_arrived(wait=True)

    def _raise_for_arrived(self, wait: bool) -> None:
        """Raise for the first non-finite loss among the queued checks whose flags have arrived (all, if `wait`)."""
        waiting = []
        for check in self._queued:
            if not check.arrived(wait):
                waiting.append(check)
                continue
            finite, loss = check.values.tolist()
            if not finite:
                self._queued = []
                raise non_finite_loss_error(loss, check.step, check.which)
        self._queued = waiting
