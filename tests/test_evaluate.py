"""evaluate.py sampling: released upstream weights and this project's checkpoints, class balance, errors."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bar_lightning.config.schema import ConfigError, validate_evaluate_config
from bar_lightning.eval.evaluate import generate_shard, run_evaluation, shard_indices, to_uint8_images
from bar_lightning.eval.sampling import balanced_labels

from .conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


def compose_evaluate(overrides, output_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture()
def upstream_a1(tmp_path):
    meta = json.loads((FIXTURES / "generator_A1.json").read_text())
    config_path = tmp_path / "a1.yaml"
    config_path.write_text(yaml.safe_dump(meta["config"]))
    return config_path, FIXTURES / "generator_A1.weights.safetensors", meta


def test_balanced_labels_are_grouped_by_class():
    assert balanced_labels([0, 1, 2], 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_sampling_released_weights_reproduces_the_recorded_bits(upstream_a1, tmp_path):
    config_path, weights, meta = upstream_a1
    cfg = validate_evaluate_config(compose_evaluate(
        [f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}", "sampling=tiny",
         "sampling.guidance_scale=3.0", "sampling.temperature=0.0", "classes=[3,8]", "num_samples_per_class=1",
         "device=cpu", "save.npz=false", "metrics.names=[]"],
        tmp_path,
    ))
    run_evaluation(cfg)
    saved = np.load(tmp_path / "samples_bits.npz", allow_pickle=False)
    assert saved["bits"].dtype == np.uint8 and saved["labels"].tolist() == [3, 8]
    from safetensors.torch import load_file

    recorded = load_file(str(FIXTURES / "generator_A1.io.safetensors"))["gen.g3.bits"]
    assert torch.equal(torch.from_numpy(saved["bits"]).long(), recorded)


def test_bits_file_is_a_deflated_npz_that_np_load_reads_back(tmp_path):
    import zipfile

    from bar_lightning.io import atomic_write, savez_quick

    rng = np.random.default_rng(0)
    bits = (rng.random((300, 4096)) < 0.5).astype(np.uint8)
    labels = np.repeat(np.arange(3), 100)
    path = atomic_write(tmp_path / "samples_bits.npz", lambda file: savez_quick(file, bits=bits, labels=labels))
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["bits", "labels"]
        assert saved["bits"].dtype == np.uint8 and np.array_equal(saved["bits"], bits)
        assert saved["labels"].dtype == labels.dtype and np.array_equal(saved["labels"], labels)
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("bits.npy")
        assert member.compress_type == zipfile.ZIP_DEFLATED
        assert member.compress_size < member.file_size / 4  # random 0/1 bytes: level 1 keeps about a fifth
    with pytest.raises(ValueError, match="pickle"):
        savez_quick(tmp_path / "objects.npz", values=np.array([{"a": 1}], dtype=object))


def test_evaluate_cli_balances_classes_and_batches(upstream_a1, tmp_path):
    config_path, weights, _ = upstream_a1
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"generator.upstream_weights={weights}",
         f"generator.upstream_config={config_path}", "sampling=tiny", "num_samples_per_class=3", "batch_size=7",
         "device=cpu", "save.npz=false", "metrics.names=[]", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = np.load(tmp_path / "samples_bits.npz", allow_pickle=False)
    assert saved["bits"].shape == (30, 64)
    assert np.bincount(saved["labels"]).tolist() == [3] * 10
    assert set(np.unique(saved["bits"]).tolist()) <= {0, 1}


def test_source_must_be_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of generator.checkpoint"):
        validate_evaluate_config(compose_evaluate([], tmp_path))


def test_sampling_speed_settings_are_overridable_and_checked(tmp_path):
    source = ["generator.checkpoint=/some/run.ckpt"]
    cfg = validate_evaluate_config(compose_evaluate(
        [*source, "sampling=bar_b_patch4", "sampling.precision=bf16", "sampling.cuda_graph=false"], tmp_path))
    assert (cfg.sampling.precision, cfg.sampling.cuda_graph, cfg.sampling.compile) == ("bf16", False, True)
    assert cfg.sampling.guidance_scale == 9.6  # the group still supplies the method's settings
    with pytest.raises(ConfigError, match=r"sampling.precision='fp16' is unknown; use one of \['fp32', 'bf16'\]"):
        validate_evaluate_config(compose_evaluate([*source, "sampling.precision=fp16"], tmp_path))


def test_missing_weight_file_is_named(upstream_a1, tmp_path):
    config_path, _, _ = upstream_a1
    cfg = validate_evaluate_config(compose_evaluate(
        ["generator.upstream_weights=/nonexistent/bar_b.bin", f"generator.upstream_config={config_path}"], tmp_path))
    with pytest.raises(FileNotFoundError, match="/nonexistent/bar_b.bin"):
        run_evaluation(cfg)


def test_shards_cover_every_sample_once():
    shards = [shard_indices(103, rank, 4) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(103))


def test_without_a_tokenizer_bits_are_saved_and_image_metrics_skipped_with_one_line(upstream_a1, tmp_path, caplog):
    config_path, weights, _ = upstream_a1
    cfg = validate_evaluate_config(compose_evaluate(  # the defaults: save.npz=true, metrics fid/isc/kid/prc
        [f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}", "sampling=tiny",
         "num_samples_per_class=1", "device=cpu"], tmp_path))
    with caplog.at_level(logging.INFO):
        result = run_evaluation(cfg)
    assert sorted(path.name for path in tmp_path.glob("*.npz")) == ["samples_bits.npz"]
    assert result["num_samples"] == 10 and not {"fid", "isc", "kid"} & set(result)
    notes = [record.message for record in caplog.records if "No tokenizer" in record.message]
    assert notes == ["No tokenizer: saving the bits only (samples_bits.npz); images, samples.npz and metrics need "
                     "tokenizer.checkpoint=<ckpt> or tokenizer.upstream_weights + tokenizer.upstream_config"]


def test_without_the_reference_the_metrics_comparing_with_it_are_skipped(tmp_path, caplog, inception_weights):
    from bar_lightning.eval.evaluate import metrics_to_compute
    from bar_lightning.eval.metrics import compute_generation_metrics

    cfg = compose_evaluate(["generator.checkpoint=g.ckpt", "tokenizer.checkpoint=t.ckpt",
                            f"metrics.reference={tmp_path / 'absent.npz'}"], tmp_path)
    with caplog.at_level(logging.INFO):
        assert metrics_to_compute(cfg, has_tokenizer=True) == ["isc"]
    [note] = [record.message for record in caplog.records if "not found" in record.message]
    assert note.startswith(f"metrics.reference={tmp_path / 'absent.npz'} not found: skipping fid, sfid, kid, prc. They "
                           "compare with an ADM reference batch: for ImageNet 256 px `wget https://")
    # IS needs the samples alone: no reference at all.
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    scores = compute_generation_metrics(images, reference=None, inception_weights=inception_weights,
                                        metrics=("isc",), isc_split_size=2)
    assert set(scores) == {"isc", "isc_std"} and scores["isc"] > 0
    with pytest.raises(ValueError, match=r"metrics \['fid'\] compare with a reference batch; none was given"):
        compute_generation_metrics(images, reference=None, inception_weights=inception_weights, metrics=("fid",))


def test_two_ranks_generate_the_same_samples_as_one(upstream_a1, tmp_path, monkeypatch):
    """Rank sharding: the merged result of 2 simulated ranks equals a single process, sample for sample."""
    import bar_lightning.eval.evaluate as evaluate_module

    config_path, weights, _ = upstream_a1
    overrides = [f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}",
                 "sampling=tiny", "sampling.temperature=1.0", "num_samples_per_class=3", "batch_size=1",
                 "device=cpu", "save.npz=false", "metrics.names=[]"]
    single = validate_evaluate_config(compose_evaluate(overrides, tmp_path / "single"))
    run_evaluation(single)
    for rank in (1, 0):  # rank 0 merges, so it runs last
        monkeypatch.setattr(evaluate_module, "join_torchrun_process_group", lambda rank=rank: (rank, 2))
        run_evaluation(validate_evaluate_config(compose_evaluate(overrides, tmp_path / "sharded")))
    one = np.load(tmp_path / "single" / "samples_bits.npz", allow_pickle=False)
    two = np.load(tmp_path / "sharded" / "samples_bits.npz", allow_pickle=False)
    assert np.array_equal(one["labels"], two["labels"]) and np.bincount(two["labels"]).tolist() == [3] * 10
    # batch_size=1: every sample's random stream is its own seed, so the bits agree exactly.
    assert np.array_equal(one["bits"], two["bits"])
    assert not list((tmp_path / "sharded").glob(".part_rank*"))


def test_demo_reports_missing_fashion_mnist(tmp_path):
    from bar_lightning.demo import ensure_fashion_mnist

    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        ensure_fashion_mnist(tmp_path / "nowhere")


def test_speed_mode_times_batches_and_saves_nothing(upstream_a1, tmp_path):
    config_path, weights, _ = upstream_a1
    cfg = validate_evaluate_config(compose_evaluate(
        [f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}", "sampling=tiny",
         "device=cpu", "batch_size=4", "speed.enabled=true", "speed.warmup_batches=1", "speed.timed_batches=2",
         "save.npz=false", "metrics.names=[]"], tmp_path))
    result = run_evaluation(cfg)
    assert result["images_per_second"] > 0 and result["timed_batches"] == 2 and result["batch_size"] == 4
    assert (tmp_path / "speed.json").is_file() and not (tmp_path / "samples_bits.npz").exists()


def test_samples_are_converted_to_uint8_as_the_official_sampler_writes_them():
    # The official sampler: x01 = (x + 1) / 2; (clamp(x01, 0, 1) * 255.0).to(uint8), i.e. truncation.
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([torch.rand(2, 3, 16, 16, generator=generator) * 2.4 - 1.2,  # beyond [-1, 1] too
                        (torch.arange(256.0) / 127.5 - 1.0).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)])
    official = (torch.clamp((images + 1.0) / 2.0, 0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    converted = to_uint8_images(images)
    assert converted.dtype == np.uint8 and converted.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(converted, official)
    # Truncation, not rounding: a value just under a level stays below it.
    just_under = torch.full((1, 3, 1, 1), (100.0 - 1e-3) / 127.5 - 1.0)
    assert to_uint8_images(just_under).ravel().tolist() == [99, 99, 99]
    rounded = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert (rounded != converted).mean() > 0.3  # what the earlier conversion got wrong


def test_metrics_are_scored_from_features_made_during_sampling_with_each_stage_timed(
    tmp_path, monkeypatch, generator_of_tiny_tokenizer, tokenizer_checkpoint, inception_weights
):
    """The streamed path (features of each decoded batch on the device) scores exactly what the saved samples
    score through the whole-set pass, one process or two; metrics.json says where the time went."""
    import bar_lightning.eval.evaluate as evaluate_module
    from bar_lightning.eval.metrics import compute_generation_metrics, load_adm_npz, save_adm_npz

    reference = tmp_path / "reference.npz"
    rng = np.random.default_rng(1)
    save_adm_npz(reference, rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    overrides = [f"generator.checkpoint={generator_of_tiny_tokenizer}", f"tokenizer.checkpoint={tokenizer_checkpoint}",
                 "sampling=tiny", "sampling.tokens_allocation=[2,2,2]", "classes=[0,1,2]", "num_samples_per_class=2", "batch_size=3", "device=cpu",
                 f"metrics.reference={reference}", f"metrics.inception_weights={inception_weights}",
                 "metrics.batch_size=3", "metrics.kid_subset_size=4", "metrics.allow_small_sample=true"]
    single = run_evaluation(validate_evaluate_config(compose_evaluate(overrides, tmp_path / "single")))
    samples = load_adm_npz(tmp_path / "single" / "samples.npz")
    whole_set = compute_generation_metrics(samples, reference=str(reference), inception_weights=inception_weights,
                                           batch_size=3, kid_subset_size=4, allow_small_sample=True)
    names = ["fid", "sfid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score"]
    assert {name: single[name] for name in names} == whole_set
    timings = json.loads((tmp_path / "single" / "metrics.json").read_text())["timings_s"]
    assert set(timings) == {"sampling", "decoding", "inception_features", "to_host", "sampling_loop_wall",
                            "first_batch_wall", "saving_bits", "saving_npz", "statistics_and_reference", "total_wall"}
    assert all(seconds >= 0 for seconds in timings.values())
    assert timings["total_wall"] >= timings["sampling_loop_wall"] >= timings["sampling"] > 0
    assert timings["sampling_loop_wall"] >= timings["first_batch_wall"] > 0
    # Two ranks: each streams its own samples' features; rank 0 merges them in global order (IS splits and KID
    # subsets depend on the order), so the scores equal the single process's.
    for rank in (1, 0):
        monkeypatch.setattr(evaluate_module, "join_torchrun_process_group", lambda rank=rank: (rank, 2))
        sharded = run_evaluation(validate_evaluate_config(compose_evaluate(
            [*overrides, "batch_size=1", "metrics.batch_size=1"], tmp_path / "sharded")))
    monkeypatch.undo()
    one_by_one = run_evaluation(validate_evaluate_config(compose_evaluate(
        [*overrides, "batch_size=1", "metrics.batch_size=1"], tmp_path / "one_by_one")))
    assert {name: sharded[name] for name in names} == {name: one_by_one[name] for name in names}
    assert not list((tmp_path / "sharded").glob(".part_rank*"))


def test_a_metrics_request_that_cannot_be_scored_fails_before_sampling(
    tmp_path, monkeypatch, generator_of_tiny_tokenizer, tokenizer_checkpoint, inception_weights
):
    import bar_lightning.eval.evaluate as evaluate_module
    from bar_lightning.eval.metrics import save_adm_npz

    reference = tmp_path / "reference_64px.npz"
    save_adm_npz(reference, np.zeros((5, 64, 64, 3), np.uint8))  # the samples are 16 px

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(evaluate_module, "generate_shard", no_sampling)
    cfg = validate_evaluate_config(compose_evaluate(
        [f"generator.checkpoint={generator_of_tiny_tokenizer}", f"tokenizer.checkpoint={tokenizer_checkpoint}",
         "sampling=tiny", "sampling.tokens_allocation=[2,2,2]", "classes=[0,1]", "num_samples_per_class=3", "device=cpu", f"metrics.reference={reference}",
         f"metrics.inception_weights={inception_weights}", "metrics.kid_subset_size=4",
         "metrics.allow_small_sample=true"], tmp_path / "out"))
    with pytest.raises(ValueError, match=r"samples are 16x16 .* holds 64x64 images"):
        run_evaluation(cfg)


def test_overlapped_decoding_is_cuda_only(upstream_a1, tmp_path, monkeypatch):
    """`overlap_decoding=true` is ignored on the CPU (the GPU fast-path keys are); generate_shard refuses it there."""
    import bar_lightning.eval.evaluate as evaluate_module

    with pytest.raises(ValueError, match="overlap=True needs a CUDA device"):
        generate_shard(None, None, torch.zeros(1, dtype=torch.long), [0], sampling=None, allocation=[],
                       batch_size=1, seed=0, device=torch.device("cpu"), overlap=True)
    overlaps = []
    original = evaluate_module.generate_shard

    def recorded(*args, overlap, **kwargs):
        overlaps.append(overlap)
        return original(*args, overlap=overlap, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_shard", recorded)
    config_path, weights, _ = upstream_a1
    run_evaluation(validate_evaluate_config(compose_evaluate(
        [f"generator.upstream_config={config_path}", f"generator.upstream_weights={weights}", "sampling=tiny",
         "classes=[0]",
         "num_samples_per_class=2", "device=cpu", "overlap_decoding=true"], tmp_path / "out")))
    assert overlaps == [False]
    with pytest.raises(ConfigError, match="overlap_decoding"):
        validate_evaluate_config(compose_evaluate(["overlap_decoding=sometimes"], tmp_path / "bad"))


class _NoStream:
    def wait_stream(self, other):
        pass


class _NoEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture()
def cuda_stream_calls_as_no_ops(monkeypatch):
    """The CUDA stream, event and pinned-memory calls of `OverlappedDecoding` as no-ops on the CPU (where the
    operations run in order anyway), so that its bookkeeping is tested without a GPU: two pinned buffers in turn,
    the host thread that empties them, a short last batch. The streams themselves: tests/test_gpu_evaluation.py."""
    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: real_empty(*args, **kwargs))


class _SumDecoder:
    """bits [B, C] -> images [B, 3, 4, 5] in [-1, 1] that differ between samples."""

    def __init__(self, fail_at_call: int | None = None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def decode_bits(self, bits):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("decoder failed")
        value = bits.float() @ torch.arange(1.0, bits.shape[1] + 1) / bits.shape[1] ** 2 - 1
        return value[:, None, None, None].expand(-1, 3, 4, 5).clone()


@pytest.mark.parametrize(("samples", "batch"), [(9, 4), (9, 9), (10, 3), (1, 4)])
def test_overlapped_decoding_puts_every_batch_in_its_rows(cuda_stream_calls_as_no_ops, samples, batch):
    from bar_lightning.eval.evaluate import OverlappedDecoding, SerialDecoding, StageClock

    clock = StageClock(torch.device("cpu"))
    features_overlapped, features_serial = [], []
    overlapped = OverlappedDecoding(_SumDecoder(), SimpleNamespace(add=features_overlapped.append), clock,
                                    np.zeros((samples, 6), np.uint8), torch.device("cpu"))
    serial = SerialDecoding(_SumDecoder(), SimpleNamespace(add=features_serial.append), clock,
                            np.zeros((samples, 6), np.uint8))
    # A slow host thread: a buffer refilled before the thread has emptied it would show in the rows.
    submit = overlapped.executor.submit
    overlapped.executor.submit = lambda move: submit(lambda: (time.sleep(0.05), move()))
    rng = torch.Generator().manual_seed(samples)
    with overlapped:
        for start in range(0, samples, batch):
            rows = slice(start, min(samples, start + batch))
            bits = torch.randint(0, 2, (rows.stop - rows.start, 6), generator=rng, dtype=torch.uint8)
            overlapped.add(bits, rows)
            serial.add(bits, rows)
    assert serial.bits_all.any() and (samples == 1 or len(np.unique(serial.images)) > 1)
    np.testing.assert_array_equal(overlapped.bits_all, serial.bits_all)
    np.testing.assert_array_equal(overlapped.images, serial.images)
    assert len(features_overlapped) == len(range(0, samples, batch))
    for a, b in zip(features_overlapped, features_serial):
        assert torch.equal(a, b)


def test_overlapped_decoding_passes_a_failure_on_and_stops_its_thread(cuda_stream_calls_as_no_ops):
    from bar_lightning.eval.evaluate import OverlappedDecoding, StageClock

    outputs = OverlappedDecoding(_SumDecoder(fail_at_call=2), None, StageClock(torch.device("cpu")),
                                 np.zeros((6, 6), np.uint8), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="decoder failed"), outputs:
        for start in (0, 3):
            outputs.add(torch.ones(3, 6, dtype=torch.uint8), slice(start, start + 3))
    assert outputs.executor._shutdown
