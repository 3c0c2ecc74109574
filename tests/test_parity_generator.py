"""Parity of the BAR generator with the official code, on golden tensors recorded from it (tests/fixtures/upstream).

Float tensors must match to 1e-5 (the official code itself reproduces them to ~2e-6 on other CPUs), bits exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bar_lightning.compat.upstream import (
    export_generator_state_dict,
    generator_kwargs,
    load_generator,
    save_generator_for_upstream,
)
from bar_lightning.models.bar import BARGenerator

from .conftest import FIXTURES, record_sampling_steps

VARIANTS = ["A1", "A2", "A3"]
ATOL = 1e-5


@pytest.fixture(scope="module", params=VARIANTS)
def fixture(request):
    variant = request.param
    meta = json.loads((FIXTURES / f"generator_{variant}.json").read_text())
    io = load_file(str(FIXTURES / f"generator_{variant}.io.safetensors"))
    model = load_generator(meta["config"], FIXTURES / f"generator_{variant}.weights.safetensors")
    return variant, meta, io, model


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_rope_table_matches_stored_buffer(fixture):
    _, _, _, model = fixture
    weights = load_file(str(FIXTURES / f"generator_{fixture[0]}.weights.safetensors"))
    assert max_error(model.rope_cos, weights["blocks.0.attn.rope.freqs_cos"]) < 1e-6
    assert max_error(model.rope_sin, weights["blocks.0.attn.rope.freqs_sin"]) < 1e-6


def test_teacher_forced_latent_conditions(fixture):
    _, _, io, model = fixture
    latents = model.latent_conditions(io["tf.input_bits"], io["tf.class_labels"], io["tf.orders"])
    assert latents.shape == io["tf.latent_proj_out"].shape
    assert max_error(latents, io["tf.latent_proj_out"]) < ATOL
    assert torch.equal(model.class_rows(io["tf.class_labels"]), io["tf.condition_index"])


def test_step_layout_matches_head_targets(fixture):
    _, _, io, model = fixture
    steps = model.tokens_to_steps(io["tf.input_bits"])
    assert torch.equal(steps.reshape(-1, model.bits_per_step), io["tf.head_target"])
    assert torch.equal(model.steps_to_tokens(steps), io["tf.input_bits"])


def test_head_logits(fixture):
    _, _, io, model = fixture
    logits = model.lm_head.logits(io["head.masked_ids"], io["head.conditions"], io["head.mask_ratio"])
    assert max_error(logits, io["head.logits"]) < ATOL


def test_loss_from_recorded_masks(fixture):
    _, _, io, model = fixture
    logits = model.lm_head.logits(io["loss.masked_input"], io["tf.head_conditions"], io["loss.mask_ratio"])
    assert max_error(logits, io["loss.logits"]) < ATOL
    is_masked = io["loss.masked_input"] == 2
    loss = model.lm_head.weighted_bit_loss(logits, io["tf.head_target"], is_masked)
    assert abs(loss.item() - io["loss.value"].item()) < ATOL


def test_loss_with_recorded_seed_draws_the_same_masks(fixture):
    # The masking consumes torch's RNG in the official order, so the recorded seed reproduces the loss.
    _, _, io, model = fixture
    torch.manual_seed(int(io["loss.seed"]))
    loss = model(io["tf.input_bits"], io["tf.class_labels"], io["tf.orders"])
    assert abs(loss.item() - io["loss.value"].item()) < ATOL


def test_head_sampling_temperature_zero(fixture):
    _, meta, io, model = fixture
    allocation = meta["head_sample"]["tokens_allocation"]
    no_cfg = model.lm_head.sample(
        io["headsample.nocfg.conditions"], guidance_scale=1.0, temperature=0.0, tokens_allocation=allocation
    )
    assert torch.equal(no_cfg, io["headsample.nocfg.bits"])
    with_cfg = model.lm_head.sample(
        io["headsample.cfg.conditions"], guidance_scale=2.5, temperature=0.0, tokens_allocation=allocation,
        use_cfg=True,
    )
    assert torch.equal(with_cfg, io["headsample.cfg.bits"])


@pytest.mark.parametrize("run", ["g1", "g3"])
def test_generation_temperature_zero(fixture, run, monkeypatch):
    _, meta, io, model = fixture
    recorded = record_sampling_steps(monkeypatch, model)
    bits = model.generate(
        io[f"gen.{run}.class_labels"],
        guidance_scale=float(meta["generate"][run]["guidance_scale"]),
        temperature=0.0,
        tokens_allocation=meta["generate"]["tokens_allocation"],
    )
    assert bits.dtype == torch.long
    assert torch.equal(bits, io[f"gen.{run}.bits"])
    assert max_error(torch.stack(recorded["step_conditions"]), io[f"gen.{run}.step_conditions"]) < ATOL
    assert torch.equal(torch.stack(recorded["step_bits"]), io[f"gen.{run}.step_bits"])
    assert torch.allclose(torch.tensor(recorded["step_cfg_scale"], dtype=torch.float64),
                          io[f"gen.{run}.step_cfg_scale"])


def test_cached_generation_equals_full_recomputation(fixture, monkeypatch):
    # Without a KV cache the latent of step k is the teacher-forced latent of the sequence generated so far.
    _, meta, io, model = fixture
    labels = io["gen.g3.class_labels"]
    recorded = record_sampling_steps(monkeypatch, model)
    bits = model.generate(labels, guidance_scale=3.0, temperature=0.0,
                          tokens_allocation=meta["generate"]["tokens_allocation"])
    recomputed = model.latent_conditions(bits, labels)[:, : model.num_steps]  # [B, L, W]
    cached = torch.stack(recorded["step_conditions"])[:, : labels.shape[0]].transpose(0, 1)
    assert max_error(recomputed, cached) < ATOL


def test_export_round_trip_is_identical(fixture, tmp_path):
    variant, meta, _, model = fixture
    original = load_file(str(FIXTURES / f"generator_{variant}.weights.safetensors"))
    exported = export_generator_state_dict(model)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    path = save_generator_for_upstream(model, tmp_path / "bar.bin")
    reloaded = load_generator(meta["config"], path)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_prefixed_keys_are_stripped(fixture):
    variant, meta, _, _ = fixture
    original = load_file(str(FIXTURES / f"generator_{variant}.weights.safetensors"))
    wrapped = {f"module._orig_mod.{key}": value for key, value in original.items()}
    model = load_generator(meta["config"], wrapped)
    assert torch.equal(model.norm.weight, original["norm.weight"])


def test_missing_and_unexpected_keys_are_listed():
    meta = json.loads((FIXTURES / "generator_A1.json").read_text())
    weights = load_file(str(FIXTURES / "generator_A1.weights.safetensors"))
    broken = dict(weights)
    del broken["norm.weight"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[norm\.weight\].*unexpected keys \[extra\.weight\]"):
        load_generator(meta["config"], broken)


def test_mismatched_config_names_the_key_and_shapes():
    meta = json.loads((FIXTURES / "generator_A1.json").read_text())
    config = json.loads(json.dumps(meta["config"]))
    config["model"]["generator"]["condition_num_classes"] = 11
    with pytest.raises(ValueError, match=r"embeddings\.weight.*\(14, 64\).*\(15, 64\)"):
        load_generator(config, FIXTURES / "generator_A1.weights.safetensors")


LAYOUTS = json.loads((FIXTURES / "layouts_fullsize.json").read_text())
EXPECTED_PARAMETERS_M = {"bar_b": 415.3, "bar_b_patch2": 415.1, "bar_b_patch4": 415.8, "bar_l": 1107.8,
                         "bar_l_res512": 1110.7}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS_M))
def test_fullsize_layouts_load_strictly(name):
    entry = LAYOUTS["generator"][name]
    with torch.device("meta"):
        model = BARGenerator(**generator_kwargs(entry["config"]))
    listed = {item["key"]: tuple(item["shape"]) for item in entry["state_dict"]}
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rope_keys = {key for key in listed if ".attn.rope." in key}
    assert set(ours) == set(listed) - rope_keys
    assert all(ours[key] == listed[key] for key in ours)
    for key in rope_keys:
        assert listed[key] == tuple(model.rope_cos.shape)
    # Export adds the RoPE tables back: the exported key set is exactly the released one.
    assert {key for key in listed} == set(ours) | rope_keys
    parameters = sum(p.numel() for p in model.parameters()) + model.lm_head.t_embedder.W.numel()
    assert round(parameters / 1e6, 1) == EXPECTED_PARAMETERS_M[name]
