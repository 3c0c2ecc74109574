"""What evaluate.py does: sample a class-balanced set, decode it, save it, score it, or time it.

Sharding: sample `i` of the global list has class `labels[i]` and seed `seed + i`; rank `r` of `W` generates the
samples `i = r, r + W, ...` in batches (a batch's random stream is seeded with the seed of its first sample), so the
set of (class, seed) pairs does not depend on the number of processes and no sample is generated twice. Rank 0
merges the parts in global order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress

from bar_lightning.config.schema import ConfigError, check_sampling
from bar_lightning.distributed import hold_output_folder, join_torchrun_process_group
from bar_lightning.eval.metrics import INCEPTION_FEATURE_DIM, SFID_FEATURE_DIM
from bar_lightning.eval.sampling import (
    balanced_labels,
    load_generator_from_source,
    load_tokenizer_from_source,
    resolve_device,
)
from bar_lightning.io import atomic_write, atomic_write_json, savez_quick
from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.sampler import SamplingSettings
from bar_lightning.provenance import model_source_record, provenance

log = logging.getLogger(__name__)


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` in [-1, 1] -> uint8 `[B, 3, H, W]` on the same device, exactly as the official sampler writes
    its PNGs: `(x + 1) / 2`, clamped to [0, 1], times 255, truncated (not rounded: a rounding conversion would make
    about half the pixel values one level brighter than the official samples and shift FID and IS)."""
    unit = torch.clamp((images + 1.0) / 2.0, 0.0, 1.0)
    return (unit * 255.0).to(torch.uint8)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """`[B, 3, H, W]` in [-1, 1] -> `[B, H, W, 3]` uint8 numpy (the ADM layout), converted as `to_uint8_nchw`."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()


class StageClock:
    """Seconds spent per stage of the evaluation, without serialising the GPU: on CUDA each stage is bracketed by
    events on the current stream (read once, at the end); on CPU by the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: dict[str, list[tuple[Any, Any]]] = {}
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        totals = dict(self._seconds)
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                totals[name] = totals.get(name, 0.0) + sum(start.elapsed_time(end) for start, end in pairs) / 1000
        return {name: round(value, 3) for name, value in totals.items()}


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_samples, world_size))


def check_compatible(generator: BARGenerator, tokenizer: torch.nn.Module) -> None:
    if generator.num_tokens != tokenizer.num_tokens or generator.bits_per_token != tokenizer.bits_per_token:
        raise ConfigError(
            f"the generator makes {generator.num_tokens} tokens of {generator.bits_per_token} bits but the tokenizer "
            f"decodes {tokenizer.num_tokens} tokens of {tokenizer.bits_per_token} bits: pair each generator with the "
            "tokenizer it was trained on"
        )


@torch.no_grad()
def generate_shard(
    generator: BARGenerator,
    tokenizer: torch.nn.Module | None,
    labels: torch.Tensor,
    indices: list[int],
    *,
    sampling: DictConfig,
    allocation: list[int],
    batch_size: int,
    seed: int,
    device: torch.device,
    feature_stream: Any = None,
    clock: StageClock | None = None,
    overlap: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bits (and decoded uint8 images when a tokenizer is given) for the samples `indices` of the global list.

    Each batch is decoded, converted and (with a `feature_stream`) given to the Inception network while it is on
    the device, right after it is sampled: nothing waits for the whole set, and the images cross to the host once,
    into arrays allocated once (50,000 images at 256 px are 9.8 GB). With `overlap` (CUDA only) that work runs on a
    second stream behind the next batch's sampling (`OverlappedDecoding`); the results are the same.
    """
    if overlap and device.type != "cuda":
        raise ValueError(f"overlap=True needs a CUDA device, got {device}")
    clock = clock or StageClock(device)
    settings, cuda_graph = sampling_settings(sampling, allocation), uses_cuda_graph(sampling, device)
    bits_all = np.zeros((len(indices), generator.num_tokens * generator.bits_per_token), np.uint8)
    outputs = (OverlappedDecoding(tokenizer, feature_stream, clock, bits_all, device) if overlap and tokenizer is not None
               else SerialDecoding(tokenizer, feature_stream, clock, bits_all))
    with Progress(disable=not os.environ.get("BAR_PROGRESS", "1") == "1") as progress, outputs:
        task = progress.add_task("sampling", total=len(indices))
        loop_began = time.perf_counter()
        for start in range(0, len(indices), batch_size):
            batch_indices = indices[start : start + batch_size]
            with clock.stage("sampling"):
                rng = torch.Generator(device=device).manual_seed(seed + batch_indices[0])
                bits = generator.generate(labels[batch_indices].to(device), settings, generator=rng,
                                          cuda_graph=cuda_graph)
            outputs.add(bits, slice(start, start + len(batch_indices)))
            if start == 0:  # includes the compilation and graph capture: kept apart so a rate can leave it out
                outputs.wait()
                clock.add("first_batch_wall", time.perf_counter() - loop_began)
            progress.advance(task, len(batch_indices))
    return bits_all, outputs.images


class SerialDecoding:
    """Each sampled batch decoded, scored and copied to the host in order, on the sampling stream (the CPU path)."""

    def __init__(self, tokenizer: torch.nn.Module | None, feature_stream: Any, clock: StageClock,
                 bits_all: np.ndarray) -> None:
        self.tokenizer, self.feature_stream, self.clock, self.bits_all = tokenizer, feature_stream, clock, bits_all
        self.images: np.ndarray | None = None  # [N, H, W, 3] uint8, allocated at the first batch

    def __enter__(self) -> SerialDecoding:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _images_array(self, height: int, width: int) -> np.ndarray:
        if self.images is None:
            self.images = np.empty((len(self.bits_all), height, width, 3), np.uint8)
        return self.images

    def _decode_and_score(self, bits: torch.Tensor) -> torch.Tensor:
        with self.clock.stage("decoding"):
            images = to_uint8_nchw(self.tokenizer.decode_bits(bits))  # [B, 3, H, W] uint8, on the device
        if self.feature_stream is not None:
            with self.clock.stage("inception_features"):
                self.feature_stream.add(images)
        return images

    def add(self, bits: torch.Tensor, rows: slice) -> None:
        if self.tokenizer is not None:
            images = self._decode_and_score(bits)
            with self.clock.stage("to_host"):
                self._images_array(images.shape[2], images.shape[3])[rows] = images.permute(0, 2, 3, 1).cpu().numpy()
        self.bits_all[rows] = bits.cpu().numpy()

    def wait(self) -> None:
        """Until every batch handed over so far is on the host."""


class OverlappedDecoding(SerialDecoding):
    """CUDA: batch k's decoding, Inception features and device-to-host copies run on a second stream while batch
    k + 1 is sampled on the first, so that they can take the GPU time the sampling graph leaves unused instead of
    adding to it (67 of their 71 s hidden in a 50,000-sample BAR-B run on an H100: docs/benchmarks.md). The copies
    go to two pinned buffers in turn, from which a host thread moves them into the output arrays; the main thread
    never waits for more than the previous batch.
    """

    def __init__(self, tokenizer: torch.nn.Module, feature_stream: Any, clock: StageClock, bits_all: np.ndarray,
                 device: torch.device) -> None:
        super().__init__(tokenizer, feature_stream, clock, bits_all)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # (images, bits), pinned
        self.host_copies: list[Future | None] = [None, None]  # the buffer's move into the arrays
        self.in_flight: tuple[int, slice, Any] | None = None  # (buffer, rows, copied event) of the last batch
        self.count = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="to_host")

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.executor.shutdown(wait=True)
            # Later work on the sampling stream (features(), the next shard) sees everything done on this one.
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def add(self, bits: torch.Tensor, rows: slice) -> None:
        slot, size = self.count % 2, rows.stop - rows.start
        self.count += 1
        self._await_move(slot)  # the batch before last may still be being moved out of this buffer
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # this batch's sampling is done first
        bits.record_stream(self.stream)  # made on the sampling stream, read on this one
        with torch.cuda.stream(self.stream):
            images = self._decode_and_score(bits)
            with self.clock.stage("to_host"):
                images = images.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]
                if self.buffers[slot] is None or self.buffers[slot][0].shape[1:] != images.shape[1:] \
                        or self.buffers[slot][0].shape[0] < size:
                    self.buffers[slot] = (torch.empty(images.shape, dtype=torch.uint8, pin_memory=True),
                                          torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True))
                pinned_images, pinned_bits = self.buffers[slot]
                pinned_images[:size].copy_(images, non_blocking=True)
                pinned_bits[:size].copy_(bits, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
        self._images_array(images.shape[1], images.shape[2])
        self._move_out_previous()
        self.in_flight = (slot, rows, copied)

    def _move_out_previous(self) -> None:
        """Hands the previous batch, once its copies are done, to the host thread (no CUDA call in that thread)."""
        if self.in_flight is None:
            return
        slot, rows, copied = self.in_flight
        self.in_flight = None
        copied.synchronize()
        pinned_images, pinned_bits = self.buffers[slot]
        size = rows.stop - rows.start

        def move() -> None:
            self.images[rows] = pinned_images[:size].numpy()
            self.bits_all[rows] = pinned_bits[:size].numpy()

        self.host_copies[slot] = self.executor.submit(move)

    def _await_move(self, slot: int) -> None:
        """Until the host thread has emptied buffer `slot` (its failure, if any, raised here)."""
        future, self.host_copies[slot] = self.host_copies[slot], None
        if future is not None:
            future.result()

    def wait(self) -> None:
        self._move_out_previous()
        for slot in range(len(self.host_copies)):
            self._await_move(slot)


def sampling_settings(sampling: DictConfig, allocation: list[int]) -> SamplingSettings:
    """The `SamplingSettings` of a validated `sampling` config, made once per run (or request): `allocation` is the
    one `check_sampling` returned for the generator's head; every other field is the config key of its name."""
    values = {name: sampling[name] for name in SamplingSettings._fields if name in sampling}
    return SamplingSettings(**{**values, "tokens_allocation": tuple(allocation)})


def uses_cuda_graph(sampling: DictConfig, device: torch.device) -> bool:
    """`sampling.cuda_graph` where it can apply: CUDA graphs only exist on GPUs."""
    return bool(sampling.cuda_graph) and device.type == "cuda"


FEATURE_PREFIX = "features/"  # part-file keys of the streamed Inception features, one per layer


def merge_parts(output: Path, world_size: int, num_samples: int
                ) -> tuple[np.ndarray, np.ndarray | None, dict[str, torch.Tensor] | None]:
    """Rank 0: reassemble the rank parts (bits, images, streamed features) in global sample order."""
    bits = images = None
    features: dict[str, np.ndarray] = {}
    for rank in range(world_size):
        with np.load(output / f".part_rank{rank}.npz", allow_pickle=False) as part:
            indices = part["indices"]
            if bits is None:
                bits = np.zeros((num_samples, part["bits"].shape[1]), np.uint8)
                if "images" in part:
                    images = np.zeros((num_samples, *part["images"].shape[1:]), np.uint8)
            bits[indices] = part["bits"]
            if images is not None:
                images[indices] = part["images"]
            for key in part.files:
                if key.startswith(FEATURE_PREFIX):
                    layer = key[len(FEATURE_PREFIX):]
                    if layer not in features:
                        features[layer] = np.zeros((num_samples, part[key].shape[1]), np.float32)
                    features[layer][indices] = part[key]
        (output / f".part_rank{rank}.npz").unlink()
    return bits, images, ({layer: torch.from_numpy(rows) for layer, rows in features.items()} or None)


def save_png_grid_and_files(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{index:06d}_class{int(label):04d}.png")


def run_speed_benchmark(generator: BARGenerator, tokenizer: torch.nn.Module | None, cfg: DictConfig,
                        allocation: list[int], device: torch.device, world_size: int) -> dict[str, Any]:
    """Images/s after warm-up (the official protocol: warm-up batches excluded, synchronised, slowest rank)."""
    speed = cfg.speed
    labels = torch.arange(cfg.batch_size, device=device) % generator.num_classes
    settings, cuda_graph = sampling_settings(cfg.sampling, allocation), uses_cuda_graph(cfg.sampling, device)

    def one_batch(index: int) -> None:
        rng = torch.Generator(device=device).manual_seed(cfg.seed + index)
        bits = generator.generate(labels, settings, generator=rng, cuda_graph=cuda_graph)
        if tokenizer is not None and speed.include_decoder:
            tokenizer.decode_bits(bits)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for index in range(speed.warmup_batches):
            one_batch(index)
        synchronize()
        durations = []
        for index in range(speed.timed_batches):
            start = time.perf_counter()
            one_batch(speed.warmup_batches + index)
            synchronize()
            durations.append(time.perf_counter() - start)
    elapsed = torch.tensor(sum(durations), device=device, dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    per_gpu = cfg.batch_size * speed.timed_batches / float(elapsed)
    return {
        "images_per_second": per_gpu * world_size,
        "images_per_second_per_process": per_gpu,
        "median_batch_seconds": float(np.median(durations)),
        "batch_size": cfg.batch_size,
        "timed_batches": speed.timed_batches,
        "warmup_batches": speed.warmup_batches,
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "includes_decoder": bool(tokenizer is not None and speed.include_decoder),
        "precision": str(cfg.sampling.precision),
        "cuda_graph": bool(cfg.sampling.cuda_graph) and device.type == "cuda",
        "compile": bool(cfg.sampling.compile) and device.type == "cuda",
        "float32_matmul_precision": str(cfg.float32_matmul_precision),
        "torch": torch.__version__,
    }


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Sample (or time) as `cfg` says; returns the metrics written to `metrics.json` (rank 0).

    The output folder is held by this job for the whole evaluation (`run.lock`): a second evaluate.py started in the
    same folder stops at once naming this one, instead of both writing `metrics.json`.
    """
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    rank, world_size = join_torchrun_process_group()
    output = Path(cfg.paths.output_dir)
    with hold_output_folder(output, purpose="evaluate.py", rank=rank, world_size=world_size):
        return _evaluate(cfg, rank=rank, world_size=world_size, output=output)


def _evaluate(cfg: DictConfig, *, rank: int, world_size: int, output: Path) -> dict[str, Any]:
    evaluation_began = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    output.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # Parts of a killed earlier attempt with more processes: never merged, never overwritten (ours are).
        for stale_part in output.glob(".part_rank*.npz"):
            if int(re.fullmatch(r"\.part_rank(\d+)\.npz", stale_part.name)[1]) >= world_size:
                stale_part.unlink(missing_ok=True)

    has_tokenizer = bool(cfg.tokenizer.checkpoint or cfg.tokenizer.upstream_weights)
    metric_names = [] if cfg.speed.enabled else metrics_to_compute(cfg, has_tokenizer=has_tokenizer)
    generator = load_generator_from_source(cfg.generator).to(device).eval()
    allocation = check_sampling(cfg.sampling, generator.bits_per_step, generator.head_type)
    if cfg.sampling.compile and device.type == "cuda":
        generator.compile_decode()
    classes = list(cfg.classes) if cfg.classes is not None else list(range(generator.num_classes))
    if any(not 0 <= c < generator.num_classes for c in classes):
        raise ConfigError(f"classes={classes} has a class outside 0..{generator.num_classes - 1}")
    if metric_names:
        check_metric_request(cfg.metrics, metric_names, num_samples=cfg.num_samples_per_class * len(classes))
    tokenizer = None
    if has_tokenizer:
        tokenizer = load_tokenizer_from_source(cfg.tokenizer, decode_only=True).to(device).eval()
        check_compatible(generator, tokenizer)
    # What made the result: the generator and tokenizer files (with content hashes), config, seed and code.
    record = provenance(cfg, inputs={"generator": model_source_record(cfg.generator),
                                     "tokenizer": model_source_record(cfg.tokenizer)}) if rank == 0 else {}

    if cfg.speed.enabled:
        result = {**run_speed_benchmark(generator, tokenizer, cfg, allocation, device, world_size),
                  "tags": list(cfg.tags)}
        if rank == 0:
            atomic_write_json(output / "speed.json", {**result, "provenance": record}, indent=2, sort_keys=True)
            log.info("%.1f images/s (%d processes)", result["images_per_second"], world_size)
        return result

    labels = balanced_labels(classes, cfg.num_samples_per_class)
    indices = shard_indices(len(labels), rank, world_size)
    streamed = bool(metric_names) and cfg.metrics.feature_network == "inception"
    if streamed:
        # Every check of the metrics request (reference file, resolution, sample counts) before any sampling.
        from bar_lightning.eval.metrics import check_generation_metrics_request

        check_generation_metrics_request(
            sample_shape=(len(labels), tokenizer.image_size, tokenizer.image_size, 3),
            reference=cfg.metrics.reference if any(n in METRICS_NEEDING_REFERENCE for n in metric_names) else None,
            inception_weights=cfg.metrics.inception_weights, metrics=metric_names,
            kid_subset_size=cfg.metrics.kid_subset_size, allow_small_sample=cfg.metrics.allow_small_sample,
        )
    feature_stream = None
    if streamed:
        from bar_lightning.eval.metrics import InceptionFeatureStream

        feature_stream = InceptionFeatureStream(inception_weights=cfg.metrics.inception_weights, metrics=metric_names,
                                                device=device)
    log.info("rank %d of %d processes: sampling %d of %d samples", rank, world_size, len(indices), len(labels))
    clock = StageClock(device)
    began = time.perf_counter()
    bits, images = generate_shard(generator, tokenizer, labels, indices, sampling=cfg.sampling,
                                  allocation=allocation, batch_size=cfg.batch_size, seed=cfg.seed, device=device,
                                  overlap=bool(cfg.overlap_decoding) and device.type == "cuda",
                                  feature_stream=feature_stream, clock=clock)
    features = feature_stream.features() if feature_stream is not None else None
    clock.add("sampling_loop_wall", time.perf_counter() - began)
    if world_size > 1:
        part = {"indices": np.asarray(indices, dtype=np.int64), "bits": bits}
        if images is not None:
            part["images"] = images
        for layer, rows in (features or {}).items():
            part[FEATURE_PREFIX + layer] = rows.numpy()
        np.savez(output / f".part_rank{rank}.npz", **part)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank != 0:
            return {}
        bits, images, features = merge_parts(output, world_size, len(labels))

    label_array = labels.numpy()
    result: dict[str, Any] = {"num_samples": len(labels), "num_classes": len(classes),
                              "guidance_scale": float(cfg.sampling.guidance_scale),
                              "temperature": float(cfg.sampling.temperature),
                              "tokens_allocation": list(allocation), "tags": list(cfg.tags)}
    # The files are written by background threads while the metrics are computed (numpy and zlib release the GIL;
    # the bits at zlib level 1, see savez_quick); metrics.json, the mark of a finished evaluation, is written after
    # both.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="save") as savers:
        saving: list[Future] = [savers.submit(timed, clock, "saving_bits", atomic_write, output / "samples_bits.npz",
                                              lambda file: savez_quick(file, bits=bits, labels=label_array))]
        if images is not None:
            if cfg.save.npz:
                from bar_lightning.eval.metrics import save_adm_npz

                saving.append(savers.submit(timed, clock, "saving_npz", save_adm_npz, output / "samples.npz", images))
            if cfg.save.png:
                saving.append(savers.submit(timed, clock, "saving_png", save_png_grid_and_files, images, label_array,
                                            output / "samples"))
            if metric_names:
                began = time.perf_counter()
                result.update(score_images(images, label_array, cfg.metrics, metric_names, device,
                                           sample_features=features))
                clock.add("statistics_and_reference", time.perf_counter() - began)
        for future in saving:
            future.result()  # a failed write stops here, before metrics.json
    result["timings_s"] = {**clock.seconds(), "total_wall": round(time.perf_counter() - evaluation_began, 3)}
    atomic_write_json(output / "metrics.json", {**result, "provenance": record}, indent=2, sort_keys=True)
    log.info("metrics: %s", {key: value for key, value in result.items() if key != "timings_s"})
    log.info("time by stage (s): %s", result["timings_s"])
    return result


def timed(clock: StageClock, name: str, function: Any, *args: Any) -> Any:
    began = time.perf_counter()
    try:
        return function(*args)
    finally:
        clock.add(name, time.perf_counter() - began)


KNOWN_METRICS = ("fid", "sfid", "isc", "kid", "prc", "class_accuracy", "fid_demo")
# Metrics that compare the samples with metrics.reference (IS and class_accuracy need the samples alone).
METRICS_NEEDING_REFERENCE = ("fid", "sfid", "kid", "prc", "fid_demo")
REFERENCE_HINT = (
    "an ADM reference batch: for ImageNet 256 px `wget https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
    "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz` (docs/evaluation.md); for your own data, real images "
    "saved with bar_lightning.eval.metrics.save_adm_npz"
)


INCEPTION_HINT = (
    "torch-fidelity's release: wget -P pretrained https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


def metrics_to_compute(cfg: DictConfig, *, has_tokenizer: bool) -> list[str]:
    """The requested metrics that can be computed; each group that cannot is skipped with one line saying why.

    Without a tokenizer there are no images: bits are saved and nothing is scored. Without the reference file the
    metrics that compare with it are skipped; those of the samples alone (IS, class accuracy) remain.
    """
    names = list(dict.fromkeys(cfg.metrics.names))
    unknown = sorted(set(names) - set(KNOWN_METRICS))
    if unknown:
        raise ConfigError(f"metrics.names has unknown metrics {unknown}; use some of {list(KNOWN_METRICS)}")
    if not has_tokenizer:
        if names or cfg.save.npz or cfg.save.png:
            log.info("No tokenizer: saving the bits only (samples_bits.npz); images, samples.npz and metrics need "
                     "tokenizer.checkpoint=<ckpt> or tokenizer.upstream_weights + tokenizer.upstream_config")
        return []
    reference = cfg.metrics.reference
    compared = [name for name in names if name in METRICS_NEEDING_REFERENCE]
    if compared and not (reference and Path(reference).is_file()):
        log.info("metrics.reference=%s not found: skipping %s. They compare with %s", reference, ", ".join(compared),
                 REFERENCE_HINT)
        names = [name for name in names if name not in compared]
    return names


def check_metric_request(metrics: DictConfig, names: list[str], *, num_samples: int) -> None:
    """Fail before sampling when the metrics to compute cannot be (files, sample counts)."""
    names = set(names)
    if metrics.feature_network == "demo_classifier":
        if not metrics.demo_classifier or not Path(metrics.demo_classifier).is_file():
            raise FileNotFoundError(f"metrics.demo_classifier={metrics.demo_classifier!r} not found (make demo trains it)")
        return
    from bar_lightning.eval.metrics import check_weights_file

    try:
        check_weights_file(metrics.inception_weights,
                           what="FID Inception weights (weights-inception-2015-12-05-6726825d.pth)",
                           needed_by=f"metrics {sorted(names)} [metrics.inception_weights]")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} ({INCEPTION_HINT}); metrics.names=[] saves the samples without scoring "
                                "them") from None
    for name, label, dimension in (("fid", "FID", INCEPTION_FEATURE_DIM), ("sfid", "sFID", SFID_FEATURE_DIM)):
        if name in names and num_samples <= dimension and not metrics.allow_small_sample:
            raise ConfigError(
                f"{label} from {num_samples} samples: the {dimension}-d feature covariance is rank-deficient below "
                f"{dimension + 1} samples (the standard protocol uses 50,000). Sample more, or set "
                "metrics.allow_small_sample=true to compute it anyway"
            )
    if "kid" in names and metrics.kid_subset_size > num_samples:
        raise ConfigError(f"metrics.kid_subset_size={metrics.kid_subset_size} > {num_samples} samples; lower it")


def score_images(images: np.ndarray, labels: np.ndarray, metrics: DictConfig, names: list[str],
                 device: torch.device, *, sample_features: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Inception metrics with torch-fidelity (from the streamed `sample_features` when given), or the demo
    classifier's accuracy and feature distance."""
    compared = any(name in METRICS_NEEDING_REFERENCE for name in names)
    if metrics.feature_network == "demo_classifier":
        from bar_lightning.eval.demo_classifier import classifier_metrics, features, load_classifier

        classifier = load_classifier(metrics.demo_classifier).to(device).eval()
        reference_features = None
        if compared:
            reference = np.load(metrics.reference, allow_pickle=False)["arr_0"]
            reference_features = features(classifier, uint8_to_model_input(reference), batch_size=500)
        values = classifier_metrics(
            classifier, uint8_to_model_input(images),
            labels=torch.from_numpy(labels) if "class_accuracy" in names else None,
            reference_features=reference_features, batch_size=500,
        )
        return {key: float(value) for key, value in values.items()}
    from bar_lightning.eval.metrics import compute_generation_metrics, metrics_of_sample_features

    options = dict(reference=metrics.reference if compared else None, inception_weights=metrics.inception_weights,
                   metrics=tuple(names), batch_size=metrics.batch_size, device=device,
                   kid_subset_size=metrics.kid_subset_size, allow_small_sample=metrics.allow_small_sample)
    if sample_features is not None:
        return metrics_of_sample_features(sample_features, sample_shape=images.shape, **options)
    return compute_generation_metrics(images, **options)


def uint8_to_model_input(images: np.ndarray) -> torch.Tensor:
    """`[N, H, W, 3]` uint8 -> `[N, 3, H, W]` float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
