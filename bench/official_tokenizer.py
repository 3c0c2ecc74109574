"""The official BAR-FSQ tokenizer training step, timed on this machine for a side-by-side comparison.

Runs the official `train_one_epoch` (scripts/train_bar_fsq.py's loop: Accelerate with bf16, TF32, torch.compile of
the model and the loss module as its `compile_model: true`, AdamW, gradient clipping, EMA) on the official
`configs/tokenizer/bar_fsq_16bits.yaml`, from an export of the official code (not part of this project):

    git -C <official clone> archive faf903f | tar -x -C .upstream/bar
    python bench/official_tokenizer.py --official .upstream/bar --phase generator --out official.json

Needs transformers, timm, accelerate and einops (the official requirements; not ours). What is replaced, because the
GPU machine has no network (speed does not depend on the weights' values):

* `AutoModel.from_pretrained("google/siglip2-so400m-patch16-naflex")` -> a randomly initialised `Siglip2Model` of the
  same vision architecture (1152 wide, 27 layers, 16 heads, patch 16, 256 patches; a one-layer text tower, unused);
* torchvision's ImageNet weights of VGG16 (LPIPS trunk, Gram loss) and ConvNeXt-S -> torchvision's random init;
* `assets/models/vgg_lpips.pth` and `assets/models/dino_vit_small_patch8_224.pth` (read relative to the working
  directory) -> bar_lightning's stand-ins of the same keys and shapes, written to a temporary working directory;
* the data loader -> a list of random image batches already on the GPU (no decoding cost on either side);
* `scipy` (imported by the official evaluator, which is never called here) -> an empty module where it is missing.

Timing: every batch taken from the loader records a CUDA event on the current stream (common.StreamClock: no
synchronisation between steps, so the loop's own host reads are the only waits); the step time is the median
difference of consecutive takes after `--warmup` steps (which include the compilation). Rows recorded before
2026-12-07's sixth session synchronised the GPU at every take instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compile_cache  # noqa: E402
from common import TimedBatches, machine, print_kernel_table, write_results  # noqa: E402
from turns import Turns, row_fields, turn_batch  # noqa: E402

SIGLIP2_SO400M_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "patch_size": 16, "num_patches": 256, "num_channels": 3}


def install_replacements(workdir: Path) -> None:
    """Point every download of the official code at a random stand-in (see the module docstring)."""
    import torchvision.models._api as torchvision_api
    import transformers

    def random_siglip2(name: str, *args: Any, **kwargs: Any) -> Any:
        assert "siglip2" in name, name
        config = transformers.Siglip2Config(
            vision_config=SIGLIP2_SO400M_VISION,
            text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 256},
        )
        return transformers.Siglip2Model(config)

    transformers.AutoModel.from_pretrained = random_siglip2

    def random_torchvision_state(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        import torchvision

        name = url.rsplit("/", 1)[-1]
        if name.startswith("vgg16-"):
            return torchvision.models.vgg16(weights=None).state_dict()
        if name.startswith("convnext_small-"):
            return torchvision.models.convnext_small(weights=None).state_dict()
        raise AssertionError(f"unexpected torchvision download {url}")

    torchvision_api.load_state_dict_from_url = random_torchvision_state

    from bar_lightning.models.discriminator import DinoViTBackbone
    from bar_lightning.stand_in_weights import lpips_heads_state

    assets = workdir / "assets" / "models"
    assets.mkdir(parents=True, exist_ok=True)
    torch.save(lpips_heads_state(), assets / "vgg_lpips.pth")
    torch.save(DinoViTBackbone(patch_size=8).state_dict(), assets / "dino_vit_small_patch8_224.pth")
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        scipy = types.ModuleType("scipy")
        scipy.linalg = types.ModuleType("scipy.linalg")
        sys.modules.update({"scipy": scipy, "scipy.linalg": scipy.linalg})


def run(args: argparse.Namespace, turns: Turns | None = None) -> dict[str, Any]:
    official = Path(args.official).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="official_tokenizer_"))
    os.chdir(workdir)  # the official code reads assets/models/* relative to the working directory
    sys.path.insert(0, str(official))
    install_replacements(workdir)
    from accelerate import Accelerator
    from modeling.modules import EMAModel, ReconstructionLoss, discriminator_dino
    from modeling.tokenizer import BAR_FSQ
    from omegaconf import OmegaConf
    from utils.train_utils import create_lr_scheduler, create_optimizer, train_one_epoch

    if not torch.cuda.is_available():  # CPU smoke test only: the DINO discriminator's proxy defaults to "cuda"
        defaults = list(discriminator_dino.DinoDisc.__init__.__defaults__)
        defaults[defaults.index("cuda")] = "cpu"
        discriminator_dino.DinoDisc.__init__.__defaults__ = tuple(defaults)
    config = OmegaConf.load(official / "configs" / "tokenizer" / "bar_fsq_16bits.yaml")
    steps = args.warmup + args.timed
    config.training.per_gpu_batch_size = args.batch
    config.training.max_train_steps = 200_000  # the schedules' horizon, as in the real run
    config.training.compile_model = not args.eager
    config.experiment.output_dir = str(workdir / "output")
    # generator: the phase before discriminator_start; gan: G and D alternate from the first step.
    config.losses.discriminator_start = 100_000 if args.phase == "generator" else 0
    assert steps + 4 < config.experiment.log_every, "logging, saving and evaluation stay out of the timed steps"

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=1)
    torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's enable_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    logger = logging.getLogger("official")
    torch.manual_seed(0)
    model = BAR_FSQ(config)
    ema_model = EMAModel(model.parameters(), decay=0.999, model_cls=BAR_FSQ, config=config)
    loss_module = ReconstructionLoss(config=config)
    optimizer, discriminator_optimizer = create_optimizer(config, logger, model, loss_module)
    lr_scheduler, discriminator_lr_scheduler = create_lr_scheduler(
        config, logger, accelerator, optimizer, discriminator_optimizer)
    model, loss_module, optimizer, discriminator_optimizer, lr_scheduler, discriminator_lr_scheduler = (
        accelerator.prepare(model, loss_module, optimizer, discriminator_optimizer, lr_scheduler,
                            discriminator_lr_scheduler))
    if config.training.compile_model:
        model = torch.compile(model)
        loss_module = torch.compile(loss_module)
    ema_model.to(accelerator.device)

    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch, 3, 256, 256, device=device, generator=generator) * 2 - 1
    # The loader the official loop iterates: one random batch, taken `steps` times, with the keys it logs.
    # Profiled batches, then batches with the allocator history, come after the timed ones.
    memory_from = steps + (2 if args.profile else 0)
    memory: dict[str, Any] = {}

    def memory_window(index: int) -> None:
        from memory_snapshot import record_memory_history, summarise_recording

        if index == memory_from:
            memory["baseline"] = record_memory_history()
        elif index == memory_from + 2:
            memory["summary"] = {**summarise_recording(memory["baseline"]), "recorded_batches": 2}

    def on_take(index: int) -> None:
        if turns is not None and index == turn_batch(args.warmup):  # after the take's mark: the wait falls in a warm-up step
            turns.arrive_and_take_turn()
        if args.memory_snapshot:
            memory_window(index)

    batches = TimedBatches(lambda index: {"image": images, "__key__": [f"{index}_{i}" for i in range(len(images))]},
                           memory_from + (2 if args.memory_snapshot else 0),
                           profile_from=steps if args.profile else None, on_take=on_take)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    final_step = train_one_epoch(config, logger, accelerator, model, ema_model, loss_module, optimizer,
                                 discriminator_optimizer, lr_scheduler, discriminator_lr_scheduler, batches, None,
                                 None, 0)
    wall = time.perf_counter() - start
    durations = batches.durations()[:steps]  # profiled batches left out
    timed = durations[args.warmup:]
    # In the gan phase the steps alternate G and D (each takes one batch): their mean is the rate of the run.
    step = statistics.median(timed) if args.phase == "generator" else statistics.fmean(timed)
    row = {
        "code": "official", "phase": args.phase, "compiled": bool(config.training.compile_model),
        "batch": args.batch, "steps": final_step, "step_s": step, "images_per_s": args.batch / step,
        "step_durations_s": durations,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        **row_fields(turns, sum(durations[:args.warmup])),
        "wall_s": wall, "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "timing": "stream events at batch starts",
        "replaced": "SigLIP2 (random Siglip2Model, so400m vision), torchvision VGG16/ConvNeXt-S (random), LPIPS heads "
                    "and DINO ViT-S/8 (bar_lightning stand-ins), data (random GPU batch)",
    }
    if batches.table is not None:
        row["profile"] = batches.table
        print_kernel_table(batches.table)
    if "summary" in memory:
        from memory_snapshot import print_summary

        row["memory"] = memory["summary"]
        print_summary(memory["summary"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=str(ROOT / ".upstream" / "bar"), help="export of the official code")
    parser.add_argument("--phase", choices=("generator", "gan"), default="generator")
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch (the recipe's 32)")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--timed", type=int, default=12)
    parser.add_argument("--eager", action="store_true", help="without the recipe's torch.compile")
    parser.add_argument("--profile", action="store_true", help="kernel table of two batches after the timed ones")
    parser.add_argument("--memory-snapshot", dest="memory_snapshot", action="store_true",
                        help="what is alive at the peak of two batches after the timed ones (CUDA only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    turns = Turns.from_environment()
    compile_cache.load("official_tokenizer")
    row = run(args, turns)
    row["compile_cache"] = compile_cache.loaded_artifacts()
    print({key: value for key, value in row.items() if key not in ("profile", "memory")}, flush=True)
    write_results(args.out, {"machine": machine(), "rows": [row]})
    compile_cache.save(compile_cache.key_of("official_tokenizer", args.phase, "eager" if args.eager else "compiled"))


if __name__ == "__main__":
    main()
