"""The paper's memory claim: peak memory and step time of the MBM head versus the linear (softmax) head at BAR-B
width, for 10..20 bits per token.

    python bench/head_memory.py --bits 10,12,14,16,18,20 --batch 128 --out results.json

One training step = forward (bf16 autocast), backward, gradient clipping and a fused AdamW step on a full BAR-B
backbone with the given head; warm-up steps excluded, median of the timed ones. The linear head's output layer has
2^bits rows and its logits are `[batch * 256, 2^bits]`, so it runs out of memory where the MBM head grows only
linearly in the number of bits.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch
from common import (
    compose_experiment,
    machine,
    median,
    print_table,
    random_generator_on,
    time_calls,
    write_results,
)


def measure(model_kwargs: dict[str, Any], batch: int, warmup: int, timed: int) -> dict[str, Any]:
    device = torch.device("cuda")
    model = random_generator_on(device, **model_kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    bits = torch.randint(0, 2, (batch, model.num_tokens * model.bits_per_token), device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    def step(_: int) -> None:
        orders = model.sample_orders(batch, 1.0, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(bits, labels, orders)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    durations = time_calls(step, warmup=warmup, timed=timed)
    return {"step_s": median(durations), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "head_parameters_m": sum(p.numel() for p in model.lm_head.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_b")
    parser.add_argument("--bits", default="10,12,14,16,18,20")
    parser.add_argument("--heads", default="mbm,linear")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    base = dict(compose_experiment(args.experiment).model)
    results: dict[str, Any] = {"machine": machine(), "batch": args.batch, "rows": []}
    for bits in (int(b) for b in args.bits.split(",")):
        for head in args.heads.split(","):
            row: dict[str, Any] = {"bits_per_token": bits, "head": head}
            try:
                row.update(measure({**base, "bits_per_token": bits, "head": head}, args.batch, args.warmup, args.timed))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            gc.collect()
            torch.cuda.empty_cache()
            print(row, flush=True)
            results["rows"].append(row)
            write_results(args.out, results)
    print(f"\nhead memory, {args.experiment} backbone, batch {args.batch}, bf16 autocast, {results['machine'].get('gpu')}")
    print_table(results["rows"], ["bits_per_token", "head", "peak_memory_gib", "step_s", "head_parameters_m", "error"])


if __name__ == "__main__":
    main()
