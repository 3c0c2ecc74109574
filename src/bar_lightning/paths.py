"""Where the project's own files are, independent of the directory a command is started from.

Configs are always those of this clone (`<clone>/conf`, next to train.py). Data, pretrained weights and outputs live
under one root, `paths.root_dir`: the environment variable `BAR_ROOT` when set, else the clone itself. The config
resolver `${bar_root:}` gives that root, so `outputs/`, `data/` and `pretrained/` never land in whatever folder a
command happens to be started from.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

ROOT_VARIABLE = "BAR_ROOT"


def code_root() -> Path:
    """The clone this package runs from (the folder holding conf/, train.py and src/)."""
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """The project's Hydra configs."""
    folder = code_root() / "conf"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: bar_lightning runs from its clone (pip install -e .), where conf/ holds the "
            "configs"
        )
    return folder


def project_root() -> Path:
    """The root of data, pretrained weights and outputs: `$BAR_ROOT`, else the clone."""
    configured = os.environ.get(ROOT_VARIABLE)
    return Path(configured).expanduser().resolve() if configured else code_root()


if not OmegaConf.has_resolver("bar_root"):
    OmegaConf.register_new_resolver("bar_root", lambda: str(project_root()))
