"""Random stand-ins for the pretrained files of a full-size tokenizer run (benchmarks, GPU tests, rehearsals): every
file lands at its configured path in the layout the real loaders read, and nothing that exists is replaced."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from bar_lightning.config.schema import validate_train_config
from bar_lightning.run import build_tokenizer_job
from bar_lightning.stand_in_weights import vgg16_state, write_stand_in_weights

from .test_configs import compose_train

# bar_fsq_16bits with a small SigLIP2-shaped encoder and decoder (the loss networks and DINO keep their real sizes).
SMALL_BAR_FSQ = [
    "experiment=bar_fsq_16bits", "data=synthetic_images", "model.image_size=64", "model.encoder_width=32",
    "model.encoder_layers=2", "model.encoder_heads=2", "model.encoder_mlp_width=64", "model.encoder_position_rows=16",
    "model.decoder_width=32", "model.decoder_layers=3", "model.decoder_heads=2",
]


def test_stand_ins_land_where_the_config_reads_and_the_real_loaders_take_them(tmp_path):
    pretrained = tmp_path / "pretrained"
    cfg = validate_train_config(compose_train([*SMALL_BAR_FSQ, f"paths.pretrained_dir={pretrained}"], tmp_path / "run"))
    written = write_stand_in_weights(cfg)
    assert {key: path.relative_to(pretrained).as_posix() for key, path in written.items()} == {
        "loss.vgg16_weights": "vgg16-397923af.pth",
        "loss.lpips_weights": "lpips_vgg_v0.1.pth",
        "loss.convnext_weights": "convnext_small-0c510722.pth",
        "discriminator.backbone_weights": "dino_vit_small_patch8_224.pth",
        "training.encoder_init_weights": "siglip2-so400m-patch16-naflex/model.safetensors",
    }
    assert not list(pretrained.rglob("*.partial"))
    # LPIPS, Gram, ConvNeXt and DINO read their files strictly; a fresh run's encoder starts from SigLIP2's
    module, _ = build_tokenizer_job(cfg)
    siglip = load_file(str(written["training.encoder_init_weights"]))
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in siglip
    encoder = module.tokenizer.encoder
    torch.testing.assert_close(encoder.frozen_layers[1].mlp.fc1.weight,
                               siglip["vision_model.encoder.layers.1.mlp.fc1.weight"], rtol=0, atol=0)
    # The trainable branch starts as a copy of the frozen one, as with the real SigLIP2 file.
    torch.testing.assert_close(encoder.trainable_layers[1].mlp.fc1.weight, encoder.frozen_layers[1].mlp.fc1.weight)
    # A resumed run takes its encoder from the checkpoint: the SigLIP2 file is not loaded over it.
    resumed, _ = build_tokenizer_job(cfg, resuming=True)
    assert not torch.equal(resumed.tokenizer.encoder.frozen_layers[1].mlp.fc1.weight,
                           siglip["vision_model.encoder.layers.1.mlp.fc1.weight"])


def test_an_existing_file_is_never_replaced(tmp_path):
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    real = pretrained / "vgg16-397923af.pth"
    torch.save(vgg16_state(), real)  # the user's file (a valid VGG16: the LPIPS stand-in is checked against it)
    before = real.read_bytes()
    cfg = validate_train_config(compose_train([*SMALL_BAR_FSQ, f"paths.pretrained_dir={pretrained}",
                                               "training.encoder_init_weights=null"], tmp_path / "run"))
    written = write_stand_in_weights(cfg)
    assert "loss.vgg16_weights" not in written and real.read_bytes() == before
    assert "training.encoder_init_weights" not in written and "loss.lpips_weights" in written
