"""Sampling speed of a named experiment on this GPU: images/s of each fast-path variant, their agreement with the
eager reference loop, the decoder's cost, a kernel-time profile and the compute / memory floors.

    python bench/sampling.py --experiment bar_b --batch 256 --decoder --check --profile --out results.json

Protocol (as the official benchmark): random dense weights, `--warmup` batches excluded (they include compilation
and CUDA-graph capture, reported separately as `first_call_s`), synchronised, median over `--timed` batches.
Variants: eager (the plain loop), graph (one CUDA graph per batch), graph+compile (the default of evaluate.py),
graph+compile+bf16 (bf16 autocast and KV cache).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import (
    compose_experiment,
    kernel_table,
    machine,
    matmul_weights_per_row,
    median,
    print_kernel_table,
    print_table,
    random_generator_on,
    randomise_,
    synchronize,
    time_calls,
    write_results,
)

from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.mbm_head import MASK_ID

VARIANTS = {
    "eager": dict(cuda_graph=False, compile=False, precision="fp32"),
    "graph": dict(cuda_graph=True, compile=False, precision="fp32"),
    "graph+compile": dict(cuda_graph=True, compile=True, precision="fp32"),
    "graph+compile+bf16": dict(cuda_graph=True, compile=True, precision="bf16"),
    # The default path without the aligned head MLP, to show what it buys.
    "graph+compile-align_head": dict(cuda_graph=True, compile=True, precision="fp32", align_head=False),
    "graph+compile+bf16-align_head": dict(cuda_graph=True, compile=True, precision="bf16", align_head=False),
    "eager+bf16": dict(cuda_graph=False, compile=False, precision="bf16"),
}


def sampling_flops_and_bytes(model: BARGenerator, batch: int, use_cfg: bool, allocation: list[int]) -> dict[str, float]:
    """Matmul FLOPs of one batch and the KV-cache bytes its attention must read (float32 cache)."""
    rows = batch * (2 if use_cfg else 1)
    backbone_params, head_params = matmul_weights_per_row(model)
    positions = model.prefix_len + model.num_steps - 1
    backbone = 2 * rows * positions * backbone_params
    head = 2 * rows * model.num_steps * len(allocation) * head_params
    width = model.hidden_size
    kv_positions_read = sum(model.prefix_len + step for step in range(1, model.num_steps))
    kv_bytes = rows * kv_positions_read * len(model.blocks) * 2 * width * 4
    return {"matmul_flop": float(backbone + head), "kv_read_bytes_fp32": float(kv_bytes)}


def measure_ceilings() -> dict[str, float]:
    """Dense TF32 / bf16 matmul rates and device-copy bandwidth on random data (the floors' denominators)."""
    size = 8192
    out = {}
    for name, dtype, tf32 in (("tf32_tflops", torch.float32, True), ("bf16_tflops", torch.bfloat16, False)):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
        durations = time_calls(lambda _, a=a, b=b: a @ b, warmup=3, timed=10)
        out[name] = 2 * size**3 / median(durations) / 1e12
        torch.backends.cuda.matmul.allow_tf32 = previous
    source = torch.randn(2**30, device="cuda")  # 4 GiB
    target = torch.empty_like(source)
    durations = time_calls(lambda _: target.copy_(source), warmup=2, timed=10)
    out["copy_tb_per_s"] = 2 * source.numel() * 4 / median(durations) / 1e12
    return out


def use_variant(model: BARGenerator, variant: dict) -> None:
    """Set the model's decode functions to the variant's (a fresh compilation per variant)."""
    model.compile_decode(False)
    model.compile_decode(variant["compile"], align_head=variant.get("align_head", True))


def generate(model: BARGenerator, labels: torch.Tensor, sampling: Any, seed: int, variant: dict) -> torch.Tensor:
    rng = torch.Generator(device=labels.device).manual_seed(seed)
    return model.generate(
        labels, guidance_scale=float(sampling.guidance_scale), temperature=float(sampling.temperature),
        tokens_allocation=list(sampling.tokens_allocation), random_order=bool(sampling.random_order), generator=rng,
        cuda_graph=variant["cuda_graph"] and labels.is_cuda, precision=variant["precision"],
    )


@torch.no_grad()
def teacher_forced_agreement(model: BARGenerator, bits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """bf16 vs fp32 on the same inputs: relative error of the head's logits (all bits masked) and argmax agreement."""
    outputs = []
    for dtype in (None, torch.bfloat16):
        with torch.autocast(bits.device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            latents = model.latent_conditions(bits, labels)[:, :-1]  # [B, L, W]
            conditions = latents.reshape(-1, 1, latents.shape[-1])
            ids = torch.full((conditions.shape[0], model.bits_per_step), MASK_ID, device=bits.device)
            ratio = torch.ones(conditions.shape[0], device=bits.device)
            outputs.append(model.lm_head.logits(ids, conditions, ratio).float())
    reference, low = outputs
    return {
        "bf16_logit_relative_error": float((low - reference).norm() / reference.norm()),
        "bf16_argmax_agreement": float((low.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def kernel_profile(model: BARGenerator, labels: torch.Tensor, sampling: Any, variant: dict,
                   top: int = 25) -> dict[str, Any]:
    """Device time of one batch by kernel family (matmul / attention / fused Triton / other) and the `top` kernels,
    run without the CUDA graph (the same kernels; the graph only removes the launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    eager_variant = {**variant, "cuda_graph": False}
    generate(model, labels, sampling, 0, eager_variant)
    synchronize()
    start = time.perf_counter()
    activity = ProfilerActivity.CUDA if labels.is_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        generate(model, labels, sampling, 0, eager_variant)
        synchronize()
    wall = time.perf_counter() - start
    result = kernel_table(prof, labels.is_cuda, top)
    result["profile_wall_s_with_profiler"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--variants", default="eager,graph,graph+compile,graph+compile+bf16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--decoder", action="store_true", help="also time the BAR-FSQ ViT-L decoder (end to end)")
    parser.add_argument("--check", action="store_true", help="compare each variant's bits with the eager loop")
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of --profile-variant")
    parser.add_argument("--profile-variant", dest="profile_variant", default="graph+compile")
    parser.add_argument("--ceilings", action="store_true", help="measure matmul rates and copy bandwidth first")
    parser.add_argument("--override", action="append", default=[], help="extra config overrides")
    parser.add_argument("--decoder-override", dest="decoder_overrides", action="append", default=[],
                        help="tokenizer config overrides (CPU smoke runs shrink the decoder)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as the reference figures were taken
    cfg = compose_experiment(args.experiment, args.override)
    # CPU runs only smoke-test this script (tiny experiments); CUDA graphs then fall back to the eager loop.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_generator_on(device, **cfg.model).eval()
    sampling = cfg.sampling
    allocation = list(sampling.tokens_allocation) if model.head_type == "mbm" else [model.bits_per_step]
    labels = torch.arange(args.batch, device=device) % model.num_classes
    results: dict[str, Any] = {"machine": machine(), "experiment": args.experiment, "batch": args.batch,
                               "sampling": {k: sampling[k] for k in ("guidance_scale", "temperature",
                                                                     "tokens_allocation", "random_order")},
                               "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "variants": []}
    results.update(sampling_flops_and_bytes(model, args.batch, float(sampling.guidance_scale) > 1.0, allocation))
    if args.ceilings and device.type == "cuda":
        results["ceilings"] = measure_ceilings()
        print("ceilings:", results["ceilings"], flush=True)

    reference_bits = None
    rows = []
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        use_variant(model, variant)
        row: dict[str, Any] = {"variant": name}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            bits = generate(model, labels, sampling, 0, variant)
            synchronize()
            row["first_call_s"] = time.perf_counter() - start
            durations = time_calls(lambda i, v=variant: generate(model, labels, sampling, 1 + i, v),
                                   warmup=max(0, args.warmup - 1), timed=args.timed)
            row["median_batch_s"] = median(durations)
            row["images_per_s"] = args.batch / row["median_batch_s"]
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if args.check:
                if name == "eager":
                    reference_bits = bits
                elif reference_bits is not None:
                    row["bits_equal_to_eager"] = float((bits == reference_bits).float().mean())
        except Exception as error:  # a failed variant is reported, the others still run
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        rows.append(row)
        results["variants"].append(row)
        print(row, flush=True)
        write_results(args.out, results)

    if args.check:
        subset = slice(0, min(32, args.batch))
        bits = generate(model, labels, sampling, 0, VARIANTS["eager"])
        results["agreement"] = teacher_forced_agreement(model, bits[subset], labels[subset])
        print("agreement:", results["agreement"], flush=True)
    if args.profile:
        variant = VARIANTS[args.profile_variant]
        use_variant(model, variant)
        results["profile"] = kernel_profile(model, labels, sampling, variant)
        results["profile"]["variant"] = args.profile_variant
        print_kernel_table(results["profile"])
    if args.decoder:
        results["decoder"] = time_decoder(model, labels, sampling, args)
        print("decoder:", results["decoder"], flush=True)
    write_results(args.out, results)
    print(f"\n{args.experiment} sampling, batch {args.batch}, {results['machine'].get('gpu')}, torch "
          f"{torch.__version__}, matmul FLOP/batch {results['matmul_flop']:.3g}, KV bytes/batch "
          f"{results['kv_read_bytes_fp32']:.3g}")
    print_table(rows, ["variant", "images_per_s", "median_batch_s", "first_call_s", "peak_memory_gib",
                       "bits_equal_to_eager", "error"])


def time_decoder(model: BARGenerator, labels: torch.Tensor, sampling: Any, args: argparse.Namespace) -> dict:
    """Decode-only images/s of the BAR-FSQ ViT-L decoder (random weights), fp32 and bf16, and end to end."""
    from bar_lightning.models.registry import build_tokenizer

    tokenizer_cfg = compose_experiment("bar_fsq_16bits").model
    if args.decoder_overrides:
        tokenizer_cfg = compose_experiment("bar_fsq_16bits", args.decoder_overrides).model
    device = labels.device
    tokenizer = randomise_(build_tokenizer(dict(tokenizer_cfg), build_encoder=False)).to(device).eval()
    bits = torch.randint(0, 2, (args.batch, tokenizer.num_tokens * tokenizer.bits_per_token), device=device)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                durations = time_calls(lambda _: tokenizer.decode_bits(bits), warmup=2, timed=5)
            out[f"decode_{precision}_images_per_s"] = args.batch / median(durations)
        if (tokenizer.num_tokens, tokenizer.bits_per_token) != (model.num_tokens, model.bits_per_token):
            return out  # this generator's tokens are not the BAR-FSQ 16-bit tokenizer's: decode-only figures
        variant = VARIANTS["graph+compile"]
        model.compile_decode(True)

        def end_to_end(index: int) -> None:
            tokenizer.decode_bits(generate(model, labels, sampling, index, variant))

        durations = time_calls(end_to_end, warmup=1, timed=args.timed)
        out["end_to_end_fp32_images_per_s"] = args.batch / median(durations)
    return out


if __name__ == "__main__":
    main()
