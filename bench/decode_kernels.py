"""Where a BAR decode step spends its time, kernel by kernel (diagnosis for docs/benchmarks.md).

    python bench/decode_kernels.py --experiment bar_b --batch 256 --out results.json

1. Attention of one new position against a KV cache of length L (the cache slice layout `generate` uses), for every
   SDPA backend, a plain matmul formulation and, in float32, the sampler's Triton kernel (`ops/decode_attention.py`),
   float32 and bf16: microseconds per layer call.
2. The matrix products of one decode step (backbone and MBM head, M = CFG rows): microseconds and TFLOP/s.
3. The top kernels of one whole eager batch by device time (torch.profiler), float32 and bf16.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from common import compose_experiment, machine, median, random_generator_on, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from bar_lightning.ops.decode_attention import decode_attention, has_triton


def device_time_us(call, repeats: int = 20) -> float:
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return median(times)


def attention_candidates(rows: int, heads: int, head_dim: int, max_len: int, length: int, dtype) -> dict[str, float]:
    cache_k = torch.randn(rows, heads, max_len, head_dim, device="cuda", dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(rows, heads, 1, head_dim, device="cuda", dtype=dtype)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out: dict[str, float] = {}

    def matmul_attention():
        scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim**-0.5
        return torch.matmul(scores.softmax(-1), v)

    candidates = {"matmul": matmul_attention}
    for name, backend in (("sdpa_default", None), ("sdpa_math", SDPBackend.MATH),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def call(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        candidates[name] = call
    if dtype == torch.float32 and has_triton():
        candidates["triton"] = lambda: decode_attention(q, k, v)
    for name, call in candidates.items():
        try:
            result = call()
            error = float((result.double() - reference).norm() / reference.norm())
            out[name] = round(device_time_us(call), 1)
            out[name + "_relerr"] = error
        except Exception as failure:  # a backend that refuses these inputs
            out[name] = f"unsupported: {str(failure).splitlines()[0][:120]}"
    bytes_read = 2 * k.numel() * k.element_size()
    out["bandwidth_floor_us"] = round(bytes_read / 4.2e12 * 1e6, 1)
    return out


def gemm_shapes(model) -> list[tuple[str, int, int]]:
    block, head = model.blocks[0], model.lm_head
    shapes = [("adaLN", block.adaLN_modulation[-1]), ("qkv", block.attn.qkv), ("proj", block.attn.proj),
              ("w12", block.mlp.w12), ("w3", block.mlp.w3)]
    if hasattr(head, "transformer"):
        shapes += [("head.adaLN", head.transformer[0].adaLN_modulation[-1]), ("head.w12", head.transformer[0].mlp.w12),
                   ("head.w3", head.transformer[0].mlp.w3), ("head.input_proj", head.input_proj)]
    return [(name, layer.in_features, layer.out_features) for name, layer in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    cfg = compose_experiment(args.experiment)
    model = random_generator_on(torch.device("cuda"), **cfg.model).eval()
    rows = 2 * args.batch
    heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
    max_len = model.prefix_len + model.num_steps - 1
    results: dict[str, Any] = {"machine": machine(), "attention": {}, "gemm": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for length in (model.prefix_len + 1, (max_len + model.prefix_len) // 2, max_len):
            key = f"{str(dtype).split('.')[-1]}_L{length}"
            results["attention"][key] = attention_candidates(rows, heads, head_dim, max_len, length, dtype)
            print("attention", key, results["attention"][key], flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for name, k, n in gemm_shapes(model):
            a = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            us = device_time_us(lambda a=a, w=w: F.linear(a, w))
            key = f"{str(dtype).split('.')[-1]}_{name}_{rows}x{k}x{n}"
            results["gemm"][key] = {"us": round(us, 1), "tflops": round(2 * rows * k * n / us / 1e6, 1)}
            print("gemm", key, results["gemm"][key], flush=True)
    write_results(args.out, results)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        labels = torch.arange(args.batch, device="cuda") % model.num_classes
        sampling = cfg.sampling
        for precision in ("fp32", "bf16"):
            def run(precision=precision):
                return model.generate(labels, guidance_scale=float(sampling.guidance_scale),
                                      temperature=float(sampling.temperature),
                                      tokens_allocation=list(sampling.tokens_allocation), cuda_graph=False,
                                      precision=precision)
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
            top = [{"kernel": e.key[:110], "total_ms": round(e.device_time_total / 1000, 1), "count": e.count}
                   for e in events[:14]]
            total = sum(e.device_time_total for e in events) / 1000
            results[f"top_kernels_{precision}"] = {"total_ms": round(total, 1), "top": top}
            print(f"\ntop kernels {precision}: total device {total:.0f} ms")
            for row in top:
                print(f"  {row['total_ms']:9.1f} ms  x{row['count']:6d}  {row['kernel']}")
            write_results(args.out, results)


if __name__ == "__main__":
    main()
