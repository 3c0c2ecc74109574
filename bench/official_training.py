"""The official BAR generator training step, timed on this machine for a side-by-side comparison with bench/training.py.

Runs the official `generator_train_one_epoch` (scripts/train_bar.py's loop: Accelerate with bf16 autocast, TF32,
`torch.compile` of the model as its `compile_model: true`, AdamW, gradient clipping 1.0, the cosine schedule, one
`accelerator.gather(loss).item()` per step for its logs) on the official `configs/generator/<name>.yaml`, from an
export of the official code (not part of this project):

    git -C <official clone> archive faf903f | tar -x -C .upstream/bar
    python bench/official_training.py --official .upstream/bar --config bar_b --out official_training.json

Needs accelerate and einops (the official requirements; not ours). What is replaced: the data loader by pretokenized
batches of random token bits already on the GPU (`[batch, 256 * 16]` in `{0, 1}` and random class labels), as
bench/training.py's synthetic tokens; the tokenizer is not built (the pretokenized path never calls it). The
weights are made dense and random (norm weights near 1), as bench/common.py's `randomise_` does for ours: the
official initialisation zeroes the adaLN modulations, and timing on zeros flatters the matrix units.

Timing: every batch taken from the loader records a CUDA event on the current stream (common.StreamClock: no
synchronisation between steps, so the loop's own host reads are the only waits); the step time is the median
difference of consecutive takes after `--warmup` steps (which include the compilation). Rows recorded before
2026-12-07's sixth session synchronised the GPU at every take instead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compile_cache  # noqa: E402
from common import TimedBatches, machine, write_results  # noqa: E402


@torch.no_grad()
def randomise_official_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    norm_weights = {id(module.weight) for module in model.modules()
                    if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None),
                                                                           torch.Tensor)}
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.normal_(1.0 if id(parameter) in norm_weights else 0.0, std, generator=generator)


def run(args: argparse.Namespace) -> dict[str, Any]:
    official = Path(args.official).resolve()
    sys.path.insert(0, str(official))
    from accelerate import Accelerator
    from modeling.generator import BAR
    from omegaconf import OmegaConf
    from utils.train_utils import create_lr_scheduler, create_optimizer, generator_train_one_epoch

    config = OmegaConf.load(official / "configs" / "generator" / f"{args.config}.yaml")
    steps = args.warmup + args.timed
    assert steps < config.experiment.log_every, "logging, saving and generation stay out of the timed steps"
    config.training.per_gpu_batch_size = args.batch
    config.training.compile_model = not args.eager
    config.training.use_ema = False
    config.dataset.params.pretokenization = "random tokens on the device"

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=1)
    torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's enable_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    logger = logging.getLogger("official")
    torch.manual_seed(0)
    model = BAR(config)
    model.to(accelerator.device)
    randomise_official_(model)
    loss_module = torch.nn.Identity()
    optimizer, _ = create_optimizer(config, logger, model, loss_module)
    lr_scheduler, _ = create_lr_scheduler(config, logger, accelerator, optimizer, discriminator_optimizer=None)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if config.training.compile_model:
        model = torch.compile(model)

    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(0)
    # The pretokenized files hold each token's bits (the tokenizer's min_encoding_indices): [B, 256 * 16] in {0, 1}.
    bits_per_image = int(config.model.generator.image_seq_len) * int(config.model.vq_model.token_size)
    tokens = torch.randint(0, 2, (args.batch, bits_per_image), device=device, generator=generator)
    conditions = torch.randint(0, config.model.generator.condition_num_classes, (args.batch,), device=device,
                               generator=generator)
    # The loader the official loop iterates: one pretokenized batch, taken `steps` times.
    batches = TimedBatches(lambda index: (conditions, tokens), steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    final_step = generator_train_one_epoch(config, logger, accelerator, model, None, loss_module, optimizer,
                                           lr_scheduler, batches, None, None, None, 0)
    wall = time.perf_counter() - start
    durations = batches.durations()
    step = statistics.median(durations[args.warmup:])
    return {
        "code": "official", "config": args.config, "compiled": bool(config.training.compile_model),
        "batch": args.batch, "steps": final_step, "median_step_s": step, "images_per_s": args.batch / step,
        "step_durations_s": durations,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "first_steps_s": sum(durations[:args.warmup]), "wall_s": wall, "timing": "stream events at batch starts",
        "replaced": "data (random pretokenized batch on the device); weights dense random",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=str(ROOT / ".upstream" / "bar"), help="export of the official code")
    parser.add_argument("--config", default="bar_b", help="configs/generator/<config>.yaml of the official code")
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch (the recipe's 128)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--timed", type=int, default=12)
    parser.add_argument("--eager", action="store_true", help="without the recipe's torch.compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    compile_cache.load("official_training")
    row = run(args)
    row["compile_cache"] = compile_cache.loaded_artifacts()
    print({k: v for k, v in row.items() if k != "step_durations_s"}, flush=True)
    write_results(args.out, {"machine": machine(), "rows": [row]})
    compile_cache.save(compile_cache.key_of("official_training", args.config, "eager" if args.eager else "compiled"))


if __name__ == "__main__":
    main()
