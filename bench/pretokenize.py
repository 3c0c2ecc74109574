"""Throughput of the real pretokenize.py job from webdataset shards, against the tokenizer's encoder alone.

The issue's target: on one GPU, end-to-end images/s of `run_pretokenize` from JPEG shards (256 px, every image and
its mirror encoded, with and without ten-crop) must be at least 80% of the encoder alone on batches already on the
device; decoding, cropping and writing must not be the bottleneck.

Set-up (not timed):
* `--images` synthetic JPEGs (quality 95) of ImageNet-like sizes (500x375, 375x500, 500x333, 640x480, ...) with
  smooth random content and mild noise, written by the repo's shard writer (`bar_lightning.data.convert.
  write_shards`, with its shard index) in shards of `--shard-size` samples with `cls` labels. `--distinct` images
  are generated and repeated under new keys (decoding costs the same).
* A tokenizer of `--experiment` (default `bar_fsq_16bits`: SigLIP2-so400m encoder, 256 px, 16 bits) with random
  weights, saved as a tokenizer checkpoint (floating weights stored as bf16 to halve the file; they are random
  anyway) and loaded once through `load_tokenizer_from_source`, the loader pretokenize uses
  (`tokenizer.checkpoint=`). Load time and the checkpoint hash are reported, then memoised: every variant's
  `run_pretokenize` gets the loaded tokenizer and the hash instead of reading the file again.

Timed:
* `encoder alone`: `tokenizer.encode_bits` of a random `[batch, 3, 256, 256]` batch already on the device and of its
  mirror, synchronised, after `--warmup` calls; the median of `--timed` calls. Rows: encoder inputs (crops) per s.
* one row per `--variants` entry `<crop>:<num_workers>` (crop: `center` or `ten_crop`; num_workers: a count or
  `auto`): the wall clock of `run_pretokenize` into an empty folder (worker start, decoding, cropping, encoding,
  writing, the final count and metadata.json; not the model load). `ten_crop` variants read the first
  `--ten-crop-images` images (default images / 5: the same number of encoder inputs). `crops_per_s` is what the
  encoder saw (5 per image with ten-crop), `vs_encoder` = crops_per_s / encoder alone (the target: >= 0.8).
* `decode only` rows (`--decode-only`, on by default for variants with workers): the same DataLoader of decoded
  crops without encoding: what the workers can deliver at most.

pretokenize has no precision option (it encodes in float32); `--matmul-precision high` times TF32 matmuls.

    cd bench && python pretokenize.py --images 3000 --batch 64 --out results/pretokenize_h100.json   # GPU, ~2.5 min
    cd bench && python pretokenize.py --experiment tiny_tokenizer --images 240 --batch 16              # CPU smoke test
"""

from __future__ import annotations

import argparse
import logging
import shutil
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
    median,
    print_table,
    randomise_,
    time_calls,
    write_results,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

import bar_lightning.pretokenize as pretokenize
from bar_lightning.data.convert import encode_image, write_shards
from bar_lightning.models.registry import build_tokenizer

SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 500), (400, 300), (333, 500), (500, 400)]


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth random colour fields (a bicubic upsampling of a coarse random grid) plus mild noise: JPEG sizes and
    decoding costs near those of photographs."""
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, resample=Image.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0.0, 6.0, smooth.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_image_shards(folder: Path, prefix: str, count: int, *, distinct: int, shard_size: int) -> tuple[str, int]:
    """`count` JPEG samples in shards; returns (the shard index, bytes of JPEG written)."""
    rng = np.random.default_rng(0)
    jpegs = [encode_image(synthetic_photo(rng, SIZES[index % len(SIZES)]), image_format="jpg")
             for index in range(min(count, distinct))]
    samples = ({"__key__": f"img{index:07d}", "jpg": jpegs[index % len(jpegs)], "cls": index % 1000}
               for index in range(count))
    summary = write_shards(samples, out_dir=folder, prefix=prefix, max_count=shard_size)
    return str(summary.index), sum(len(jpegs[index % len(jpegs)]) for index in range(count))


def save_random_tokenizer(model: dict[str, Any], path: Path, device: torch.device) -> None:
    """A tokenizer checkpoint as `TokenizerModule.load_tokenizer` reads it, of a randomly initialised tokenizer."""
    with torch.device(device):
        tokenizer = randomise_(build_tokenizer(model))
    state = {f"tokenizer.{key}": (value.to(torch.bfloat16) if value.is_floating_point() else value).cpu()
             for key, value in tokenizer.state_dict().items()}
    del tokenizer
    torch.save({"hyper_parameters": {"model": model, "loss": {}}, "state_dict": state}, path)


def memoise_tokenizer(tokenizer: torch.nn.Module, source_record: dict[str, Any]) -> None:
    """Every run_pretokenize below gets this tokenizer and checkpoint hash instead of reading the file again."""
    pretokenize.load_tokenizer_from_source = lambda source, *, decode_only: tokenizer
    pretokenize.model_source_record = lambda source: source_record


def pretokenize_config(checkpoint: Path, shards: str, output: Path, *, batch: int, crop: str, workers: str) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretokenize", overrides=[f"tokenizer.checkpoint={checkpoint}", f"output_dir={output}",
                                                f"batch_size={batch}", f"ten_crop={crop == 'ten_crop'}",
                                                f"num_workers={workers}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output)
        cfg.data.shards = shards
    return cfg


def decode_rate(shards: str, output: Path, *, size: int, batch: int, crop: str, workers: int) -> float:
    """Crops per second the DataLoader delivers (decode, crop, batch, pin), with nothing encoded."""
    units = pretokenize.expand_shards(shards)
    batches = pretokenize.CropBatches(
        units=units, shards=True, output=str(output), image_size=size, ten_crop=crop == "ten_crop",
        ten_crop_scale=1.1, max_image_pixels=pretokenize.default_max_image_pixels(size), batch_size=batch)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=pretokenize._as_is,
                                         num_workers=min(workers, len(units)), pin_memory=torch.cuda.is_available())
    start, crops = time.perf_counter(), 0
    for record in loader:
        crops += len(record["paths"])
    return crops / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bar_fsq_16bits", help="tokenizer experiment (CPU: tiny_tokenizer)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--ten-crop-images", dest="ten_crop_images", type=int, default=None,
                        help="images of the ten_crop variants (default: images / 5, as many encoder inputs)")
    parser.add_argument("--batch", type=int, default=64, help="pretokenize's batch_size (and the encoder's batch)")
    parser.add_argument("--variants", default="center:0,center:auto,ten_crop:auto",
                        help="comma-separated <center|ten_crop>:<num_workers|auto>")
    parser.add_argument("--decode-only", dest="decode_only", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the DataLoader alone for variants with workers")
    parser.add_argument("--distinct", type=int, default=128, help="distinct images generated (then repeated)")
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=None,
                        help="samples per shard (default: about 32 shards, for the workers to share)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--matmul-precision", dest="matmul_precision", default="highest",
                        choices=["highest", "high", "medium"], help="torch.set_float32_matmul_precision")
    parser.add_argument("--workdir", default=None, help="where shards and tokens go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON file of the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bar_lightning.pretokenize").setLevel(logging.INFO)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [tuple(variant.split(":")) for variant in args.variants.split(",")]
    ten_crop_images = args.ten_crop_images or max(1, args.images // 5)
    shard_size = args.shard_size or max(1, args.images // 32)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pretokenize_"))
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args), "rows": []}
    rows = results["rows"]
    try:
        # ------------------------------------------------------------------ inputs and tokenizer (not timed)
        start = time.perf_counter()
        shards, jpeg_bytes = write_image_shards(work / "shards", "bench", args.images, distinct=args.distinct,
                                                shard_size=shard_size)
        ten_crop_shards = shards
        if any(crop == "ten_crop" for crop, _ in variants) and ten_crop_images != args.images:
            ten_crop_shards, _ = write_image_shards(work / "shards", "bench-tc", ten_crop_images,
                                                    distinct=args.distinct, shard_size=max(1, ten_crop_images // 32))
        results["inputs"] = {"images": args.images, "mean_jpeg_kib": jpeg_bytes / args.images / 1024,
                             "shard_size": shard_size, "write_s": time.perf_counter() - start}
        model = OmegaConf.to_container(compose_experiment(args.experiment).model, resolve=True)
        checkpoint = work / "tokenizer.ckpt"
        start = time.perf_counter()
        save_random_tokenizer(model, checkpoint, device)
        results["checkpoint"] = {"gib": checkpoint.stat().st_size / 2**30, "save_s": time.perf_counter() - start}
        source = OmegaConf.create({"checkpoint": str(checkpoint)})
        start = time.perf_counter()
        tokenizer = pretokenize.load_tokenizer_from_source(source, decode_only=False).to(device).eval()
        results["checkpoint"]["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        record = pretokenize.model_source_record(source)
        results["checkpoint"]["hash_s"] = time.perf_counter() - start
        memoise_tokenizer(tokenizer, record)
        print(f"inputs {results['inputs']}\ncheckpoint {results['checkpoint']}", flush=True)
        size = int(tokenizer.image_size)

        # ------------------------------------------------------------------ the encoder alone
        images = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1

        def encode(_: int) -> None:
            with torch.no_grad():
                tokenizer.encode_bits(images)
                tokenizer.encode_bits(torch.flip(images, dims=[-1]))

        step = median(time_calls(encode, warmup=args.warmup, timed=args.timed))
        encoder_rate = args.batch / step
        rows.append({"variant": "encoder alone", "crops_per_s": encoder_rate, "batch_s": step, "vs_encoder": 1.0})
        print(rows[-1], flush=True)

        # ------------------------------------------------------------------ run_pretokenize
        for crop, workers in variants:
            if crop not in ("center", "ten_crop"):
                raise SystemExit(f"--variants: crop {crop!r} is not center or ten_crop")
            count = ten_crop_images if crop == "ten_crop" else args.images
            inputs = ten_crop_shards if crop == "ten_crop" else shards
            crops = count * (5 if crop == "ten_crop" else 1)
            resolved = min(pretokenize.resolve_num_workers(workers if workers == "auto" else int(workers)),
                           len(pretokenize.expand_shards(inputs)))  # as run_pretokenize caps it
            row: dict[str, Any] = {"variant": f"{crop} num_workers={workers}", "workers": resolved, "images": count}
            output = work / f"tokens_{crop}_{workers}"
            try:
                cfg = pretokenize_config(checkpoint, inputs, output, batch=args.batch, crop=crop, workers=workers)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                metadata = pretokenize.run_pretokenize(cfg)
                wall = time.perf_counter() - start
                assert metadata["num_samples"] == crops, metadata["num_samples"]
                row.update(wall_s=wall, images_per_s=count / wall, crops_per_s=crops / wall,
                           vs_encoder=crops / wall / encoder_rate)
            except Exception as error:  # report and go on with the other variants
                row["error"] = f"{type(error).__name__}: {error}"[:800]
            shutil.rmtree(output, ignore_errors=True)
            rows.append(row)
            print(row, flush=True)
            if args.decode_only and resolved > 0:
                rate = decode_rate(inputs, work / "absent", size=size, batch=args.batch, crop=crop, workers=resolved)
                rows.append({"variant": f"{crop} num_workers={workers}, decode only", "workers": resolved,
                             "images": count, "images_per_s": rate / (5 if crop == "ten_crop" else 1),
                             "crops_per_s": rate, "vs_encoder": rate / encoder_rate})
                print(rows[-1], flush=True)
            write_results(args.out, results)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, results)
    print(f"\npretokenize, {results['machine'].get('gpu')}, torch {torch.__version__}, {args.experiment}, "
          f"{size} px, batch {args.batch}, float32 matmul precision {args.matmul_precision}, {args.images} images")
    print_table(rows, ["variant", "workers", "images", "wall_s", "images_per_s", "crops_per_s", "vs_encoder", "error"])


if __name__ == "__main__":
    main()
