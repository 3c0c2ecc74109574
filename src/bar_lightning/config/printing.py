"""The composed config as a tree on the console at the start of a run (`print_config=true`).

One branch per top-level section, its values as YAML, in the order a reader looks for them. Printed by the process of
global rank 0 only; when stdout is not a terminal (a log file, a pipe) rich writes plain text without colours. Nothing
is saved: the run folder's config.yaml (train.py) and .hydra/config.yaml hold the same config.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

# Sections first in this order (those a config has); the others follow in the config's own order.
SECTION_ORDER = (
    "task", "experiment_name", "tags", "model", "data", "training", "optim", "sampling", "trainer", "callbacks",
    "logger", "paths",
)
# Width of the tree when stdout is not a terminal: wide enough that paths and lists are not cut into several lines.
PLAIN_TEXT_WIDTH = 200


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0, from the environment (before any process group exists).

    Read as Lightning reads it (torchrun's RANK, the LOCAL_RANK of the processes Lightning starts, SLURM_PROCID), and
    on node NODE_RANK > 0 of a multi-node run no process is rank 0.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            rank = int(os.environ[key])
            break
    else:
        rank = 0
    return rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def section_order(cfg: DictConfig, order: Sequence[str] = SECTION_ORDER) -> list[str]:
    """The top-level keys of `cfg`: those named in `order` first (in that order), then the rest as they come."""
    keys = [str(key) for key in cfg.keys()]
    return [key for key in order if key in keys] + [key for key in keys if key not in order]


def print_config_tree(cfg: DictConfig, order: Sequence[str] = SECTION_ORDER) -> None:
    """Print `cfg` (resolved) as a rich Tree on stdout, one branch per top-level section; rank 0 only."""
    if not is_global_rank_zero():
        return
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(PLAIN_TEXT_WIDTH, shutil.get_terminal_size().columns))
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    for key in section_order(cfg, order):
        value = cfg[key]
        if isinstance(value, (DictConfig, ListConfig)):
            text = OmegaConf.to_yaml(value, resolve=True).rstrip()
        else:
            text = OmegaConf.to_yaml({key: value}).split(":", 1)[1].strip()  # a scalar as YAML writes it (null, 'a b')
        tree.add(key, style="bold", guide_style="dim").add(Syntax(text, "yaml", theme="ansi_dark"))
    console.print(tree)
