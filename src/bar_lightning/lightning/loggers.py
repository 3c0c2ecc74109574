"""Loggers of the `logger=` config group that need more than Lightning's own class."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` (`logger=wandb`), minus the `anonymous=None` it always passes to `wandb.init`.

    wandb 0.2x deprecated that setting and answers any value, None included, with "The anonymous setting has no
    effect" on every run; leaving the key out changes nothing else. Everything else is Lightning's: `save_dir` is
    where `wandb/` goes (the run folder), `WANDB_MODE=offline` runs with no account or network.

    Resuming: a run folder is one run (train.py resumes from its checkpoints), so it is one wandb run too. Without an
    explicit `id`, the id is derived from the absolute `save_dir` (the run folder) and `resume="allow"`: a resumed
    attempt continues the wandb run of the first one instead of starting another, and a new folder starts a new run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("id") is None and kwargs.get("version") is None and kwargs.get("save_dir"):
            kwargs["id"] = run_folder_id(str(kwargs["save_dir"]))
            kwargs.setdefault("resume", "allow")
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def run_folder_id(save_dir: str) -> str:
    """A wandb run id that names the run folder: the same folder gives the same id on every attempt."""
    folder = os.path.realpath(os.path.expanduser(save_dir))
    return "bar-" + hashlib.sha256(folder.encode("utf-8")).hexdigest()[:16]
