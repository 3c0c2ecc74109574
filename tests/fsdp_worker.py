"""Worker of tests/test_fsdp.py, run with `torchrun --nproc_per_node 2` on CPU (gloo).

For each head (MBM, linear) and both FSDP parameter modes, wraps a small generator in FSDP with the units of
`trainer=fsdp` (`FULL_SHARD`, one unit per block and one for the head: each process holds half of every unit) and
records, next to an unwrapped copy: the training loss of a second micro-batch, the global gradient norm (FSDP's `clip_grad_norm_`, as the
module's clipping computes it) and the bits a preview samples inside `callbacks.full_weights`, twice (the weights
must be sharded again in between). Writes `<folder>/rank<r>.json`.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from bar_lightning.lightning.callbacks import full_weights
from bar_lightning.lightning.strategies import generator_block_wrap_policy
from bar_lightning.models.bar import BARGenerator


def run(head: str, use_orig_params: bool) -> dict:
    torch.manual_seed(0)
    model = BARGenerator(
        num_tokens=16, bits_per_token=4, hidden_size=32, num_layers=2, num_heads=4, head=head, head_width=32,
        head_layers=1, num_classes=10, repeat_class_condition=4,
    )
    with torch.no_grad():  # dense weights: a fresh model's zero adaLN makes every block the identity
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    reference = copy.deepcopy(model)
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy(generator_block_wrap_policy()), device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=use_orig_params,
    )
    local_numel = sum(p.numel() for p in wrapped.parameters())
    bits = torch.randint(0, 2, (6, 16 * 4), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    # Two micro-batches: after the first backward every unit is sharded again.
    for seed in (2, 4):
        loss = wrapped(bits, labels, None, torch.Generator().manual_seed(seed))
        loss.backward()
        reference_loss = reference(bits, labels, None, torch.Generator().manual_seed(seed))
        reference_loss.backward()
    reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))

    strategy = FSDPStrategy.__new__(FSDPStrategy)
    strategy._model = wrapped
    trainer = SimpleNamespace(strategy=strategy)
    settings = dict(guidance_scale=2.0, temperature=1.0, tokens_allocation=[1, 3])
    previews = []
    for _ in range(2):
        with full_weights(trainer, model), torch.no_grad():
            previews.append(model.generate(torch.tensor([7, 8]), generator=torch.Generator().manual_seed(3), **settings))
    with torch.no_grad():
        expected = reference.generate(torch.tensor([7, 8]), generator=torch.Generator().manual_seed(3), **settings)
    return {
        "local_numel": local_numel, "full_numel": sum(p.numel() for p in reference.parameters()),
        "loss": loss.item(), "reference_loss": reference_loss.item(),
        "gradient_norm": float(wrapped.clip_grad_norm_(float("inf"))), "reference_gradient_norm": float(reference_norm),
        "previews": [p.tolist() for p in previews], "reference_preview": expected.tolist(),
        "units_restored": all(isinstance(block, FullyShardedDataParallel) for block in model.blocks),
    }


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    records = {}
    for head in ("mbm", "linear"):
        for orig in (True, False):
            records[f"{head}/{orig}"] = run(head, orig)
            # A wrapped model sits in reference cycles (hooks): collect it here, while the process group and the
            # interpreter are alive. Gloo work objects freed later, during interpreter shutdown, can abort the
            # process ("terminate called without an active exception"), seen once on a CI machine.
            gc.collect()
            dist.barrier()
    (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
