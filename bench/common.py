"""Shared helpers of the benchmark scripts: compose an experiment, randomise weights, time, describe the machine.

Benchmarks are scripts, not tests: they print a table and write JSON; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from bar_lightning.config.schema import validate_train_config
from bar_lightning.io import atomic_write_json
from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.layers import GaussianFourierEmbedding, RMSNorm

ROOT = Path(__file__).resolve().parents[1]


def compose_experiment(
    experiment: str, overrides: list[str] | None = None, output_dir: str = "/tmp/bar_bench"
) -> DictConfig:
    """The validated train.py config of `experiment=<name>` plus `overrides` (no logger, no callbacks)."""
    base = [f"experiment={experiment}", "logger=none", "callbacks=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir  # outside a Hydra run there is no runtime output directory
    return validate_train_config(cfg)


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give every floating parameter non-zero random values (norm weights near 1), drawn on its own device.

    Fresh BAR models start with zero adaLN modulations (every block is the identity) and zero biases; timing on
    zeros flatters matrix units and hides bugs, so benchmarks use dense random weights.
    """
    generators: dict[torch.device, torch.Generator] = {}
    norm_weights = {id(sub.weight) for sub in module.modules() if isinstance(sub, RMSNorm | torch.nn.LayerNorm)}
    for parameter in module.parameters():
        if parameter.is_floating_point():
            generator = generators.setdefault(parameter.device, torch.Generator(parameter.device).manual_seed(seed))
            parameter.normal_(1.0 if id(parameter) in norm_weights else 0.0, std, generator=generator)
    return module


def random_generator_on(device: torch.device, **model_kwargs: Any) -> BARGenerator:
    """A BARGenerator with random dense weights built directly on `device` (no CPU copy of large heads)."""
    with torch.device("meta"):
        model = BARGenerator(**model_kwargs)
    model.to_empty(device=device)
    model.init_non_persistent_buffers()
    for module in model.modules():
        if isinstance(module, GaussianFourierEmbedding):
            module.W.normal_()  # fixed random frequencies, as at construction
    return randomise_(model)


def matmul_weights_per_row(model: BARGenerator) -> tuple[int, int]:
    """Weights each row multiplies once: (backbone blocks, MBM/linear head); embedding tables are lookups, not
    products. One row costs 2 FLOP per weight."""
    backbone = sum(p.numel() for block in model.blocks for p in block.parameters() if p.ndim == 2)
    head = sum(p.numel() for name, p in model.lm_head.named_parameters() if p.ndim == 2 and "input_embed" not in name)
    return backbone, head


MATMUL_TAGS = ("gemm", "cutlass", "sm90_xmma", "cublas", "matmul", "gemv", "nvjet")
ATTENTION_TAGS = ("fmha", "attention", "flash", "attn")
# cuDNN's convolution kernels (forward, data and weight gradients); some share the "sm90_xmma" prefix of GEMMs.
CONVOLUTION_TAGS = ("fprop", "dgrad", "wgrad", "convolve", "conv2d", "winograd")
# The NCHW <-> NHWC transposes cuDNN runs around tensor-core convolutions of channels-first tensors (what
# channels_last would save).
LAYOUT_TAGS = ("nchwtonhwc", "nhwctonchw")


def kernel_table(prof: Any, on_cuda: bool, top: int = 25) -> dict[str, Any]:
    """Device time by kernel family (matmul / convolution / layout conversion / attention / compiled Triton / other)
    and the `top` kernels of a finished `torch.profiler.profile`."""
    families = {"matmul": 0.0, "convolution": 0.0, "layout_conversion": 0.0, "attention": 0.0, "triton_fused": 0.0,
                "other": 0.0}
    kernels, per_kernel = 0, []
    for event in prof.key_averages():
        device_us = event.device_time_total if on_cuda else event.self_cpu_time_total
        if device_us <= 0 or event.count <= 0:
            continue
        if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # operator rows also carry their kernels' device time: count the kernels only
        name = event.key.lower()
        kernels += event.count
        per_kernel.append({"kernel": event.key[:120], "calls": event.count, "total_s": device_us / 1e6,
                           "mean_us": device_us / event.count})
        triton = name.startswith("triton")
        if any(tag in name for tag in ATTENTION_TAGS):
            families["attention"] += device_us
        elif not triton and any(tag in name for tag in CONVOLUTION_TAGS):
            families["convolution"] += device_us
        elif not triton and any(tag in name for tag in LAYOUT_TAGS):
            families["layout_conversion"] += device_us
        elif any(tag in name for tag in MATMUL_TAGS):
            families["matmul"] += device_us
        elif triton:
            families["triton_fused"] += device_us
        else:
            families["other"] += device_us
    result: dict[str, Any] = {f"profile_{key}_s": value / 1e6 for key, value in families.items()}
    result["profile_kernels"] = kernels
    result["profile_device_total_s"] = sum(families.values()) / 1e6
    result["top_kernels"] = sorted(per_kernel, key=lambda row: -row["total_s"])[:top]
    return result


def print_kernel_table(profile: dict[str, Any]) -> None:
    print("profile:", {k: v for k, v in profile.items() if k not in ("top_kernels", "triton_sources")}, flush=True)
    for row in profile["top_kernels"]:
        print(f"  {row['total_s']:8.4f} s {row['calls']:7d} x {row['mean_us']:8.1f} us  {row['kernel'][:100]}")


def start_profiler() -> Any:
    """An entered `torch.profiler.profile` of the device kernels (of the CPU operators without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU])
    profiler.__enter__()
    return profiler


def finish_profiler(profiler: Any, profiled_steps: int, sources: int = 8) -> dict[str, Any]:
    """Stop an entered profiler (after the device finished its work) and return its `kernel_table`, with the source
    of its `sources` costliest Triton kernels (`triton_sources`) on a GPU."""
    synchronize()
    profiler.__exit__(None, None, None)
    table = kernel_table(profiler, torch.cuda.is_available())
    table["profiled_steps"] = profiled_steps
    if torch.cuda.is_available() and sources:
        triton = [row["kernel"] for row in table["top_kernels"] if row["kernel"].startswith("triton_")][:sources]
        try:
            table["triton_sources"] = triton_kernel_sources(triton)
        except Exception as error:  # a diagnostic: the timed rows must still be written
            table["triton_sources"] = {"error": [f"{type(error).__name__}: {error}"]}
    return table


def triton_kernel_sources(names: list[str], cache_dir: str | Path | None = None,
                          per_kernel: int = 2) -> dict[str, list[str]]:
    """The source of each named Inductor Triton kernel, read from Inductor's cache (`cache_dir`, default the
    process's: TORCHINDUCTOR_CACHE_DIR), so a device call returns what its costliest kernels compute and how they
    are tiled. Inductor writes every kernel it compiles (or takes from a cache) to a file of its own there; names
    are numbered per graph, so two graphs can have a kernel of the same name: up to `per_kernel` different sources
    are kept. A name not found is absent."""
    if cache_dir is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        cache_dir = inductor_cache_dir()
    root = Path(cache_dir)
    markers = {name: f"def {name}(" for name in names}
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")) if root.is_dir() else []:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if text.count("@triton.jit") != 1:
            continue  # a graph's wrapper module holds all its kernels as strings: the kernels' own files suffice
        for name, marker in markers.items():
            if marker in text:
                sources = found.setdefault(name, [])
                if text not in sources and len(sources) < per_kernel:
                    sources.append(text)
    return found


class BatchWindow(L.Callback):
    """Calls `begin()` before the training batch `first_batch` (counted from 0) and `end()` after the batch
    `first_batch + num_batches - 1`; one batch is one optimiser step of the generator, one G or D step of the
    tokenizer."""

    def __init__(self, first_batch: int, num_batches: int = 2) -> None:
        self.first_batch, self.num_batches = first_batch, num_batches
        self.batches_seen, self.open = 0, False

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.batches_seen == self.first_batch:
            self.begin()
            self.open = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches_seen += 1
        if self.open and self.batches_seen == self.first_batch + self.num_batches:
            self.open = False
            self.end()


class MemoryWindow(BatchWindow):
    """The CUDA allocator history over the window, summarised (bench/memory_snapshot.py: the peak and what is alive
    at it)."""

    summary: dict[str, Any] | None = None

    def begin(self) -> None:
        from memory_snapshot import record_memory_history

        self.baseline = record_memory_history()

    def end(self) -> None:
        from memory_snapshot import summarise_recording

        self.summary = {**summarise_recording(self.baseline), "recorded_batches": self.num_batches}


class StepProfiler(BatchWindow):
    """The device kernels of the window (torch.profiler), as a `kernel_table`."""

    table: dict[str, Any] | None = None

    def begin(self) -> None:
        self.profiler = start_profiler()

    def end(self) -> None:
        self.table = finish_profiler(self.profiler, self.num_batches)
        self.profiler = None


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StreamClock:
    """Timestamps of points in the device's work, taken without making the host wait: on CUDA each `mark()` records
    an event on the current stream (its time is when the GPU reaches it, idle gaps included); on the CPU it reads
    the clock. `seconds_between()` synchronises once and returns the gaps between consecutive marks.

    The steps of a training loop timed this way run as in a real run: a bench that synchronised at every step
    boundary would itself stop the host from queueing the next step while the GPU runs this one, and charge the host's
    loop between steps to every step of a code that never waits for the GPU."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.marks: list[Any] = []

    def stamp(self) -> Any:
        """A timestamp of this point (a recorded CUDA event, or the CPU clock), not kept among the marks."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self) -> None:
        self.marks.append(self.stamp())

    def seconds_between(self, last: Any = None) -> list[float]:
        """Seconds between consecutive marks, and from the last mark to the stamp `last` if given."""
        marks = self.marks if last is None else [*self.marks, last]
        if self.cuda:
            synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


class TimedBatches:
    """A loader for an official training loop: `count` batches made by `batch(index)`, a `StreamClock` mark at each
    take and once after the last, so `durations()` brackets every step the loop runs (without synchronising the
    device in between: the loop's own waits are the only ones). With `profile_from`, the `profile_batches` steps from
    that batch on are recorded by torch.profiler (`table`); `on_take(index)` is called at each take, after the mark
    (and with `count` after the last step)."""

    def __init__(self, batch: Callable[[int], Any], count: int, profile_from: int | None = None,
                 profile_batches: int = 2, on_take: Callable[[int], None] | None = None) -> None:
        self.batch, self.count, self.on_take = batch, count, on_take
        self.profile_from, self.profile_batches = profile_from, profile_batches
        self.clock = StreamClock()
        self.table: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.count

    def durations(self) -> list[float]:
        """Seconds of each step taken (synchronises once)."""
        return self.clock.seconds_between()

    def __iter__(self):
        profiler = None
        for index in range(self.count + 1):
            self.clock.mark()
            if profiler is not None and index == self.profile_from + self.profile_batches:
                self.table = finish_profiler(profiler, self.profile_batches)
                profiler = None
            if self.on_take is not None:
                self.on_take(index)
            if index == self.count:
                return
            if index == self.profile_from:
                profiler = start_profiler()
            yield self.batch(index)


class StepTimer(L.Callback):
    """Duration of every training batch, from a `StreamClock` mark at each batch start to the next (the last one to
    its end): the device's time per step, the host's loop between steps included where the device waited for it,
    with no synchronisation added to the steps."""

    def __init__(self) -> None:
        self.clock = StreamClock()
        self._last_end: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._last_end = self.clock.stamp()

    @property
    def durations(self) -> list[float]:
        """Seconds of each batch (synchronises once); read after the fit."""
        return [] if self._last_end is None else self.clock.seconds_between(last=self._last_end)


def time_calls(call: Callable[[int], Any], *, warmup: int, timed: int) -> list[float]:
    """Seconds of each timed call (warm-up calls excluded), synchronised before and after each call."""
    for index in range(warmup):
        call(index)
    synchronize()
    durations = []
    for index in range(timed):
        start = time.perf_counter()
        call(warmup + index)
        synchronize()
        durations.append(time.perf_counter() - start)
    return durations


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, multiprocessors=properties.multi_processor_count)
    else:
        info["gpu"] = "none (CPU)"
    return info


def write_results(path: str | None, results: dict[str, Any]) -> None:
    if not path:
        return
    atomic_write_json(path, results, indent=2, default=str)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(column), *(len(format_cell(row.get(column))) for row in rows)) for column in columns]
    print(" | ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("-+-".join("-" * width for width in widths))
    for row in rows:
        print(" | ".join(format_cell(row.get(column)).ljust(width) for column, width in zip(columns, widths)))


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
