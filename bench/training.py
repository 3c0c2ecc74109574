"""Training speed of a named experiment on this GPU: images/s, peak memory and MFU of the real train.py step.

    python bench/training.py --experiment bar_b --batch 128 --variants eager,compile --out results.json

Each variant builds the LightningModule and the Trainer exactly as train.py does (bf16 autocast, AdamW (fused on
CUDA), gradient clipping 1.0, random generation orders, class dropout) on synthetic tokens, runs `--warmup` steps
(compilation included) and then `--timed` steps; a callback times every optimiser step with CUDA events at the batch
starts (common.StepTimer: no synchronisation between steps, as in a real run; rows before 2026-12-07's sixth
session synchronised at both ends of every step); the median is reported. Peak memory is torch's max allocated (the caching allocator reserves a little more).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import compile_cache
import torch
from common import (
    StepProfiler,
    StepTimer,
    compose_experiment,
    machine,
    matmul_weights_per_row,
    median,
    print_kernel_table,
    print_table,
    randomise_,
    write_results,
)

from bar_lightning.run import build_generator_job, build_trainer

VARIANTS = {
    "eager": ["training.compile=false"],
    # The default compiled step: CUDA graphs on one GPU (training.compile_mode=null -> reduce-overhead).
    "compile": ["training.compile=true"],
    "compile+no_cuda_graphs": ["training.compile=true", "training.compile_mode=default"],
    "compile+checkpoint": ["training.compile=true", "model.use_checkpoint=true"],
    "compile+max_autotune": ["training.compile=true", "training.compile_mode=max-autotune-no-cudagraphs"],
    "compile+cuda_graphs": ["training.compile=true", "training.compile_mode=reduce-overhead"],
    # Inductor options (these resolve the compile mode to "default": compare with compile+no_cuda_graphs).
    "compile+cpp_wrapper": ["training.compile=true", "+training.compile_options.cpp_wrapper=true"],
    "compile+coordinate_descent": ["training.compile=true", "+training.compile_options.coordinate_descent_tuning=true"],
    "compile+cuda_graphs+coordinate_descent": [
        "training.compile=true", "+training.compile_options.triton.cudagraphs=true",
        "+training.compile_options.coordinate_descent_tuning=true",
    ],
    "compile+unaligned_head": ["training.compile=true", "training.align_head_matmuls=false"],
    # The distributed strategies on one GPU (one process): the code paths of trainer=ddp / trainer=fsdp.
    "ddp": ["trainer=ddp", "trainer.devices=1", "training.compile=false"],
    "fsdp": ["trainer=fsdp", "trainer.devices=1", "training.compile=false"],
}


def training_flops_per_sample(model: Any) -> float:
    """Matmul + attention FLOPs of forward and backward (3x forward) for one training sample."""
    positions = model.prefix_len + model.num_steps
    backbone_weights, head_weights = matmul_weights_per_row(model)
    backbone = 2 * positions * backbone_weights
    attention = len(model.blocks) * 2 * 2 * positions * positions / 2 * model.hidden_size  # causal: half the pairs
    head = 2 * model.num_steps * head_weights
    projections = 2 * positions * (model.input_merge.weight.numel() + model.latent_condition_proj.weight.numel())
    return 3.0 * (backbone + attention + head + projections)


def run_variant(experiment: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    trainer_choice = [] if any(o.startswith("trainer=") for o in VARIANTS[name]) else [
        "trainer=gpu" if torch.cuda.is_available() else "trainer=cpu"]
    total_steps = args.warmup + args.timed + (2 if args.profile else 0)  # profiled steps come after the timed ones
    overrides = [
        *trainer_choice, "data=synthetic_tokens", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        "data.pin_memory=true", "data.synthetic_num_samples=4096", f"trainer.max_steps={total_steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=50",
        *VARIANTS[name], *args.override,
    ]
    cfg = compose_experiment(experiment, overrides, output_dir=f"/tmp/bar_bench/{experiment}_{name}")
    module, datamodule = build_generator_job(cfg)
    randomise_(module.generator)
    timer = StepTimer()
    trainer = build_trainer(cfg, enable_checkpointing=False)
    trainer.callbacks.append(timer)
    # Profiled steps come after the timed ones (the profiler's own cost stays out of the timings).
    profiler = StepProfiler(args.warmup + args.timed) if args.profile else None
    if profiler is not None:
        trainer.callbacks.append(profiler)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    timed = timer.durations[args.warmup : args.warmup + args.timed]
    step = median(timed)
    flops = training_flops_per_sample(module.generator)
    row = {
        "experiment": experiment, "variant": name, "batch": args.batch, "median_step_s": step,
        "images_per_s": args.batch / step,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "tflops": flops * args.batch / step / 1e12, "first_steps_s": sum(timer.durations[: args.warmup]),
        "wall_s": wall, "timing": "stream events at batch starts",
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    row["mfu_vs_measured_bf16"] = row["tflops"] / args.peak_tflops
    if profiler is not None and profiler.table is not None:
        row["profile"] = profiler.table
        print_kernel_table(profiler.table)
    del module, datamodule, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default="bar_b")
    parser.add_argument("--variants", default="eager,compile")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--timed", type=int, default=12)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=790.0,
                        help="dense bf16 matmul rate measured on this GPU (H200 here: ~790)")
    parser.add_argument("--profile", action="store_true", help="kernel table of two steps after the timed ones")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    results: dict[str, Any] = {"machine": machine(), "rows": []}
    compile_cache.load("ours_training")
    for experiment in args.experiments.split(","):
        for name in args.variants.split(","):
            try:
                row = run_variant(experiment, name, args)
            except Exception as error:  # report and go on with the other variants
                row = {"experiment": experiment, "variant": name, "error": f"{type(error).__name__}: {error}"[:500]}
                gc.collect()
            row["compile_cache"] = compile_cache.loaded_artifacts()
            print({k: v for k, v in row.items() if k != "profile"}, flush=True)
            results["rows"].append(row)
            write_results(args.out, results)
    print(f"\ntraining, {results['machine'].get('gpu')}, torch {torch.__version__}, bf16-mixed, AdamW, clip 1.0")
    print_table(results["rows"], ["experiment", "variant", "batch", "images_per_s", "median_step_s",
                                  "peak_memory_gib", "tflops", "mfu_vs_measured_bf16", "first_steps_s", "error"])
    compile_cache.save(compile_cache.key_of("ours_training", args.experiments, args.variants))


if __name__ == "__main__":
    main()
