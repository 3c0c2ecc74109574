"""Which class builds which network, by the name a config gives it: one line per family, so adding a tokenizer
family, a discriminator or a generator head is one new file plus one line here.

The registries sit below `config/` so that config validation can check keyword arguments against the classes
without importing the training code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bar_lightning.models.conv_tokenizer import ConvFSQTokenizer
from bar_lightning.models.discriminator import DinoDiscriminator, PatchDiscriminator
from bar_lightning.models.tokenizer import BarFSQTokenizer

TOKENIZER_FAMILIES: dict[str, type[nn.Module]] = {"bar_fsq": BarFSQTokenizer, "conv": ConvFSQTokenizer}
DISCRIMINATOR_KINDS: dict[str, type[nn.Module]] = {"dino": DinoDiscriminator, "patch": PatchDiscriminator}


def build_tokenizer(config: dict[str, Any], **overrides: Any) -> nn.Module:
    """`config` = {"family": "bar_fsq" | "conv", **keyword arguments of that class}."""
    kwargs = {**config, **overrides}
    family = kwargs.pop("family")
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(f"model.family={family!r} is not a tokenizer family; use one of {sorted(TOKENIZER_FAMILIES)}")
    return TOKENIZER_FAMILIES[family](**kwargs)


def build_discriminator(config: dict[str, Any]) -> nn.Module:
    """`config` = {"kind": "dino" | "patch", **keyword arguments of that class}."""
    kwargs = dict(config)
    kind = kwargs.pop("kind")
    if kind not in DISCRIMINATOR_KINDS:
        raise ValueError(f"discriminator.kind={kind!r} is unknown; use one of {sorted(DISCRIMINATOR_KINDS)}")
    return DISCRIMINATOR_KINDS[kind](**kwargs)
