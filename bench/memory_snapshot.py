"""What is alive on the GPU at the peak of a training step: a CUDA memory-history recording, summarised.

`record_memory_history()` starts torch's allocator history (Python stacks); `summarise_recording(baseline_bytes)`
stops it, takes the snapshot and replays its trace: every allocation and free in the recorded window, in order, so
the moment of the peak and the blocks alive then are known. Each block alive at the peak is charged to the first
frame of its stack that lies in the training code (bar_lightning, the official code, torch.optim, Lightning, the
autograd engine's caller), which splits the peak into weights-and-state present before the window (the baseline),
activations of each network, gradients and optimiser temporaries. Used by bench/tokenizer_training.py and
bench/official_tokenizer.py (`--memory-snapshot`), to find where the eager tokenizer step of bar_lightning holds more
than the official one (docs/benchmarks.md, issue 16).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# Frames of these files are where the allocation was asked for; frames of others (torch internals, functional
# wrappers) are skipped when naming the allocation's owner. Order: the most specific first.
OWNER_MARKERS = ("/bar_lightning/", "/modeling/", "/utils/train_utils", "/torch/optim/", "/lightning/",
                 "/accelerate/", "/torch/autograd/", "/transformers/", "/timm/", "/torchvision/")


def owner_of(frames: Iterable[Mapping[str, Any]]) -> str:
    """`file:function` of the innermost frame in the training code, or of the innermost frame at all."""
    frames = list(frames)
    for frame in frames:  # innermost first
        filename = str(frame.get("filename", ""))
        if any(marker in filename for marker in OWNER_MARKERS):
            return f"{short_path(filename)}:{frame.get('name', '?')}"
    if frames:
        return f"{short_path(str(frames[0].get('filename', '?')))}:{frames[0].get('name', '?')}"
    return "(no Python stack: allocated by C++, e.g. the autograd engine's backward)"


def short_path(filename: str) -> str:
    for marker in ("/bar_lightning/", "/modeling/", "/utils/", "/torch/", "/lightning/", "/accelerate/",
                   "/transformers/", "/timm/", "/torchvision/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename.rsplit("/", 1)[-1]


def summarise_trace(events: Iterable[Mapping[str, Any]], baseline_bytes: int, top: int = 20) -> dict[str, Any]:
    """Replay `alloc` / `free_completed` events; return the peak (baseline included), when it happened, and the
    bytes alive at that moment by owner. Blocks freed in the window but allocated before it only lower the total."""
    events = list(events)

    def replay(until: int) -> tuple[int, int, dict[int, tuple[int, Any]]]:
        alive: dict[int, tuple[int, Any]] = {}
        current = peak = 0
        peak_index = -1
        for index, event in enumerate(events[: until + 1]):
            action, address, size = event.get("action"), int(event.get("addr", 0)), int(event.get("size", 0))
            if action == "alloc":
                alive[address] = (size, event.get("frames", ()))
                current += size
                if current > peak:
                    peak, peak_index = current, index
            elif action == "free_completed":
                block = alive.pop(address, None)
                current -= block[0] if block is not None else size
        return peak, peak_index, alive

    peak, peak_index, _ = replay(len(events) - 1)
    # Replayed again up to the peak: the blocks alive at that moment (copying them at every new peak would cost the
    # square of the trace's length).
    _, _, alive_at_peak = replay(peak_index) if peak_index >= 0 else (0, -1, {})
    by_owner: dict[str, int] = defaultdict(int)
    for size, frames in alive_at_peak.values():
        by_owner[owner_of(frames)] += size
    ranked = sorted(by_owner.items(), key=lambda item: -item[1])
    return {
        "baseline_bytes": baseline_bytes,
        "peak_bytes": baseline_bytes + peak,
        "peak_event_index": peak_index,
        "alive_at_peak_by_owner": dict(ranked[:top]),
        "alive_at_peak_other_bytes": sum(size for _, size in ranked[top:]),
    }


def record_memory_history(max_entries: int = 2_000_000) -> int:
    """Start the allocator history; return the bytes allocated now (the baseline: what the window did not make)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--memory-snapshot records the CUDA caching allocator: it needs a GPU")
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    return torch.cuda.memory_allocated()


def summarise_recording(baseline_bytes: int, top: int = 20) -> dict[str, Any]:
    """Stop the history started by `record_memory_history` and summarise it (see `summarise_trace`)."""
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    summary = summarise_trace(snapshot["device_traces"][device], baseline_bytes, top)
    summary["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return summary


def print_summary(summary: Mapping[str, Any]) -> None:
    gib = 2**30
    print(f"memory: peak {summary['peak_bytes'] / gib:.2f} GiB = baseline {summary['baseline_bytes'] / gib:.2f} GiB "
          f"(weights, gradients, optimiser and EMA state before the window) + alive at the peak:", flush=True)
    for owner, size in summary["alive_at_peak_by_owner"].items():
        print(f"  {size / gib:7.3f} GiB  {owner}")
    print(f"  {summary['alive_at_peak_other_bytes'] / gib:7.3f} GiB  (the rest)")
