"""Parity of the BAR-FSQ tokenizer (binary FSQ, SigLIP2 encoder, ViT decoder) with the official code, on golden
tensors recorded from it (tests/fixtures/upstream, README sections 2.7, 2.8, 4, 5).

Float tensors must match to 1e-5 (plus one float32 ulp of relative slack for `fsq.z_proj`, whose saturated rows
reach |z| ~ 160, where one ulp is 1.5e-5 and the BLAS summation order of this CPU decides the last bit);
bits exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bar_lightning.compat.upstream_tokenizer import (
    export_tokenizer_state_dict,
    import_tokenizer_state_dict,
    load_decoder,
    load_fsq,
    load_tokenizer,
    tokenizer_kwargs,
)
from bar_lightning.models.fsq import BinaryFSQ
from bar_lightning.models.tokenizer import BarFSQTokenizer
from bar_lightning.models.vit import SigLIP2Encoder

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
ATOL = 1e-5
SIGLIP_CONFIG_KEY = "siglip2_vision_config (replaces google/siglip2-so400m-patch16-naflex)"


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def read_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.io.safetensors")), FIXTURES / f"{name}.weights.safetensors"


def c2_sizes(meta: dict) -> tuple[dict, dict]:
    return meta[SIGLIP_CONFIG_KEY], meta["decoder_hardcoded_overrides"]


@pytest.fixture(scope="module")
def c2():
    meta, io, weights = read_fixture("tokenizer_C2")
    encoder_sizes, decoder_sizes = c2_sizes(meta)
    return meta, io, load_tokenizer(meta["config"], weights, encoder_sizes, decoder_sizes)


# ---------------------------------------------------------------------------------------------------------------
# FSQ (B1)
# ---------------------------------------------------------------------------------------------------------------
def test_fsq_constants_match_float32_reference():
    _, io, _ = read_fixture("fsq_B1")
    assert torch.tensor(BinaryFSQ.shift, dtype=torch.float32).item() == io["fsq.shift"].item()
    assert torch.tensor(BinaryFSQ.half_range, dtype=torch.float32).item() == io["fsq.half_l"].item()
    assert BinaryFSQ.shift == io["fsq.shift"].item()  # exactly representable: no rounding when added to float32


def test_fsq_parity():
    meta, io, weights = read_fixture("fsq_B1")
    fsq = load_fsq(weights)
    assert (fsq.in_proj.in_features, fsq.out_proj.out_features, fsq.bits_per_token) == (8, 12, 6)
    x = io["fsq.input"]
    z = fsq.project(x)
    torch.testing.assert_close(z, io["fsq.z_proj"], atol=ATOL, rtol=1e-6)
    assert max_error(fsq.bound(io["fsq.z_proj"]), io["fsq.bounded"]) < ATOL
    assert max_error(fsq.bound(z), io["fsq.bounded"]) < ATOL
    assert max_error(fsq.quantize(z), io["fsq.codes"]) < ATOL
    output, bits = fsq(x)
    assert max_error(output, io["fsq.output"]) < ATOL
    # Every bit must match, including the 45 entries within 1e-3 of the threshold (none are skipped).
    assert int(io["fsq.near_threshold"].sum()) == meta["num_near_threshold(|z_proj-thr|<1e-3)"]
    assert torch.equal(bits, io["fsq.indices"])
    assert torch.equal(fsq.to_bits(x), io["fsq.indices"])
    flat = io["fsq.indices"].reshape(4, 16 * 6)  # the official dequantisation input layout
    assert max_error(fsq.from_bits(flat.reshape(4, 16, 6)), io["fsq.output_from_indices"]) < ATOL
    assert abs(fsq.threshold - meta["threshold_on_z_proj"]) < 1e-7


def test_fsq_straight_through_gradient_reaches_input():
    torch.manual_seed(0)
    fsq = BinaryFSQ(8, 12, 6)
    x = torch.randn(2, 5, 8, requires_grad=True)
    output, _ = fsq(x)
    output.sum().backward()
    assert x.grad is not None and bool((x.grad != 0).any())
    assert fsq.in_proj.weight.grad is not None and bool((fsq.in_proj.weight.grad != 0).any())


def test_fsq_rejects_bad_bits():
    fsq = BinaryFSQ(8, 12, 6)
    with pytest.raises(ValueError, match="found the value 2"):
        fsq.from_bits(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    with pytest.raises(ValueError, match="6"):
        fsq.from_bits(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="in_channels"):
        fsq.to_bits(torch.zeros(1, 7))


# ---------------------------------------------------------------------------------------------------------------
# decoder (C1) and full tokenizer (C2)
# ---------------------------------------------------------------------------------------------------------------
def test_decoder_parity():
    meta, io, weights = read_fixture("decoder_C1")
    sizes = {k: meta["hardcoded_overrides"][k] for k in ("width", "num_layers", "num_heads")}
    decoder = load_decoder(meta["config"], weights, sizes)
    images, clip_prediction = decoder(io["dec.input"])
    assert clip_prediction is None
    assert max_error(images, io["dec.output"]) < ATOL


def test_tokenizer_encode_parity(c2):
    _, io, tok = c2
    images = io["tok.images"]
    features = tok.encode_features(images)
    assert max_error(features, io["tok.encoder_features"]) < ATOL
    assert max_error(tok.clip_targets(images), io["tok.clip_gt"]) < ATOL
    quantized, bits = tok.quantize(features)
    assert max_error(quantized, io["tok.z_quantized"]) < ATOL
    assert torch.equal(bits, io["tok.bits"])
    assert torch.equal(tok.encode_token_bits(images), io["tok.bits"])
    assert torch.equal(tok.encode_bits(images), io["tok.bits_flat"])


def test_tokenizer_decode_parity(c2):
    _, io, tok = c2
    assert max_error(tok.decode_bits(io["tok.bits_flat"]), io["tok.decoded"]) < ATOL
    assert max_error(tok.decode_features(io["tok.z_quantized"]), io["tok.decoded"]) < ATOL


def test_tokenizer_forward_reconstructs(c2):
    _, io, tok = c2
    output = tok(io["tok.images"])
    assert torch.equal(output.bits, io["tok.bits"])
    assert max_error(output.reconstruction, io["tok.decoded"]) < ATOL
    assert output.clip_prediction is None and output.clip_target is None  # clip_loss_weight 0 in this fixture


def test_only_trainable_encoder_parts_require_grad(c2):
    _, _, tok = c2
    trainable = {name for name, p in tok.encoder.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("trainable_layers.", "trainable_post_layernorm.")) for name in trainable)


def test_export_round_trip_is_identical(c2):
    meta, _, tok = c2
    exported = export_tokenizer_state_dict(tok)
    assert list(exported) == [entry["key"] for entry in meta["state_dict"]]  # names and official order
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    assert all(torch.equal(exported[key], weights[key]) for key in weights)


def test_prefixed_bin_file_loads(c2, tmp_path):
    meta, io, _ = c2
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    path = tmp_path / "tokenizer.bin"
    torch.save({f"module._orig_mod.{key}": value for key, value in weights.items()}, path)
    tok = load_tokenizer(meta["config"], path, *c2_sizes(meta))
    assert torch.equal(tok.encode_bits(io["tok.images"]), io["tok.bits_flat"])


def test_aliases_and_pooling_head_are_optional(c2):
    meta, io, _ = c2
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    # Only one name of each aliased pair, and no pooling head: still a complete tokenizer.
    reduced = {k: v for k, v in weights.items() if not k.startswith(("encoder.frozen_encoder.", "encoder.siglip.head."))}
    tok = load_tokenizer(meta["config"], reduced, *c2_sizes(meta))
    assert tok.encoder.pooling_head is None
    assert max_error(tok.clip_targets(io["tok.images"]), io["tok.clip_gt"]) < ATOL
    assert not any(key.startswith("encoder.siglip.head.") for key in export_tokenizer_state_dict(tok))
    # Aliased copies that disagree are refused.
    conflicting = dict(weights)
    key = "encoder.frozen_encoder.layers.0.mlp.fc1.bias"
    conflicting[key] = conflicting[key] + 1
    with pytest.raises(ValueError, match="same tensor"):
        load_tokenizer(meta["config"], conflicting, *c2_sizes(meta))


def test_decode_only_needs_no_encoder_weights(c2):
    meta, io, _ = c2
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    decode_weights = {k: v for k, v in weights.items() if k.startswith(("decoder.", "quantize."))}
    tok = load_tokenizer(meta["config"], decode_weights, *c2_sizes(meta), decode_only=True)
    assert tok.encoder is None
    assert max_error(tok.decode_bits(io["tok.bits_flat"]), io["tok.decoded"]) < ATOL
    with pytest.raises(RuntimeError, match="decode-only"):
        tok.encode_bits(io["tok.images"])
    with pytest.raises(ValueError, match="encoder"):  # strict by default
        load_tokenizer(meta["config"], decode_weights, *c2_sizes(meta))


def test_missing_and_unexpected_keys_are_listed(c2):
    meta, _, _ = c2
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    del weights["decoder.conv_out.bias"]
    weights["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_tokenizer(meta["config"], weights, *c2_sizes(meta))
    assert "decoder.conv_out.bias" in str(error.value) and "decoder.extra.weight" in str(error.value)


def test_fsq_loader_lists_keys():
    weights = load_file(str(FIXTURES / "fsq_B1.weights.safetensors"))
    weights["codebook"] = torch.zeros(1)
    with pytest.raises(ValueError, match="codebook"):
        load_fsq(weights)


def test_mismatched_config_names_the_key_and_shapes(c2):
    meta, _, _ = c2
    config = json.loads(json.dumps(meta["config"]))
    config["model"]["vq_model"].update(token_size=5, codebook_size=32)
    with pytest.raises(ValueError, match=r"quantize\.\w+\.\w+: checkpoint shape \(6,( 32)?\) != model shape \(5,( 32)?\)"):
        load_tokenizer(config, FIXTURES / "tokenizer_C2.weights.safetensors", *c2_sizes(meta))
    config["model"]["vq_model"]["codebook_size"] = 64
    with pytest.raises(ValueError, match="codebook_size=64"):
        tokenizer_kwargs(config)


def test_bad_inputs_raise(c2):
    _, io, tok = c2
    images = io["tok.images"]
    with pytest.raises(ValueError, match=r"64x64.*\(2, 3, 48, 64\)"):
        tok.encode_bits(images[:, :, :48])
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 4, 64, 64\)"):
        tok.encode_bits(torch.cat([images, images[:, :1]], dim=1))
    bits = io["tok.bits_flat"].clone()
    bits[0, 5] = 2
    with pytest.raises(ValueError, match="found the value 2"):
        tok.decode_bits(bits)
    with pytest.raises(ValueError, match=r"\[B, 96\].*\(2, 95\)"):
        tok.decode_bits(io["tok.bits_flat"][:, :95])


def test_siglip2_checkpoint_init(c2, tmp_path):
    meta, io, tok = c2
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tok.encoder.load_siglip2_vision(tmp_path / "missing.safetensors")
    # A Hugging Face-style Siglip2Model state dict made from the fixture's frozen tower.
    weights = load_file(str(FIXTURES / "tokenizer_C2.weights.safetensors"))
    hf = {"vision_model." + k[len("encoder.siglip.") :]: v for k, v in weights.items() if k.startswith("encoder.siglip.")}
    hf["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 2)  # ignored
    encoder = SigLIP2Encoder(
        image_size=64, width=32, num_layers=2, num_heads=2, mlp_width=64, num_position_rows=16, with_pooling_head=True
    )
    from safetensors.torch import save_file

    save_file(hf, str(tmp_path / "model.safetensors"))
    encoder.load_siglip2_vision(tmp_path / "model.safetensors")
    features, targets = encoder(io["tok.images"], return_clip_targets=True)
    assert max_error(targets, io["tok.clip_gt"]) < ATOL
    assert torch.equal(features, targets)  # the trainable copy starts as the pretrained tower


# ---------------------------------------------------------------------------------------------------------------
# full-size layouts (meta device)
# ---------------------------------------------------------------------------------------------------------------
FULLSIZE = {"bar_fsq_16bits": (256, 16), "bar_fsq_10bits_res512": (512, 10)}


@pytest.mark.parametrize("name", sorted(FULLSIZE))
def test_fullsize_layouts_load_strictly(name):
    layout = json.loads((FIXTURES / "layouts_fullsize.json").read_text())["tokenizer"][name]
    crop_size, bits = FULLSIZE[name]
    config = {
        "dataset": {"preprocessing": {"crop_size": crop_size}},
        "model": {"vq_model": {"token_size": bits, "codebook_size": 2**bits, "vit_dec_patch_size": 16}},
        "losses": {"clip_loss_weight": 0.7},  # the training configs, hence the decoder's clip_projector
    }
    with torch.device("meta"):
        tok = BarFSQTokenizer(**tokenizer_kwargs(config), with_pooling_head=True)
    expected = [(entry["key"], tuple(entry["shape"])) for entry in layout["state_dict"]]
    exported = [(key, tuple(value.shape)) for key, value in export_tokenizer_state_dict(tok).items()]
    assert exported == expected
    assert sum(p.numel() for p in tok.parameters()) == layout["num_parameters_unique"]
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in expected}
    converted = import_tokenizer_state_dict(tok, checkpoint)
    assert set(converted) == set(tok.state_dict())


def test_training_forward_with_distillation_and_resized_positions():
    # No golden tensors exist for the clip projector or for a resized position grid (README section 8); check
    # shapes, gradient flow and which parts train.
    torch.manual_seed(0)
    tok = BarFSQTokenizer(
        image_size=128, bits_per_token=4, encoder_width=32, encoder_layers=1, encoder_heads=2, encoder_mlp_width=64,
        encoder_position_rows=16, decoder_width=32, decoder_layers=3, decoder_heads=2, clip_distillation=True,
    )  # a 4x4 position table resized to the 8x8 token grid
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    output = tok(images)
    assert output.reconstruction.shape == (2, 3, 128, 128)
    assert output.bits.shape == (2, 64, 4)
    assert output.clip_prediction.shape == output.clip_target.shape == (2, 64, 32)
    loss = output.reconstruction.square().mean() + (output.clip_prediction - output.clip_target).square().mean()
    loss.backward()
    assert tok.encoder.trainable_layers[0].mlp.fc1.weight.grad is not None
    assert tok.quantize.in_proj.weight.grad is not None
    assert tok.encoder.frozen_layers[0].mlp.fc1.weight.grad is None
    assert tok.encoder.embeddings.patch_embedding.weight.grad is None
    assert torch.equal(tok.decode_bits(tok.encode_bits(images)), tok.decode_features(tok.quantize(tok.encode_features(images))[0]))
