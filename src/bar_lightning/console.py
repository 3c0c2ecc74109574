"""The one place where known third-party console noise is silenced, each item for a stated reason.

A normal run should print our lines, Lightning's informative ones (devices, seed, the end of fit) and real problems.
Every filter below matches one message from one module; nothing is silenced by category alone, so a new warning
from the same package still shows.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisements for its cloud services ("💡 Tip: For seamless cloud logging ... litlogger", "... cloud
# uploads ... litmodels"), printed by every run through this logger. They tell nothing about the run.
LIGHTNING_TIP_PREFIX = "💡 Tip:"
LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"

# (message regex, category, module regex) of third-party warnings that are known and harmless here.
KNOWN_THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6 builds `torch.utils._pytree.LeafSpec()` when it moves batches, which torch 2.14 deprecates; the
    # fix is Lightning's to make (nothing in this project builds a LeafSpec). Shown once per run otherwise.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # A tokenizer run holds modules that are in eval mode by design: the EMA copy of the tokenizer (updated by
    # averaging, never trained) and frozen pretrained loss networks. Lightning warns about them at every start.
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning, r"lightning\.pytorch\.loops\.fit_loop"),
)


class DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" advertisements and lets every other record of its logger through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP_PREFIX)


def quiet_known_noise() -> None:
    """Install the filters above (idempotent: a second call adds nothing). Called by train.py before any work."""
    rank_zero = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(existing, DropLightningTips) for existing in rank_zero.filters):
        rank_zero.addFilter(DropLightningTips())
    for message, category, module in KNOWN_THIRD_PARTY_WARNINGS:
        # filterwarnings puts an identical filter first instead of adding a duplicate.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def format_learning_rate(value: float) -> str:
    """A learning rate as the progress bar shows it, in scientific notation: 3e-4 -> "3.0e-04".

    The rich bar rounds floats to 3 decimals, which shows every learning rate below 5e-4 as 0.0.
    """
    return f"{value:.1e}"


def is_learning_rate_metric(name: str) -> bool:
    """`train/lr`, `lr`, and LearningRateMonitor's `lr-AdamW` / `lr-AdamW/pg1`: names whose value is a learning rate."""
    parts = name.split("/")
    return parts[-1] == "lr" or parts[0].startswith("lr-") or parts[-1].startswith("lr_")
