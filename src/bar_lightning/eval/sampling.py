"""Helpers to lay out a class-balanced sample set and pick the device; the model loaders live in
`lightning/model_sources.py` (re-exported here)."""

from __future__ import annotations

import torch

from bar_lightning.lightning.model_sources import (  # noqa: F401 - re-exported for evaluate.py and the app
    load_generator_from_source,
    load_tokenizer_from_source,
    upstream_config,
)


def balanced_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """`per_class` samples of every class, grouped by class (ADM order: class c fills rows c*n .. c*n + n - 1)."""
    return torch.tensor(list(classes)).repeat_interleave(per_class)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
