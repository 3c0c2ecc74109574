"""Time to FID-50k: the real evaluate.py run (`run_evaluation`) split by stage, with random full-size networks.

BAR-B (random dense weights) samples `--per-class` images of each of 1000 classes, the BAR-FSQ ViT-L decoder (random
weights) decodes them, the Inception network (random weights, torch-fidelity's architecture) extracts the features
of each batch while it is on the GPU, `samples.npz` / `samples_bits.npz` are written by background threads, and
every metric of the default `metrics.names` (FID, sFID, IS, KID, precision/recall) is computed against a random
10,000-image reference batch, as the ADM one. Speed does not depend on the weights; what is replaced is only the
loading of the files (`load_generator_from_source`, `load_tokenizer_from_source` and the files' hashes in the
provenance record), everything else is evaluate.py's code path.

    python bench/evaluation.py --per-class 10 --out evaluation.json          # on the GPU: 10,000 samples
    python bench/evaluation.py --experiment tiny_generator --tokenizer tiny_tokenizer --classes 10 --per-class 4 \
        --reference-images 64 --generator-override model.bits_per_token=6 "sampling.tokens_allocation=[2,2,2]" \
        --evaluate-override sampling.tokens_allocation=[2,2,2] sampling=tiny metrics.allow_small_sample=true \
        metrics.kid_subset_size=20 --statistics-samples 200  # CPU smoke test

The wall clock of 50,000 samples is extrapolated from a smaller run stage by stage: sampling, decoding, features
and the transfer scale with the number of samples; the fixed costs (model building, compilation, reference
features) do not, and are reported apart. The first batch (compilation and CUDA-graph capture) is timed on its own,
so a second extrapolation counts it once. The statistics stage does not scale linearly (precision/recall compares
every sample with its k nearest neighbours): `--statistics-samples 50000` times it again, after the run, on that
many feature rows (the run's streamed features tiled, with noise) against the same reference, through
`metrics_of_sample_features`, the function evaluate.py calls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    ROOT,
    compose_experiment,
    machine,
    print_table,
    random_generator_on,
    randomise_,
    write_results,
)
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import bar_lightning.eval.evaluate as evaluate_module
import bar_lightning.eval.metrics as metrics_module
from bar_lightning.config.schema import validate_evaluate_config
from bar_lightning.eval.metrics import save_adm_npz
from bar_lightning.models.registry import build_tokenizer

PER_SAMPLE_STAGES = ("sampling", "decoding", "inception_features", "to_host")


class PrintedProgress:
    """Stands in for evaluate.py's rich progress bar: a line every `every` seconds (and at the end of the loop), so
    a run cut off at a device call's limit still says how far it got."""

    every = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.began = self.printed = time.perf_counter()
        self.done = self.total = 0

    def __enter__(self) -> PrintedProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: int) -> int:
        self.total = total
        return 0

    def advance(self, task: int, advance: int) -> None:
        self.done += advance
        now = time.perf_counter()
        if now - self.printed >= self.every or self.done >= self.total:
            self.printed = now
            print(f"progress: {self.done}/{self.total} samples, {now - self.began:.1f} s into the sampling loop",
                  flush=True)


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random (He-initialised) weights, saved as its weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


def time_statistics(features: dict[str, torch.Tensor], count: int, *, size: int, cfg: Any, reference: Path,
                    inception: Path, device: torch.device) -> float:
    """Seconds of evaluate.py's statistics stage for `count` samples: the streamed features tiled to `count` rows
    (with noise, so no two rows coincide for the nearest-neighbour radii) against the same reference."""
    generator = torch.Generator().manual_seed(0)
    tiled = {}
    for layer, rows in features.items():
        repeats = -(-count // rows.shape[0])
        rows = rows.repeat(repeats, *([1] * (rows.dim() - 1)))[:count]
        noise = torch.randn(rows.shape, generator=generator, dtype=torch.float32).to(rows.dtype)
        tiled[layer] = rows + 1e-2 * rows.float().std().to(rows.dtype) * noise.to(rows.device)
    began = time.perf_counter()
    metrics_module.metrics_of_sample_features(
        tiled, sample_shape=(count, size, size, 3), reference=str(reference), inception_weights=str(inception),
        metrics=tuple(cfg.metrics.names), batch_size=cfg.metrics.batch_size, device=device,
        kid_subset_size=cfg.metrics.kid_subset_size, allow_small_sample=cfg.metrics.allow_small_sample)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_b", help="generator experiment (random weights)")
    parser.add_argument("--tokenizer", default="bar_fsq_16bits", help="tokenizer experiment (random decoder)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--batch", type=int, default=125, help="evaluate.py batch_size (its default)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--reference-images", type=int, default=10_000)
    parser.add_argument("--target-samples", type=int, default=50_000, help="extrapolate the wall clock to this")
    parser.add_argument("--statistics-samples", type=int, default=0,
                        help="also time the statistics stage on this many samples' features (e.g. 50000)")
    parser.add_argument("--generator-override", nargs="*", default=[])
    parser.add_argument("--evaluate-override", nargs="*", default=[])
    parser.add_argument("--progress-every", dest="progress_every", type=float, default=30.0,
                        help="seconds between the progress lines of the sampling loop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    PrintedProgress.every = args.progress_every
    process_began = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator_model = compose_experiment(args.experiment, args.generator_override).model
    tokenizer_model = compose_experiment(args.tokenizer).model
    built: dict[str, float] = {}

    def random_generator(source: Any) -> torch.nn.Module:
        began = time.perf_counter()
        model = random_generator_on(device, **generator_model).eval()
        built["generator_s"] = time.perf_counter() - began
        return model

    def random_tokenizer(source: Any, *, decode_only: bool) -> torch.nn.Module:
        began = time.perf_counter()
        with torch.device(device):
            model = randomise_(build_tokenizer(dict(tokenizer_model), build_encoder=not decode_only)).eval()
        built["tokenizer_s"] = time.perf_counter() - began
        return model

    evaluate_module.load_generator_from_source = random_generator
    evaluate_module.load_tokenizer_from_source = random_tokenizer
    evaluate_module.model_source_record = lambda source: {"random weights": "bench/evaluation.py"}
    evaluate_module.Progress = PrintedProgress

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        began = time.perf_counter()
        size = int(tokenizer_model.image_size)
        rng = np.random.default_rng(0)
        reference = save_adm_npz(folder / "reference.npz",
                                 rng.integers(0, 256, (args.reference_images, size, size, 3), dtype=np.uint8))
        inception = random_inception_weights(folder / "inception.pth")
        setup_s = time.perf_counter() - began
        overrides = [
            "generator.checkpoint=random", "tokenizer.checkpoint=random", f"classes=[{','.join(map(str, range(args.classes)))}]",
            f"num_samples_per_class={args.per_class}", f"batch_size={args.batch}", f"sampling.precision={args.precision}",
            f"metrics.reference={reference}", f"metrics.inception_weights={inception}", "print_config=false",
            *args.evaluate_override,
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder / "run")
        cfg = validate_evaluate_config(cfg)
        captured: dict[str, torch.Tensor] = {}
        streamed_features = metrics_module.InceptionFeatureStream.features

        def capturing_features(stream: Any) -> dict[str, torch.Tensor]:
            captured.update(streamed_features(stream))
            return captured

        metrics_module.InceptionFeatureStream.features = capturing_features
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        print(f"run_evaluation starts {began - process_began:.1f} s after the arguments were parsed (imports before)",
              flush=True)
        result = evaluate_module.run_evaluation(cfg)
        wall = time.perf_counter() - began
        print(f"metrics.json written {wall:.1f} s after run_evaluation started", flush=True)
        saved = json.loads((folder / "run" / "metrics.json").read_text())
        statistics_at_scale = None
        if args.statistics_samples:
            statistics_at_scale = time_statistics(captured, args.statistics_samples, size=size, cfg=cfg,
                                                  reference=reference, inception=inception, device=device)

    timings = saved["timings_s"]
    samples = result["num_samples"]
    scale = args.target_samples / samples
    per_sample = sum(timings.get(stage, 0.0) for stage in PER_SAMPLE_STAGES)
    loop_overhead = max(0.0, timings["sampling_loop_wall"] - per_sample)  # host work between the GPU stages
    # On CUDA the decoding, features and copies run on a second stream during the next batch's sampling: the stage
    # times then add up to more than the loop's wall clock, by the time the overlap took off it.
    overlapped = max(0.0, per_sample - timings["sampling_loop_wall"])
    fixed = wall - timings["sampling_loop_wall"]
    # The first batch carries the compilation and the graph capture, paid once per run: the rate of the loop (and
    # the extrapolation) counts the other batches; the first batch's wall clock is added once.
    first = timings["first_batch_wall"]
    steady_samples = samples - min(args.batch, samples)
    steady_rate = steady_samples / (timings["sampling_loop_wall"] - first) if steady_samples else float("nan")
    row = {
        "samples": samples, "batch": args.batch, "precision": args.precision, "wall_s": wall,
        **{f"{stage}_s": timings.get(stage) for stage in (*PER_SAMPLE_STAGES, "sampling_loop_wall", "saving_bits",
                                                          "saving_npz", "statistics_and_reference")},
        "images_per_s_loop": samples / timings["sampling_loop_wall"],
        "first_batch_s": first, "images_per_s_after_first_batch": steady_rate,
        "fixed_s": fixed,
        # Of the whole run: the KV cache and CUDA-graph pool of the sampler, the decoder, Inception and statistics.
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        f"extrapolated_{args.target_samples}_s": timings["sampling_loop_wall"] * scale + fixed,
        f"extrapolated_{args.target_samples}_first_batch_once_s":
            first + (args.target_samples - min(args.batch, samples)) / steady_rate + fixed,
    }
    if statistics_at_scale is not None:
        row[f"statistics_{args.statistics_samples}_s"] = statistics_at_scale
        row[f"extrapolated_{args.target_samples}_first_batch_once_s"] += (
            statistics_at_scale - timings["statistics_and_reference"]) if args.statistics_samples == args.target_samples else 0.0
    metrics = {key: value for key, value in result.items() if isinstance(value, float)}
    print_table([row], list(row))
    print("metrics:", metrics, "| models built in", {k: round(v, 1) for k, v in built.items()}, "s")
    write_results(args.out, {"machine": machine(), "rows": [row], "timings_s": timings, "metrics": metrics,
                             "built_s": built, "setup_s": setup_s, "loop_overhead_s": loop_overhead,
                             "overlapped_s": overlapped})


if __name__ == "__main__":
    main()
