"""Two processes (DDP over gloo on CPU) through `python train.py`, as a multi-GPU run is launched.

Lightning starts the second process itself by re-running the command with the same `hydra.run.dir`. A test-only
callback (tests/distributed_probe.py) records on each rank what every training batch saw and drew, and the final
weights. The contract checked here:

* the ranks end with identical weights (gradients are averaged, so every rank takes the same optimiser step);
* they train on disjoint data: within a step no key is on both ranks, and one epoch covers the data set once;
* each rank draws its own random streams (class dropout, generation orders, MBM bit masks): equal draws on
  different data would give a global batch of W x B samples only B distinct random patterns;
* one run directory holds one config, one set of logger files and one checkpoint folder;
* the global batch is data.batch_size x processes x accumulate_grad_batches, and the epoch length, the throughput
  and the learning-rate schedule (in optimiser steps) follow from it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bar_lightning.lightning.optimization import warmup_cosine
from bar_lightning.models.bar import NULL_LABEL

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null"]
PROBE = "+callbacks.probe._target_=tests.distributed_probe.RankProbe"
# One thread per process: the two ranks share the two cores.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The generator run: 512 synthetic samples, 32 per process, 2 processes, 2 batches per optimiser step.
GENERATOR_SAMPLES, BATCH, PROCESSES, ACCUMULATE = 512, 32, 2, 2
GLOBAL_BATCH = BATCH * PROCESSES * ACCUMULATE  # 128
GENERATOR_STEPS = 5  # 10 batches per rank: epoch 0 is 8 batches (4 optimiser steps), then epoch 1 starts
LEARNING_RATE, WARMUP, END_LR = 3e-3, 2, 1e-5


def run_two_processes(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *overrides, f"hydra.run.dir={run_dir}",
               PROBE, f"+callbacks.probe.folder={run_dir.parent / 'probe'}", "logger=csv", *QUIET]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENVIRONMENT)


def read_probe(folder: Path) -> dict:
    steps = {rank: [json.loads(line) for line in (folder / f"steps.rank{rank}.jsonl").read_text().splitlines()]
             for rank in range(PROCESSES)}
    weights = {rank: torch.load(folder / f"weights.rank{rank}.pt", map_location="cpu", weights_only=True)
               for rank in range(PROCESSES)}
    return {"steps": steps, "weights": weights}


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_generator")
    result = run_two_processes(
        root / "run", "experiment=tiny_generator", f"trainer.max_steps={GENERATOR_STEPS}",
        f"trainer.accumulate_grad_batches={ACCUMULATE}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=4",
        f"data.batch_size={BATCH}", f"data.synthetic_num_samples={GENERATOR_SAMPLES}",
        f"optim.learning_rate={LEARNING_RATE}", f"optim.warmup_steps={WARMUP}", f"optim.end_lr={END_LR}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"run_dir": root / "run", "root": root, "output": result.stdout + result.stderr, **read_probe(root / "probe")}


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    # The discriminator starts at step 5: G and D steps alternate from there (DDP searches for unused parameters).
    root = tmp_path_factory.mktemp("ddp_tokenizer")
    result = run_two_processes(root / "run", "experiment=tiny_tokenizer", "trainer.max_steps=10")
    assert result.returncode == 0, result.stderr[-4000:]
    return {"run_dir": root / "run", **read_probe(root / "probe")}


def assert_identical_weights(weights: dict) -> None:
    assert weights[0].keys() == weights[1].keys()
    different = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert not different, different


def assert_disjoint_data(steps: dict, batches_per_epoch: int, dataset_size: int) -> None:
    for batch_on_0, batch_on_1 in zip(steps[0], steps[1], strict=True):
        assert batch_on_0["step"] == batch_on_1["step"] and batch_on_0["epoch"] == batch_on_1["epoch"]
        assert not set(batch_on_0["keys"]) & set(batch_on_1["keys"]), batch_on_0["step"]
    first_epoch = [key for rank in (0, 1) for batch in steps[rank][:batches_per_epoch] for key in batch["keys"]]
    assert len(first_epoch) == len(set(first_epoch)) == dataset_size  # every sample once per epoch over both ranks


def test_generator_ranks_end_with_identical_weights_after_training_on_disjoint_data(generator_run):
    steps, weights = generator_run["steps"], generator_run["weights"]
    assert len(steps[0]) == len(steps[1]) == GENERATOR_STEPS * ACCUMULATE
    assert_identical_weights(weights)
    # The weights moved: identical because both ranks stepped together, not because nothing was trained.
    checkpoint = torch.load(generator_run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert checkpoint["global_step"] == GENERATOR_STEPS
    assert all(torch.equal(checkpoint["state_dict"][name], weights[0][name]) for name in weights[0])
    # The checkpoint holds each rank's random streams, so a resumed run continues both.
    rank_states = checkpoint["callbacks"]["RandomStateCheckpoint"]["ranks"]
    assert len(rank_states) == PROCESSES and not torch.equal(rank_states[0]["torch"], rank_states[1]["torch"])
    assert_disjoint_data(steps, batches_per_epoch=GENERATOR_SAMPLES // (BATCH * PROCESSES),
                         dataset_size=GENERATOR_SAMPLES)


def test_generator_ranks_draw_their_own_orders_bit_masks_and_class_dropout(generator_run):
    steps = generator_run["steps"]
    for batch_on_0, batch_on_1 in zip(steps[0], steps[1]):
        assert batch_on_0["random_state"] != batch_on_1["random_state"]
        assert batch_on_0["orders"] != batch_on_1["orders"]
        assert batch_on_0["bit_masks"] != batch_on_1["bit_masks"]
    # Class dropout (p = 0.1) replaces labels by the null class; its masks over the whole run differ per rank.
    dropped = {rank: [label == NULL_LABEL for batch in steps[rank] for label in batch["labels"]] for rank in (0, 1)}
    assert any(dropped[0]) and any(dropped[1])
    assert dropped[0] != dropped[1]


def test_generator_ddp_run_writes_one_run_directory_and_one_set_of_logs(generator_run):
    run_dir, steps = generator_run["run_dir"], generator_run["steps"]
    # Both processes ran in the same directory (Lightning re-ran the command with this hydra.run.dir).
    assert {batch["run_dir"] for rank in (0, 1) for batch in steps[rank]} == {str(run_dir.resolve())}
    assert sorted(path.name for path in generator_run["root"].iterdir()) == ["probe", "run"]
    assert len(list(run_dir.rglob("config.yaml"))) == 2  # ours and Hydra's .hydra/config.yaml, once each
    assert len(list(run_dir.rglob("metrics.csv"))) == 1 and len(list(run_dir.rglob("hparams.yaml"))) == 1
    assert not list(run_dir.rglob("lightning_logs")) and not list(run_dir.rglob("version_*"))
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


def test_generator_global_batch_epoch_length_throughput_and_schedule(generator_run):
    steps, run_dir = generator_run["steps"], generator_run["run_dir"]
    hyper_parameters = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hyper_parameters["global_batch_size"] == GLOBAL_BATCH == 128
    assert hyper_parameters["world_size"] == PROCESSES and hyper_parameters["accumulate_grad_batches"] == ACCUMULATE
    assert "global batch 128 = data.batch_size 32 x 2 processes x trainer.accumulate_grad_batches 2" in (
        generator_run["output"]
    )
    # Epoch length: 512 samples / (32 x 2 processes) = 8 batches per rank = 4 optimiser steps.
    for rank in (0, 1):
        assert {batch["batches_per_epoch"] for batch in steps[rank]} == {8}
        assert [batch["epoch"] for batch in steps[rank]] == [0] * 8 + [1] * 2
        assert [batch["step"] for batch in steps[rank]] == [step for step in range(GENERATOR_STEPS) for _ in "ab"]
    # The schedule is in optimiser steps: both ranks are at the same position, whatever the world size.
    for batch_on_0, batch_on_1 in zip(steps[0], steps[1]):
        expected = LEARNING_RATE * warmup_cosine(batch_on_0["step"], warmup_steps=WARMUP,
                                                 total_steps=GENERATOR_STEPS, base_lr=LEARNING_RATE, end_lr=END_LR)
        assert batch_on_0["lr"] == batch_on_1["lr"] == pytest.approx(expected, rel=1e-12)
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/samples_seen")]
    # The logged row of step s holds the samples behind optimiser steps 0..s.
    assert [float(row["train/samples_seen"]) for row in rows] == [(int(row["step"]) + 1) * GLOBAL_BATCH for row in rows]
    assert len(rows) == GENERATOR_STEPS and all(float(row["train/samples_per_second"]) > 0 for row in rows)


def test_tokenizer_ranks_keep_identical_autoencoder_discriminator_and_ema_on_disjoint_data(tokenizer_run):
    steps, weights = tokenizer_run["steps"], tokenizer_run["weights"]
    assert [batch["step"] for batch in steps[0]] == list(range(10))
    assert_identical_weights(weights)
    assert any(name.startswith("discriminator.") for name in weights[0])
    assert any(name.startswith("ema.averaged.") for name in weights[0])
    # 256 synthetic images / (16 x 2 processes) = 8 batches per epoch.
    assert_disjoint_data(steps, batches_per_epoch=8, dataset_size=256)
    for batch_on_0, batch_on_1 in zip(steps[0], steps[1]):
        assert batch_on_0["random_state"] != batch_on_1["random_state"]
        assert batch_on_0["lr"] == batch_on_1["lr"]
    hyper_parameters = yaml.safe_load((tokenizer_run["run_dir"] / "csv" / "hparams.yaml").read_text())
    assert hyper_parameters["global_batch_size"] == 32


def test_a_non_finite_tokenizer_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    # Rank 1's autoencoder loss turns NaN at step 3, rank 0's stays finite. The flag is and-ed over the ranks after
    # the backward pass, so both stop at that step with the error; a rank raising on its own before its backward
    # pass (the tokenizer's former check) left the other in the gradient all-reduce: a connection error under gloo
    # (checked: rank 0 then fails without this message), a wait until the collective timeout under NCCL.
    poison = "+callbacks.poison._target_=tests.distributed_probe.PoisonTokenizerLoss"
    result = run_two_processes(tmp_path / "run", "experiment=tiny_tokenizer", "trainer.max_steps=10", poison,
                               "+callbacks.poison.rank=1", "+callbacks.poison.step=3")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "non-finite autoencoder loss nan at global step 3" in output, output[-3000:]  # rank 1
    assert "non-finite autoencoder loss on another process (here" in output, output[-3000:]  # rank 0
    assert "at global step 4" not in output


def test_rank_seeds_differ_per_rank_and_step_and_fit_numpy():
    from bar_lightning.lightning.random_state import rank_seed

    seeds = {rank_seed(42, rank, step) for rank in range(8) for step in (0, 1000)}
    assert len(seeds) == 16 and all(0 <= seed < 2**32 for seed in seeds)
    assert rank_seed(42, 1) != rank_seed(43, 0)
    np.random.seed(rank_seed(42, 7))  # numpy accepts every value


def test_random_state_checkpoint_restores_this_ranks_streams_and_reads_the_single_state_format():
    from bar_lightning.lightning.random_state import (
        RandomStateCheckpoint,
        capture_random_state,
        rank_seed,
        seed_global_streams,
    )

    callback = RandomStateCheckpoint(seed=3)
    torch.manual_seed(11)
    saved = callback.state_dict()  # one process: a list of one state
    assert list(saved) == ["ranks"] and len(saved["ranks"]) == 1
    expected = torch.rand(4)
    for state in (saved, saved["ranks"][0]):  # the per-rank format, and the format of older checkpoints
        torch.manual_seed(0)
        callback.load_state_dict(state)
        callback.on_train_batch_start(None, None, None, 0)
        assert torch.equal(torch.rand(4), expected)
    # Streams of two processes cannot be continued by one: it draws new ones, seeded from (seed, rank, step).
    torch.manual_seed(0)
    callback.load_state_dict({"ranks": [capture_random_state(), capture_random_state()]})

    class OneProcessTrainer:
        global_rank, global_step = 0, 7

    callback.on_train_batch_start(OneProcessTrainer(), None, None, 0)
    reseeded = torch.rand(4)
    seed_global_streams(rank_seed(3, 0, 7))
    assert torch.equal(reseeded, torch.rand(4)) and not torch.equal(reseeded, expected)


def test_evaluation_sharded_over_two_processes_gives_the_samples_of_one(tmp_path):
    """`torchrun --nproc_per_node 2 evaluate.py` (gloo on CPU): the merged samples equal a single process's, sample
    for sample (batch_size=1, so every sample's random stream is seeded by its own index)."""
    meta = json.loads((ROOT / "tests" / "fixtures" / "upstream" / "generator_A1.json").read_text())
    config_path = tmp_path / "a1.yaml"
    config_path.write_text(yaml.safe_dump(meta["config"]))
    overrides = [f"generator.upstream_weights={ROOT / 'tests' / 'fixtures' / 'upstream' / 'generator_A1.weights.safetensors'}",
                 f"generator.upstream_config={config_path}", "sampling=tiny", "sampling.temperature=1.0",
                 "num_samples_per_class=3", "batch_size=1", "device=cpu", "save.npz=false", "metrics.names=[]"]
    environment = {**ENVIRONMENT, "BAR_PROGRESS": "0"}
    single = subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *overrides, f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
    )
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "evaluate.py"), *overrides, f"hydra.run.dir={tmp_path / 'sharded'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment,
    )
    single_output, _ = single.communicate(timeout=300)
    assert single.returncode == 0, single_output[-3000:]
    assert sharded.returncode == 0, (sharded.stdout + sharded.stderr)[-3000:]
    one = np.load(tmp_path / "single" / "samples_bits.npz", allow_pickle=False)
    two = np.load(tmp_path / "sharded" / "samples_bits.npz", allow_pickle=False)
    assert np.bincount(two["labels"]).tolist() == [3] * 10
    assert np.array_equal(one["labels"], two["labels"]) and np.array_equal(one["bits"], two["bits"])
    assert not list((tmp_path / "sharded").glob(".part_rank*"))
    # Two processes shared the work: rank 1 sampled the odd indices, which the merged file holds.
    assert "rank 1 of 2 processes: sampling 15 of 30 samples" in sharded.stdout + sharded.stderr
