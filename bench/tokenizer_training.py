"""Images/s, peak memory and MFU of the real train.py step of the full-size BAR-FSQ tokenizer.

The LightningModule and Trainer are built as train.py builds them (`build_tokenizer_job`, `build_trainer`) for
`experiment=bar_fsq_16bits` at 256 px, the official per-GPU batch 32, bf16-mixed; the pretrained networks (VGG16,
LPIPS heads, ConvNeXt-S, DINO ViT-S/8, SigLIP2) are random stand-ins written by `bar_lightning.stand_in_weights`
into a temporary `paths.pretrained_dir`, read by the same loaders a user's real files go through. Synthetic images
(no decoding cost). Two phases:

* `generator`: before `discriminator_start` (autoencoder steps only);
* `gan`: G and D alternate from the first step (each takes one batch); the rate is batch / mean step time.

    python bench/tokenizer_training.py --phases generator,gan --variants eager,compile --out tokenizer.json

TFLOP/s counts the matrix products and convolutions of one G step (forward and backward of the tokenizer and
every loss network, measured with torch.utils.flop_counter on one batch), MFU is against the card's dense bf16
rate (`--peak-tflops`). The float32 matmul precision is the config's `float32_matmul_precision` ("high": TF32, as
train.py sets it and as the official recipe enables TF32); `--profile` records the device kernels of two batches
after the timed ones (torch.profiler, by kernel family), `--memory-snapshot` what is alive at the peak of two more
(bench/memory_snapshot.py). On CPU: `--experiment tiny_tokenizer --batch 4` as a smoke
test.

Timing: common.StepTimer records a CUDA event at every batch start (no synchronisation between steps, as in a
real run, where the host queues the next step while the GPU runs this one); a step is the time from its start event
to the next. Rows recorded before 2026-12-07's sixth session synchronised the GPU at both ends of every step, which
charged the host's loop between steps to each step.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import compile_cache
import lightning as L
import torch
from common import (
    BatchWindow,
    MemoryWindow,
    StepProfiler,
    StepTimer,
    compose_experiment,
    machine,
    print_kernel_table,
    print_table,
    write_results,
)
from turns import Turns, row_fields, turn_batch

from bar_lightning.run import build_tokenizer_job, build_trainer
from bar_lightning.stand_in_weights import write_stand_in_weights

# training.compile_mode is automatic (CUDA graphs on one GPU), so the compiled variants without graphs name default.
COMPILED_WITHOUT_GRAPHS = ["training.compile=true", "training.compile_mode=default"]
VARIANTS: dict[str, list[str]] = {
    # training.compile is on by default (conf/training/tokenizer.yaml), so the eager variants turn it off.
    "eager": ["training.compile=false"],
    "eager+unfused_adamw": ["training.compile=false", "optim.fused=false"],
    "compile": COMPILED_WITHOUT_GRAPHS,
    # cuDNN's autotuner for the fixed-shape convolutions (VGG16, ConvNeXt-S, the decoder's output conv), as the
    # official recipe sets torch.backends.cudnn.benchmark; train.py's default leaves it off (trainer.benchmark=null).
    "compile+cudnn_benchmark": [*COMPILED_WITHOUT_GRAPHS, "trainer.benchmark=true"],
    # The discriminator compiled as well (the official recipe compiles it inside its loss module); G/D phase.
    "compile+discriminator": [*COMPILED_WITHOUT_GRAPHS, "training.compile_discriminator=true"],
    # The tokenizer's and the loss's compiled forwards and backwards replayed as CUDA graphs: the lever for the
    # device's idle time between kernels (28.5 of 202.8 ms per step in the profile of docs/benchmarks.md, 5e).
    "compile+cuda_graphs": ["training.compile=true", "training.compile_mode=reduce-overhead"],
    # train.py's defaults, nothing overridden: compiled, training.compile_mode automatic (CUDA graphs on one GPU).
    "default": [],
}


def generator_step_flops(module: Any, batch: int, image_size: int, device: torch.device) -> float:
    """FLOPs of one autoencoder step (forward and backward of the tokenizer and the losses) on `batch` images."""
    from torch.utils.flop_counter import FlopCounterMode

    module.to(device).train()
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    # bf16 autocast as the step runs it (on CPU, where some resampling kernels lack bf16, in float32)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16,
                                                                   enabled=device.type == "cuda"):
        output = module.tokenizer(images)
        total, _ = module.loss(output.reconstruction, images, output.clip_prediction, output.clip_target)
        total.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class TakeTurn(BatchWindow):
    """Waits for the other processes of a group (bench/turns.py) before the batch `first_batch` (`turn_batch`); the
    wait falls in a warm-up batch."""

    def __init__(self, turns: Turns, first_batch: int) -> None:
        super().__init__(first_batch, 1)
        self.turns = turns

    def begin(self) -> None:
        self.turns.arrive_and_take_turn()

    def end(self) -> None:
        pass


def run_variant(phase: str, name: str, args: argparse.Namespace, turns: Turns | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    # Profiled batches, then batches with the allocator history, come after the timed ones.
    total_steps = args.warmup + args.timed + (2 if args.profile else 0) + (2 if args.memory_snapshot else 0)
    pretrained = Path(tempfile.mkdtemp(prefix="stand_in_pretrained_"))
    overrides = [
        "trainer=gpu" if cuda else "trainer=cpu", f"trainer.precision={'bf16-mixed' if cuda else '32-true'}",
        "data=synthetic_images",
        f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "data.pin_memory=true",
        f"data.synthetic_num_samples={args.batch * (total_steps + 2)}", f"trainer.max_steps={total_steps}",
        "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=50", f"paths.pretrained_dir={pretrained}",
        f"training.discriminator_start={0 if phase == 'gan' else 10**9}", *VARIANTS[name], *args.override,
    ]
    cfg = compose_experiment(args.experiment, overrides, output_dir=f"/tmp/bar_bench/tokenizer_{phase}_{name}")
    write_stand_in_weights(cfg)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)  # as train.py (run._fit) sets it
    L.seed_everything(0)
    module, datamodule = build_tokenizer_job(cfg)
    device = torch.device("cuda" if cuda else "cpu")
    flops = generator_step_flops(module, args.flop_batch, cfg.model.image_size, device) / args.flop_batch
    timer = StepTimer()
    trainer = build_trainer(cfg, enable_checkpointing=False)
    if turns is not None:  # before the timer, so that the wait ends before the next batch's start is marked
        trainer.callbacks.append(TakeTurn(turns, turn_batch(args.warmup)))
    trainer.callbacks.append(timer)
    profiler = StepProfiler(args.warmup + args.timed) if args.profile else None
    if profiler is not None:
        trainer.callbacks.append(profiler)
    memory = MemoryWindow(args.warmup + args.timed + (2 if args.profile else 0)) if args.memory_snapshot else None
    if memory is not None:
        trainer.callbacks.append(memory)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    timed = timer.durations[args.warmup : args.warmup + args.timed]
    step = statistics.median(timed) if phase == "generator" else statistics.fmean(timed)
    row = {
        "code": "bar_lightning", "experiment": args.experiment, "phase": phase, "variant": name, "batch": args.batch,
        "step_s": step, "images_per_s": args.batch / step, "step_durations_s": timer.durations,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "generator_step_gflop_per_image": flops / 1e9,
        **row_fields(turns, sum(timer.durations[:args.warmup])),
        "wall_s": wall, "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "timing": "stream events at batch starts",
    }
    # MFU of the autoencoder step (the D step is cheaper: the tokenizer runs forward only, without gradients).
    if phase == "generator":
        row["tflops"] = flops * args.batch / step / 1e12
        row["mfu_vs_bf16_peak"] = row["tflops"] / args.peak_tflops
    if profiler is not None and profiler.table is not None:
        row["profile"] = profiler.table
        print_kernel_table(profiler.table)
    if memory is not None and memory.summary is not None:
        from memory_snapshot import print_summary

        row["memory"] = memory.summary
        print_summary(memory.summary)
    del module, datamodule, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_fsq_16bits")
    parser.add_argument("--phases", default="generator,gan")
    parser.add_argument("--variants", default="eager,compile")
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch (the official recipe's 32)")
    parser.add_argument("--flop-batch", dest="flop_batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--timed", type=int, default=12)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=790.0,
                        help="dense bf16 matmul rate measured on this GPU (H200: ~790, docs/benchmarks.md)")
    parser.add_argument("--profile", action="store_true", help="kernel table of two batches after the timed ones")
    parser.add_argument("--memory-snapshot", dest="memory_snapshot", action="store_true",
                        help="what is alive at the peak of two batches after the timed ones (CUDA only)")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "rows": []}
    # Each run sets the config's float32 matmul precision (as train.py) after this block is read: its row records
    # the precision the step ran with, so the process state at start would only mislead here.
    for key in ("tf32_matmul", "float32_matmul_precision"):
        results["machine"].pop(key, None)
    turns = Turns.from_environment()
    compile_cache.load("ours_tokenizer")
    for phase in args.phases.split(","):
        for name in args.variants.split(","):
            try:
                row = run_variant(phase, name, args, turns)
            except Exception as error:  # report and go on with the other variants
                row = {"phase": phase, "variant": name, "error": f"{type(error).__name__}: {error}"[:800]}
                gc.collect()
            row["compile_cache"] = compile_cache.loaded_artifacts()
            print({k: v for k, v in row.items() if k not in ("step_durations_s", "profile", "memory")}, flush=True)
            results["rows"].append(row)
            write_results(args.out, results)
    print(f"\ntokenizer training, {results['machine'].get('gpu')}, torch {torch.__version__}, bf16-mixed")
    print_table(results["rows"], ["phase", "variant", "batch", "images_per_s", "step_s", "peak_memory_gib", "tflops",
                                  "mfu_vs_bf16_peak", "first_steps_s", "error"])
    compile_cache.save(compile_cache.key_of("ours_tokenizer", args.experiment, args.phases, args.variants))


if __name__ == "__main__":
    main()
