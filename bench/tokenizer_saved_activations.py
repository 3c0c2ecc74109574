"""Where the activation memory (and the compute) of one tokenizer generator step goes: ours beside the official code,
per module.

The eager tokenizer step of bar_lightning peaked 1.7 GiB above the official eager step on the H100 (generator phase,
batch 32; docs/benchmarks.md, issue 16). Parameters, gradients and optimiser states are the same size in both codes
(the EMA is smaller in ours), so the gap is in the tensors autograd saves for the backward pass. This script runs one
forward of the autoencoder and its generator-phase losses for each code and sums, per top-level module, the bytes of
every tensor saved for backward (each storage counted once, where it is first saved), then prints both side by side.
`--measure flops` counts instead the FLOPs of that forward and its backward per module (torch.utils.flop_counter:
matrix products, convolutions and attention), to check that both codes do the same work, so that a speed ratio
between them is a ratio of efficiency.

    python bench/tokenizer_saved_activations.py --batch 1 --out saved.json            # full size, CPU: ~2 min, ~16 GB
    python bench/tokenizer_saved_activations.py --measure flops --batch 1 --out flops.json
    python bench/tokenizer_saved_activations.py --experiment tiny_tokenizer --codes ours  # smoke test

The official code runs from the export in `.upstream/bar` with the replacements of `bench/official_tokenizer.py`
(random same-shape networks for its downloads). On CPU the step runs in float32 (some resampling kernels lack
bf16 there), so absolute figures are about twice the bf16 step's for the matrix-product inputs; the comparison is
between the two codes under the same precision. On CUDA it runs under bf16 autocast, as training does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import compose_experiment, machine, write_results

ROOT = Path(__file__).resolve().parents[1]


class SavedTensorLedger:
    """Bytes saved for backward, attributed to the innermost module path (cut to `depth` names) that saved them."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.bytes_by_module: dict[str, int] = defaultdict(int)
        self.seen: set[tuple[int, int]] = set()
        self.stack: list[str] = []
        self.weight_storages: set[int] = set()

    def track(self, root: torch.nn.Module, prefix: str) -> list[Any]:
        handles = []
        for name, module in root.named_modules():
            path = ".".join(filter(None, [prefix, name]))
            # weights saved for backward (or views of them) are the network's memory, not activations
            self.weight_storages.update(t.untyped_storage().data_ptr()
                                        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
            handles.append(module.register_forward_pre_hook(lambda _m, _i, p=path: self.enter(p)))
            handles.append(module.register_forward_hook(lambda _m, _i, _o: self.leave()))
            # bar_lightning keeps frozen loss networks outside the module tree (models/pretrained.py)
            for frozen_name, network in getattr(module, "_frozen_networks", {}).items():
                handles += self.track(network, f"{path}.{frozen_name}")
        return handles

    def enter(self, path: str) -> None:  # hooks return None so that inputs and outputs pass unchanged
        self.stack.append(path)

    def leave(self) -> None:
        self.stack.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in self.seen and storage.nbytes() > 0 and key[0] not in self.weight_storages:
                self.seen.add(key)
                where = self.stack[-1] if self.stack else "(outside any module)"
                self.bytes_by_module[".".join(where.split(".")[: self.depth])] += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield


def measure(step: Callable[[], torch.Tensor], roots: dict[str, torch.nn.Module], depth: int,
            device: torch.device) -> dict[str, Any]:
    ledger = SavedTensorLedger(depth)
    handles = [h for prefix, root in roots.items() for h in ledger.track(root, prefix)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with ledger.recording(), autocast:
            loss = step()
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    total = sum(ledger.bytes_by_module.values())
    return {"saved_bytes_total": total, "saved_bytes_by_module": dict(sorted(ledger.bytes_by_module.items(),
                                                                             key=lambda kv: -kv[1]))}


def flops_by_module(step: Callable[[], torch.Tensor], roots: dict[str, torch.nn.Module], depth: int,
                    device: torch.device) -> dict[str, Any]:
    """FLOPs of `step()` and its backward: the total, and per module path of at most `depth` names as
    FlopCounterMode reports them (a parent's figure includes its children's; modules called from outside their
    parent's tree, such as bar_lightning's frozen loss networks, are also listed under their class name)."""
    from torch.utils.flop_counter import FlopCounterMode

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with FlopCounterMode(display=False, depth=depth) as counter:
        with autocast:
            loss = step()
        loss.backward()
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()
              if name != "Global" and name.count(".") < depth}
    return {"flops_total": counter.get_total_flops(),
            "flops_by_module": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


MEASURES = {"saved": measure, "flops": flops_by_module}


def ours(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bar_lightning.run import build_tokenizer_job
    from bar_lightning.stand_in_weights import write_stand_in_weights

    pretrained = Path(tempfile.mkdtemp(prefix="stand_in_pretrained_"))
    cfg = compose_experiment(args.experiment, ["trainer=cpu", "data=synthetic_images", "data.num_workers=0",
                                               f"paths.pretrained_dir={pretrained}", "training.compile=false"],
                             output_dir="/tmp/bar_bench/saved_activations")
    write_stand_in_weights(cfg)
    torch.manual_seed(0)
    module, _ = build_tokenizer_job(cfg)
    module.to(device).train()
    images = torch.rand(args.batch, 3, cfg.model.image_size, cfg.model.image_size, device=device) * 2 - 1

    def step() -> torch.Tensor:
        output = module.tokenizer(images)
        total, _ = module.loss(output.reconstruction, images, output.clip_prediction, output.clip_target)
        return total

    return MEASURES[args.measure](step, {"tokenizer": module.tokenizer, "loss": module.loss}, args.depth, device)


def official(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from official_tokenizer import install_replacements

    official_root = Path(args.official).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="official_saved_"))
    here = os.getcwd()
    os.chdir(workdir)  # the official code reads assets/models/* relative to the working directory
    sys.path.insert(0, str(official_root))
    try:
        install_replacements(workdir)
        from modeling.modules import ReconstructionLoss, discriminator_dino
        from modeling.tokenizer import BAR_FSQ
        from omegaconf import OmegaConf

        if device.type == "cpu":  # the DINO discriminator's proxy defaults to "cuda"
            defaults = list(discriminator_dino.DinoDisc.__init__.__defaults__)
            defaults[defaults.index("cuda")] = "cpu"
            discriminator_dino.DinoDisc.__init__.__defaults__ = tuple(defaults)
        config = OmegaConf.load(official_root / "configs" / "tokenizer" / "bar_fsq_16bits.yaml")
        config.losses.discriminator_start = 10**9
        torch.manual_seed(0)
        model = BAR_FSQ(config).to(device).train()
        loss_module = ReconstructionLoss(config=config).to(device).train()
    finally:
        os.chdir(here)
    images = torch.rand(args.batch, 3, 256, 256, device=device) * 2 - 1

    def step() -> torch.Tensor:
        reconstruction, extra = model(images)
        total, _ = loss_module(images, reconstruction, extra, 0, mode="generator")
        return total

    return MEASURES[args.measure](step, {"tokenizer": model, "loss": loss_module}, args.depth, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_fsq_16bits")
    parser.add_argument("--codes", default="ours,official")
    parser.add_argument("--official", default=str(ROOT / ".upstream" / "bar"), help="export of the official code")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=2, help="module-path names kept when grouping")
    parser.add_argument("--measure", choices=sorted(MEASURES), default="saved",
                        help="saved: bytes saved for backward; flops: FLOPs of forward and backward")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for code in args.codes.split(","):
        row = {"code": code, "batch": args.batch, "measure": args.measure,
               **{"ours": ours, "official": official}[code](args, device)}
        rows.append(row)
        gc.collect()
        if args.measure == "saved":
            print(f"{code}: {row['saved_bytes_total'] / 2**20:.1f} MiB saved for backward at batch {args.batch}")
            for name, size in list(row["saved_bytes_by_module"].items())[:12]:
                print(f"    {name:<48} {size / 2**20:9.1f} MiB")
        else:
            print(f"{code}: {row['flops_total'] / 1e9:.1f} GFLOP (forward and backward) at batch {args.batch}")
            for name, flops in list(row["flops_by_module"].items())[:16]:
                print(f"    {name:<56} {flops / 1e9:9.1f} GFLOP")
    write_results(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
