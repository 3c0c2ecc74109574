"""A test-only callback that records, per rank, what each training step saw and drew, and the final weights.

Configured through Hydra in the multi-process tests (`+callbacks.probe._target_=tests.distributed_probe.RankProbe
+callbacks.probe.folder=<dir>`); `python train.py` has the repository root on `sys.path`, so `tests.` imports.
Rank `r` writes `<folder>/steps.rank<r>.jsonl` (one line per training batch) and `<folder>/weights.rank<r>.pt`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class RankProbe(L.Callback):
    """Per batch: global step, epoch, sample keys, learning rate, a digest of the global torch random state, and for
    the generator the random draws of the step (orders, labels after class dropout, MBM bit masks)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._draws: dict[str, Any] = {}
        self._hooked = False

    def _path(self, trainer: L.Trainer, name: str) -> Path:
        return self.folder / f"{name}.rank{trainer.global_rank}{'.jsonl' if name == 'steps' else '.pt'}"

    def _hook_generator(self, pl_module: L.LightningModule) -> None:
        generator = getattr(pl_module, "generator", None)
        if generator is None or self._hooked:
            return
        draws = self._draws

        def record_inputs(module: Any, args: tuple) -> None:
            if not module.training:  # validation draws fixed masks; only training steps are recorded
                return
            _, labels, orders = args[:3]
            draws["labels"] = labels.tolist()
            draws["orders"] = digest(orders)

        generator.register_forward_pre_hook(record_inputs)
        head = generator.lm_head
        mask_bits = head.mask_bits

        def recording_mask_bits(*args: Any, **kwargs: Any):
            masked_ids, is_masked, mask_ratio = mask_bits(*args, **kwargs)
            if head.training:
                draws["bit_masks"] = digest(is_masked)
            return masked_ids, is_masked, mask_ratio

        head.mask_bits = recording_mask_bits
        self._hooked = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._hook_generator(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self._draws.clear()
        self._draws.update({
            "step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"], "random_state": digest(torch.get_rng_state()),
            "world_size": trainer.world_size, "batches_per_epoch": trainer.num_training_batches,
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
        })

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        with open(self._path(trainer, "steps"), "a", encoding="utf-8") as file:
            file.write(json.dumps(self._draws) + "\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self._path(trainer, "weights"))


class PoisonTokenizerLoss(L.Callback):
    """Makes the tokenizer's autoencoder loss NaN on one rank at one global step; the other ranks stay finite."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != self.rank:
            return
        real_forward = pl_module.loss.forward

        def poisoned_forward(*args: Any, **kwargs: Any) -> Any:
            total, terms = real_forward(*args, **kwargs)
            return (total + float("nan") if pl_module.global_step == self.step else total), terms

        pl_module.loss.forward = poisoned_forward
