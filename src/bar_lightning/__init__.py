"""bar_lightning: BAR (masked Bit AutoRegressive image generation) with Hydra and PyTorch Lightning."""

# Registers the `${bar_root:}` config resolver (conf/paths/default.yaml) before any config is composed.
from bar_lightning import paths as _paths  # noqa: F401
