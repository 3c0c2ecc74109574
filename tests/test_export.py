"""Export as the official release looks: official key names and the official yaml, loaded back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from bar_lightning import export
from bar_lightning.compat.upstream import load_generator, load_tokenizer
from bar_lightning.compat.upstream_tokenizer import tokenizer_kwargs
from bar_lightning.config.schema import ConfigError, validate_evaluate_config
from bar_lightning.eval.evaluate import run_evaluation
from bar_lightning.eval.sampling import load_generator_from_source
from bar_lightning.lightning.generator_module import GeneratorModule
from bar_lightning.models.tokenizer import BarFSQTokenizer

from .test_evaluate import compose_evaluate

SMALL_SIZES = dict(image_size=32, bits_per_token=4, encoder_width=32, encoder_layers=2, encoder_heads=2,
                   encoder_mlp_width=64, encoder_position_rows=4, decoder_width=32, decoder_layers=3,
                   decoder_heads=2, clip_distillation=True)


def _equal_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_generator_export_loads_back_through_evaluate_bit_exactly(generator_checkpoint, tmp_path):
    weights, config_path = export.export_generator(generator_checkpoint, tmp_path / "export", name="tiny_bar")
    assert (weights.name, config_path.name) == ("tiny_bar.bin", "tiny_bar.yaml")
    official = yaml.safe_load(config_path.read_text())
    hparams = torch.load(generator_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    generator = official["model"]["generator"]
    # The official sampler reads its settings from these keys.
    assert generator["guidance_scale"] == hparams["sampling"]["guidance_scale"]
    assert generator["mbm_head"]["randomize_temperature"] == hparams["sampling"]["temperature"]
    assert generator["mbm_head"]["tokens_allocation"] == list(hparams["sampling"]["tokens_allocation"])
    assert official["model"]["vq_model"]["token_size"] == hparams["model"]["bits_per_token"]
    assert official["experiment"]["generator_checkpoint"] == "tiny_bar.bin"
    exported = torch.load(weights, map_location="cpu", weights_only=True)
    assert any(key.endswith("attn.rope.freqs_cos") for key in exported)  # the official BAR's per-block tables

    trained = GeneratorModule.load_from_checkpoint(generator_checkpoint, map_location="cpu").generator.state_dict()
    released = load_generator_from_source(OmegaConf.create(
        {"checkpoint": None, "upstream_weights": str(weights), "upstream_config": str(config_path)}))
    _equal_state(trained, released.state_dict())

    def sample(overrides, folder):
        cfg = validate_evaluate_config(compose_evaluate(
            [*overrides, "sampling=tiny", "classes=[0,1]", "num_samples_per_class=2", "device=cpu", "save.npz=false",
             "metrics.names=[]", "sampling.cuda_graph=false", "sampling.compile=false"], folder))
        run_evaluation(cfg)
        return np.load(folder / "samples_bits.npz")["bits"]

    from_checkpoint = sample([f"generator.checkpoint={generator_checkpoint}"], tmp_path / "a")
    from_export = sample([f"generator.upstream_weights={weights}", f"generator.upstream_config={config_path}"],
                         tmp_path / "b")
    assert np.array_equal(from_checkpoint, from_export)


def test_load_generator_takes_this_projects_checkpoint(generator_checkpoint, tmp_path):
    weights, config_path = export.export_generator(generator_checkpoint, tmp_path)
    config = yaml.safe_load(config_path.read_text())
    _equal_state(load_generator(config, generator_checkpoint).state_dict(), load_generator(config, weights).state_dict())


def test_safetensors_export_and_no_silent_overwrite(generator_checkpoint, tmp_path):
    weights, _ = export.export_generator(generator_checkpoint, tmp_path, name="g", file_format="safetensors")
    assert weights.suffix == ".safetensors"
    before = weights.read_bytes()
    with pytest.raises(export.ExportError, match="overwrite=true"):
        export.export_generator(generator_checkpoint, tmp_path, name="g", file_format="safetensors")
    assert weights.read_bytes() == before
    export.export_generator(generator_checkpoint, tmp_path, name="g", file_format="safetensors", overwrite=True)
    assert not list(tmp_path.glob(".*.tmp"))


def _bar_fsq_checkpoint(path, **sizes):
    torch.manual_seed(0)
    tokenizer = BarFSQTokenizer(**sizes)
    for parameter in tokenizer.parameters():  # zero-initialised layers would hide a mixed-up key
        torch.nn.init.normal_(parameter, std=0.2)
    checkpoint = {
        "state_dict": {f"tokenizer.{key}": value for key, value in tokenizer.state_dict().items()},
        "hyper_parameters": {"model": {"family": "bar_fsq", **sizes}, "loss": {"distill_weight": 0.7, "l1_weight": 0.1},
                             "optim": {"encoder_lr_multiplier": 0.1}},
    }
    torch.save(checkpoint, path)
    return tokenizer.eval()


def test_a_tokenizer_export_keeps_every_weight_and_decodes_the_same(tmp_path):
    original = _bar_fsq_checkpoint(tmp_path / "tok.ckpt", **SMALL_SIZES)
    with pytest.raises(export.ExportError, match="encoder_width=32 \\(official 1152\\)"):
        export.export_tokenizer(tmp_path / "tok.ckpt", tmp_path / "out")
    weights, config_path = export.export_tokenizer(tmp_path / "tok.ckpt", tmp_path / "out", name="small_fsq",
                                                   official_sizes_only=False)
    official = yaml.safe_load(config_path.read_text())
    assert official["model"]["vq_model"]["codebook_size"] == 16
    assert official["dataset"]["preprocessing"]["crop_size"] == 32
    exported = torch.load(weights, map_location="cpu", weights_only=True)
    assert any(key.startswith("encoder.siglip.encoder.layers.") for key in exported)  # official names
    assert any(key.startswith("decoder.transformer.") for key in exported)
    # The official keys of the yaml give back our sizes except those the official code hard-codes.
    kwargs = tokenizer_kwargs(official)
    assert {key: kwargs[key] for key in ("image_size", "bits_per_token", "clip_distillation")} == {
        "image_size": 32, "bits_per_token": 4, "clip_distillation": True}
    loaded = load_tokenizer(official, weights,
                            encoder={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "num_patches": 4},
                            decoder={"width": 32, "num_layers": 3, "num_heads": 2})
    bits = torch.randint(0, 2, (2, original.num_bits))
    with torch.no_grad():
        assert torch.equal(loaded.decode_bits(bits), original.decode_bits(bits))
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        assert torch.equal(loaded.encode_bits(images), original.encode_bits(images))


def test_what_the_official_code_cannot_hold_is_refused(tokenizer_checkpoint, generator_checkpoint, tmp_path):
    with pytest.raises(export.ExportError, match="'conv' tokenizer"):
        export.export_tokenizer(tokenizer_checkpoint, tmp_path)
    with pytest.raises(Exception, match="tokenizer.checkpoint"):
        export.export_tokenizer(generator_checkpoint, tmp_path)


@pytest.mark.parametrize(("argv", "message"), [
    (["out=x"], "exactly one of generator.checkpoint"),
    (["generator.checkpoint=a.ckpt"], "out=<folder> is required"),
    (["generator.checkpoint=a.ckpt", "out=x", "format=pt"], "format='pt'"),
    (["generator.checkpoint=a.ckpt", "out=x", "fromat=bin"], "fromat"),
    (["generator.checkpoint=a.ckpt", "out=x", "overwrite=maybe"], "overwrite"),
    (["generator.checkpoint"], "key=value"),
])
def test_bad_arguments_are_refused_naming_them(argv, message):
    with pytest.raises(ConfigError, match=message):
        export.parse_arguments(argv)


def test_the_command_prints_how_to_load_the_export(generator_checkpoint, tmp_path, capsys):
    assert export.main([f"generator.checkpoint={generator_checkpoint}", f"out={tmp_path}", "name=cli"]) == 0
    out = capsys.readouterr().out
    assert f"generator.upstream_weights={tmp_path / 'cli.bin'}" in out
    assert export.main([f"generator.checkpoint={tmp_path / 'missing.ckpt'}", f"out={tmp_path}"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
