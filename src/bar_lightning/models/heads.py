"""The generator's heads behind one interface, and the registry that `model.head` names.

A head turns the latent condition of one AR step (`[N, 1, W]`) into that step's `C` bits. `BARGenerator` and the
sampler only use the methods below, so adding a head is one new file with a class that has them, plus one line
in `GENERATOR_HEADS`:

* `build(*, bits_per_step, width, num_layers)` (classmethod): the head for a model's settings;
* `forward(target_bits [N, C], conditions [N, 1, W], generator=None, align_matmuls=False)`: the training loss
  (the loss is the forward, so that an FSDP unit wrapping the head gathers its weights for it);
* `sample(conditions, *, guidance_scale, temperature, tokens_allocation, use_cfg, generator, logits_fn)`: `[N, C]`
  bits of one step, with classifier-free guidance on a doubled batch when `use_cfg`, without host reads;
* `sampling_allocation(tokens_allocation, bits_per_step)` (static; config validation calls it) and
  `check_tokens_allocation(tokens_allocation)`: the allocation as the head samples with it, or `ValueError` naming
  the fix; checked once where the settings are made, trusted by `sample`;
* `max_bits_per_step`: the largest step it supports (None: no limit), checked when a config is validated;
* `init_non_persistent_buffers(device)`, `zero_init_modulations()`: the parts of the generator's init that are the
  head's own (buffers not saved in checkpoints; adaLN-Zero modulations);
* `decode_logits()`: a compiled `logits` for the sampler's decode step (None: the head's own `logits`), and
  `aligned_mlp_weights()`: zero-padded aligned MLP weights for that step (None where there are none).
"""

from __future__ import annotations

from torch import nn

from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MaskBitModelingHead

GENERATOR_HEADS: dict[str, type[nn.Module]] = {"mbm": MaskBitModelingHead, "linear": LinearSoftmaxHead}


def build_generator_head(head: str, *, bits_per_step: int, width: int, num_layers: int) -> nn.Module:
    """The head `head` ("mbm": the paper's Masked Bit Modeling head; "linear": the softmax baseline)."""
    if head not in GENERATOR_HEADS:
        raise ValueError(f"head={head!r} is not a head; use one of {sorted(GENERATOR_HEADS)}")
    return GENERATOR_HEADS[head].build(bits_per_step=bits_per_step, width=width, num_layers=num_layers)
