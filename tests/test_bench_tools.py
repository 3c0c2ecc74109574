"""The analysis helpers of the benchmark scripts (bench/): kernel families of a profile, the timed loader of the
official loops, and the replay of a CUDA allocator trace. The GPU runs that use them cannot be checked here; what
they compute from their recordings can."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from common import BatchWindow, StepTimer, TimedBatches, kernel_table  # noqa: E402
from memory_snapshot import owner_of, summarise_trace  # noqa: E402


class FakeEvent:
    def __init__(self, key: str, microseconds: float, count: int = 1) -> None:
        self.key, self.count = key, count
        self.device_time_total = self.self_cpu_time_total = microseconds


class FakeProfile:
    def __init__(self, events: list[FakeEvent]) -> None:
        self.events = events

    def key_averages(self) -> list[FakeEvent]:
        return self.events


def test_kernel_families_separate_convolutions_and_layout_conversions_from_gemms():
    names_and_families = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16": "convolution",
        "cutlass_tensorop_bf16_s16816wgrad_optimized_bf16": "convolution",
        "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>": "layout_conversion",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "matmul",
        "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN": "matmul",
        "flash_fwd_kernel": "attention",
        "triton_tem_fused_flex_attention_0": "attention",
        "triton_poi_fused_convolution_backward_3": "triton_fused",
        "void at::native::elementwise_kernel<128, 2>": "other",
    }
    durations = {name: float(10 * (index + 1)) for index, name in enumerate(names_and_families)}
    table = kernel_table(FakeProfile([FakeEvent(name, us) for name, us in durations.items()]), on_cuda=False)
    for family in ("matmul", "convolution", "layout_conversion", "attention", "triton_fused", "other"):
        expected = sum(us for name, us in durations.items() if names_and_families[name] == family) / 1e6
        assert table[f"profile_{family}_s"] == pytest.approx(expected), family
    assert table["profile_device_total_s"] == pytest.approx(sum(durations.values()) / 1e6)
    assert table["profile_kernels"] == len(durations)
    assert table["top_kernels"][0]["kernel"] == "void at::native::elementwise_kernel<128, 2>"


def test_timed_batches_time_every_step_and_profile_only_the_asked_window():
    taken = []
    batches = TimedBatches(lambda index: torch.full((32, 32), float(index)), 8, profile_from=4, profile_batches=2,
                           on_take=taken.append)
    seen = []
    for batch in batches:
        seen.append(int(batch[0, 0]))
        torch.mm(batch, batch)
    assert seen == list(range(8))
    durations = batches.durations()  # between consecutive marks: one per take, plus the end
    assert len(durations) == 8 and all(duration >= 0 for duration in durations)
    assert taken == list(range(9))
    assert batches.table is not None and batches.table["profiled_steps"] == 2
    # The profile holds the matrix products of batches 4 and 5 only.
    calls = {row["kernel"]: row["calls"] for row in batches.table["top_kernels"]}
    assert calls.get("aten::mm") == 2, calls

    plain = TimedBatches(lambda index: index, 3)
    assert list(plain) == [0, 1, 2] and len(plain.durations()) == 3 and plain.table is None


def test_step_timer_times_every_batch_from_its_start_to_the_next():
    import time

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Slow(BoringModel):
        def training_step(self, batch, batch_idx):
            time.sleep(0.02 * (batch_idx + 1))
            return super().training_step(batch, batch_idx)

    timer = StepTimer()
    assert timer.durations == []
    trainer = L.Trainer(accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(Slow())
    durations = timer.durations
    assert len(durations) == 4 and durations == timer.durations  # reading them twice changes nothing
    for index, duration in enumerate(durations):
        assert 0.02 * (index + 1) <= duration < 0.02 * (index + 1) + 0.5


def test_batch_window_opens_before_its_first_batch_and_closes_after_its_last():
    events = []

    class Recording(BatchWindow):
        def begin(self) -> None:
            events.append(("begin", self.batches_seen))

        def end(self) -> None:
            events.append(("end", self.batches_seen))

    window = Recording(first_batch=2, num_batches=2)
    for index in range(6):
        window.on_train_batch_start(None, None, None, index)
        events.append(("batch", index))
        window.on_train_batch_end(None, None, None, None, index)
    assert events == [("batch", 0), ("batch", 1), ("begin", 2), ("batch", 2), ("batch", 3), ("end", 4),
                      ("batch", 4), ("batch", 5)]


def frames(*files: str) -> list[dict[str, object]]:
    return [{"filename": file, "line": 1, "name": f"f{index}"} for index, file in enumerate(files)]


def test_owner_is_the_innermost_frame_in_training_code():
    stack = frames("/usr/lib/python3/site-packages/torch/nn/functional.py",
                   "/work/src/bar_lightning/models/losses.py", "/work/src/bar_lightning/lightning/tokenizer_module.py")
    assert owner_of(stack) == "bar_lightning/models/losses.py:f1"
    assert owner_of(frames("/x/site-packages/torch/nn/modules/conv.py")) == "torch/nn/modules/conv.py:f0"
    assert owner_of([]).startswith("(no Python stack")


def test_trace_replay_finds_the_peak_and_what_is_alive_at_it():
    loss = frames("/src/bar_lightning/models/losses.py")
    optimiser = frames("/site-packages/torch/optim/adamw.py")
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": loss},
        {"action": "alloc", "addr": 2, "size": 300, "frames": loss},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet free: the stream may still use it
        {"action": "alloc", "addr": 3, "size": 50, "frames": optimiser},  # the peak: 450
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "free_completed", "addr": 99, "size": 1000},  # allocated before the window (baseline)
        {"action": "alloc", "addr": 4, "size": 1200, "frames": optimiser},  # 50 - 1000 + 1200 = 250: no new peak
    ]
    summary = summarise_trace(events, baseline_bytes=5000)
    assert summary["peak_bytes"] == 5450 and summary["peak_event_index"] == 3
    assert summary["alive_at_peak_by_owner"] == {"bar_lightning/models/losses.py:f0": 400,
                                                  "torch/optim/adamw.py:f0": 50}
    assert summary["alive_at_peak_other_bytes"] == 0
    top_one = summarise_trace(events, baseline_bytes=0, top=1)
    assert top_one["alive_at_peak_by_owner"] == {"bar_lightning/models/losses.py:f0": 400}
    assert top_one["alive_at_peak_other_bytes"] == 50
    assert summarise_trace([], baseline_bytes=7)["peak_bytes"] == 7


COMPILE_AND_CACHE = """
import os, sys
sys.path.insert(0, {bench!r})
import torch
import compile_cache
from torch._dynamo.utils import counters

loaded = compile_cache.load("ours_training")
# Two runs in one process (as a bench with several variants), one save at the end.
for layer in {layers}:
    model = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 16), layer, torch.nn.LayerNorm(16)))
    model(torch.randn(4, 16)).sum().backward()
written = compile_cache.save({key!r}, part_bytes={part_bytes})
print("RESULT", loaded, compile_cache.loaded_artifacts(), counters["inductor"]["fxgraph_cache_hit"],
      counters["inductor"]["fxgraph_cache_miss"], len(written))
"""


def start_compiling_in_fresh_process(tmp_path, name: str, cache_in, cache_out, key: str, layers: str,
                                     part_bytes: int = 2**20):
    """Start compiling small modules (`layers`: a Python tuple of activations) in a new process with an empty
    Inductor cache of its own, which saves blob `key`; `compile_result` waits for it."""
    import os
    import subprocess

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}"),
           "BENCH_COMPILE_CACHE_IN": str(cache_in), "BENCH_COMPILE_CACHE_OUT": str(cache_out)}
    script = COMPILE_AND_CACHE.format(bench=str(BENCH), key=key, layers=layers, part_bytes=part_bytes)
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def compile_result(process) -> list[int]:
    """What a process of `start_compiling_in_fresh_process` printed: artifacts loaded (twice: load's return and
    loaded_artifacts), FX-graph cache hits and misses, parts written."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    return [int(value) for value in line.split()[1:]]


# `make test-full` only: 16-38 s of fresh processes, kept out of `make test` so that CI stays under 20 minutes.
@pytest.mark.slow
def test_compile_cache_carries_compiled_graphs_to_a_fresh_machine(tmp_path):
    carried = tmp_path / "carried"
    both = "(torch.nn.GELU(), torch.nn.SiLU())"
    # First machine: nothing to load, everything compiled, saved in several parts (a call returns files <= 16 MiB).
    loaded, _, hits, misses, parts = compile_result(start_compiling_in_fresh_process(
        tmp_path, "first", carried, carried, "ours_training_a", both, part_bytes=20_000))
    assert (loaded, hits) == (0, 0) and misses > 0 and parts > 1
    assert sorted(path.name for path in carried.iterdir()) == [
        f"ours_training_a.megacache.xz.{number:02d}" for number in range(parts)]
    # Two more machines at once, each with its own empty Inductor cache and its own folder for what it writes.
    # The second runs the same kind of run: every graph comes from the blob, and a save that adds nothing writes
    # nothing. The third, another kind of run, loads the first blob by its prefix, compiles only what it lacks, and
    # writes its own blob (torch re-saves only the loaded artifacts a process uses, hence a key per kind of run).
    returned_second, returned_third = tmp_path / "returned_second", tmp_path / "returned_third"
    second = start_compiling_in_fresh_process(tmp_path, "second", carried, returned_second, "ours_training_a", both)
    third = start_compiling_in_fresh_process(tmp_path, "third", carried, returned_third, "ours_training_b",
                                             "(torch.nn.GELU(), torch.nn.Tanh())")
    try:
        loaded, recorded, hits, misses, parts = compile_result(second)
        assert loaded > 0 and recorded == loaded and hits == 2 * 2 and misses == 0 and parts == 0
        assert not returned_second.exists()
        loaded, _, hits, misses, parts = compile_result(third)
        assert loaded > 0 and hits == 2 and misses == 2 and parts == 1
        assert [path.name for path in returned_third.iterdir()] == ["ours_training_b.megacache.xz.00"]
    finally:
        for process in (second, third):
            if process.poll() is None:
                process.kill()
                process.wait()


class FakeCacheInfo:
    def __init__(self, keys: list[str]) -> None:
        self.artifacts = {"inductor": keys}


def test_compile_cache_loads_by_prefix_saves_once_and_skips_what_it_loaded(tmp_path, monkeypatch, capsys):
    import lzma
    import pickle

    import compile_cache

    monkeypatch.setattr(compile_cache, "_loaded", set())
    monkeypatch.setattr(compile_cache, "_saved", False)
    loaded_blobs: list[list[str]] = []

    def fake_load(blob: bytes) -> FakeCacheInfo:
        loaded_blobs.append(pickle.loads(blob))
        return FakeCacheInfo(loaded_blobs[-1])

    recorded = ["a", "b"]
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", fake_load)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (pickle.dumps(recorded), FakeCacheInfo(recorded)))
    folder = tmp_path / "carried"
    folder.mkdir()
    for key, keys in {"ours_tokenizer_generator": ["a"], "ours_tokenizer_gan": ["a", "b"],
                      "official_tokenizer_generator": ["z"]}.items():
        (folder / f"{key}.megacache.xz.00").write_bytes(lzma.compress(pickle.dumps(keys)))
    assert compile_cache.load("ours_tokenizer", folder) == 3
    assert sorted(loaded_blobs) == [["a"], ["a", "b"]] and compile_cache.loaded_artifacts() == 2
    # Every artifact of the process was loaded: nothing to write.
    assert compile_cache.save("ours_tokenizer_gan", tmp_path / "out") == []
    with pytest.raises(RuntimeError, match="once per process"):
        compile_cache.save("ours_tokenizer_gan", tmp_path / "out")
    monkeypatch.setattr(compile_cache, "_saved", False)
    recorded.append("c")
    (written,) = compile_cache.save(compile_cache.key_of("ours_tokenizer", "bar_fsq_16bits", "generator,gan", "default"),
                                    tmp_path / "out")
    assert written.name == "ours_tokenizer_bar_fsq_16bits_generator-gan_default.megacache.xz.00"
    assert pickle.loads(lzma.decompress(written.read_bytes())) == ["a", "b", "c"]
    assert "saved 3 artifacts" in capsys.readouterr().out


def test_compile_cache_refuses_truncated_or_incomplete_blobs_and_compiles_without_them(tmp_path, capsys):
    import lzma

    import compile_cache

    folder = tmp_path / "carried"
    folder.mkdir()
    data = lzma.compress(bytes(range(256)) * 400)
    (folder / "ours_tokenizer.megacache.xz.00").write_bytes(data[: len(data) // 2])
    assert compile_cache.load("ours_tokenizer", folder) == 0
    assert "ours_tokenizer: not loaded (ValueError: the xz stream is truncated" in capsys.readouterr().out
    # A part missing in the middle.
    (folder / "ours_tokenizer.megacache.xz.02").write_bytes(data[len(data) // 2 :])
    assert compile_cache.load("ours_tokenizer", folder) == 0
    assert "parts [0, 2] are not 0..1" in capsys.readouterr().out
    # Whole, with the last part of a longer older blob left behind.
    (folder / "ours_tokenizer.megacache.xz.00").write_bytes(data)
    (folder / "ours_tokenizer.megacache.xz.01").write_bytes(data[-40:])
    (folder / "ours_tokenizer.megacache.xz.02").unlink()
    assert compile_cache.load("ours_tokenizer", folder) == 0
    assert "40 bytes follow the xz stream" in capsys.readouterr().out
    # A byte flipped inside the stream: xz's checksum catches it.
    (folder / "ours_tokenizer.megacache.xz.01").unlink()
    (folder / "ours_tokenizer.megacache.xz.00").write_bytes(data[:60] + bytes([data[60] ^ 0xFF]) + data[61:])
    assert compile_cache.load("ours_tokenizer", folder) == 0
    assert "ours_tokenizer: not loaded (LZMAError" in capsys.readouterr().out
    # Whole but not a compile cache.
    for path in folder.iterdir():
        path.unlink()
    (folder / "ours_tokenizer.megacache.xz.00").write_bytes(data)
    assert compile_cache.load("ours_tokenizer", folder) == 0
    assert "ours_tokenizer: not loaded (ValueError: torch.compiler.load_cache_artifacts could not read it)" in (
        capsys.readouterr().out)
    # No blob of that key, or no folder at all: nothing to say.
    assert compile_cache.load("official_tokenizer", folder) == 0
    assert compile_cache.load("ours_tokenizer", tmp_path / "absent") == 0
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="'ours tokenizer'"):
        compile_cache.save("ours tokenizer", folder)
    assert compile_cache.key_of("ours tokenizer", "a/b") == "ours-tokenizer_a-b"


def test_returned_compile_cache_replaces_every_part_of_the_older_blob(tmp_path, capsys):
    import lzma
    import zlib

    import compile_cache

    carried, returned = tmp_path / "carried", tmp_path / "returned"
    carried.mkdir()
    returned.mkdir()
    for number in range(3):  # an older blob of three parts, and other keys that stay
        (carried / f"ours_tokenizer.megacache.xz.{number:02d}").write_bytes(b"old")
    (carried / "official_tokenizer.megacache.xz.00").write_bytes(b"official")
    (carried / "ours_training.megacache.xz.00").write_bytes(b"older training")
    new = b" ".join(str(number * number).encode() for number in range(20_000))
    compile_cache.write_blob(returned, "ours_tokenizer", lzma.compress(new, preset=0), part_bytes=1000)
    # A blob of the earlier zlib format is converted; a returned blob cut short is left out and the carried one stays.
    (returned / "official_training.megacache.zlib.00").write_bytes(zlib.compress(b"zlib blob"))
    cut = lzma.compress(b"training" * 1000)
    (returned / "ours_training.megacache.xz.00").write_bytes(cut[:-20])
    assert compile_cache.take(returned, carried, part_bytes=100) == ["official_training", "ours_tokenizer"]
    assert "ours_training: not taken (ValueError: the xz stream is truncated" in capsys.readouterr().out
    parts = compile_cache.blob_parts(carried)
    assert sorted(parts) == ["official_tokenizer", "official_training", "ours_tokenizer", "ours_training"]
    assert [path.name for path in parts["ours_tokenizer"]] == [
        f"ours_tokenizer.megacache.xz.{number:02d}" for number in range(len(parts["ours_tokenizer"]))]
    # Compressed again at the strongest preset: smaller than the returned fast one, the same artifacts.
    assert sum(path.stat().st_size for path in parts["ours_tokenizer"]) < len(lzma.compress(new, preset=0))
    assert compile_cache.read_blob(parts["ours_tokenizer"]) == new
    assert compile_cache.read_blob(parts["official_training"]) == b"zlib blob"
    assert parts["official_tokenizer"][0].read_bytes() == b"official"
    assert parts["ours_training"][0].read_bytes() == b"older training"
    assert not list(carried.glob("*.zlib.*")) and not list(carried.glob("*.tmp"))


def test_triton_kernel_sources_are_read_from_each_kernels_own_file(tmp_path):
    from common import triton_kernel_sources

    def kernel_file(name: str, body: str) -> str:
        return f"import triton\n@triton_heuristics.pointwise()\n@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel):\n{body}\n"

    (tmp_path / "ab").mkdir()
    (tmp_path / "cd").mkdir()
    (tmp_path / "ab" / "k1.py").write_text(kernel_file("triton_poi_fused_cat_52", "    pass  # first graph"))
    (tmp_path / "cd" / "k2.py").write_text(kernel_file("triton_poi_fused_cat_52", "    pass  # second graph"))
    (tmp_path / "cd" / "k3.py").write_text(kernel_file("triton_poi_fused_cat_5", "    pass"))
    (tmp_path / "cd" / "k4.py").write_text(kernel_file("triton_poi_fused_cat_52", "    pass  # first graph")
                                           .replace("first", "third"))
    # A graph's wrapper module: every kernel as a string, not read.
    (tmp_path / "cd" / "wrapper.py").write_text(kernel_file("triton_poi_fused_cat_52", "    pass  # wrapper") * 2)
    sources = triton_kernel_sources(["triton_poi_fused_cat_52", "triton_poi_fused_cat_5", "triton_red_absent_1"],
                                    tmp_path, per_kernel=2)
    assert sorted(sources) == ["triton_poi_fused_cat_5", "triton_poi_fused_cat_52"]
    # The kernel _5 is not mistaken for _52, and at most per_kernel sources of one name are kept.
    assert sources["triton_poi_fused_cat_5"] == [(tmp_path / "cd" / "k3.py").read_text()]
    assert sources["triton_poi_fused_cat_52"] == [(tmp_path / "ab" / "k1.py").read_text(),
                                                  (tmp_path / "cd" / "k2.py").read_text()]
    assert triton_kernel_sources(["triton_poi_fused_cat_52"], tmp_path / "absent") == {}


TURN_TAKER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from turns import Turns
name, compile_s, timed_s = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
turns = Turns.from_environment()
time.sleep(compile_s)  # the compilation and warm-up, side by side with the others
if name == "crashes":
    sys.exit(3)
turns.arrive_and_take_turn()
start = time.time()
time.sleep(timed_s)  # the timed steps, alone
print(json.dumps({"name": name, "start": start, "end": time.time(), **turns.record}))
"""


def run_turn_takers(tmp_path, takers, deadline_in_s=60.0):
    """Start processes (name, compile_s, timed_s) at once as one group; their records by name."""
    import json
    import os
    import subprocess
    import time

    env = {**os.environ, "BENCH_TURNS_DIR": str(tmp_path / "turns"), "BENCH_TURNS_PARTIES": str(len(takers)),
           "BENCH_TURNS_DEADLINE": str(time.time() + deadline_in_s)}
    processes = [subprocess.Popen([sys.executable, "-c", TURN_TAKER, str(BENCH), name, str(c), str(t)], env=env,
                                  stdout=subprocess.PIPE, text=True) for name, c, t in takers]
    records = {}
    for process in processes:
        out, _ = process.communicate(timeout=120)
        if out.strip():
            record = json.loads(out.strip().splitlines()[-1])
            records[record["name"]] = record
    return records


def test_turns_time_one_process_at_a_time_after_all_have_compiled(tmp_path):
    records = run_turn_takers(tmp_path, [("fast", 0.0, 0.5), ("slow", 1.5, 0.5)])
    fast, slow = records["fast"], records["slow"]
    # the fast compiler waited for the slow one to arrive, then the two timed sections did not overlap
    assert fast["waited_for_turn_s"] > 1.0
    intervals = sorted([(fast["start"], fast["end"]), (slow["start"], slow["end"])])
    assert intervals[0][1] <= intervals[1][0]
    assert not fast["timed_beside_another_process"] and not slow["timed_beside_another_process"]


def test_turns_do_not_wait_for_a_process_that_died(tmp_path):
    records = run_turn_takers(tmp_path, [("survivor", 0.0, 0.1), ("crashes", 1.0, 0.1)])
    assert set(records) == {"survivor"}
    assert records["survivor"]["waited_for_turn_s"] < 20.0  # the deadline is 60 s away
    assert not records["survivor"]["timed_beside_another_process"]


def test_turns_stop_waiting_at_the_deadline_and_say_so(tmp_path):
    records = run_turn_takers(tmp_path, [("on_time", 0.0, 0.1), ("late", 3.0, 0.1)], deadline_in_s=1.5)
    on_time, late = records["on_time"], records["late"]
    assert 0.8 < on_time["waited_for_turn_s"] < 2.9
    assert on_time["timed_beside_another_process"]  # `late` was still compiling
    assert not late["timed_beside_another_process"]
    assert on_time["end"] <= late["start"]
