"""Tokenizer losses and discriminators, on random weights written to temporary files (nothing is downloaded).

Weight files are written once per module in float16 to keep them small (`load_state_dict` copies them into the
float32 parameters). The ImageNet networks run at 32 px here instead of 224 to keep the file fast on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch.nn.utils.parametrize import is_parametrized

from bar_lightning.models.discriminator import (
    BatchNormLocal,
    DinoDiscriminator,
    DinoViTBackbone,
    PatchDiscriminator,
)
from bar_lightning.models.losses import (
    LOSS_OFF,
    LPIPS,
    GramLoss,
    TokenizerReconstructionLoss,
    generator_adversarial_loss,
    hinge_d_loss,
    quantize_to_uint8_grid,
)
from bar_lightning.models.pretrained import load_torch_weights, require_weights

SMALL_SIZE = 32  # the smallest input VGG16 and ConvNeXt accept; stands in for 224 in these tests


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def vgg16_file(weights_dir: Path) -> Path:
    """A features-only torchvision VGG16 state dict with He-initialised random convs."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    state = {}
    for name, tensor in features.state_dict().items():
        if name.endswith("weight"):
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            value = torch.zeros(tensor.shape)
        state[f"features.{name}"] = value.half()
    path = weights_dir / "vgg16-397923af.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def lpips_file(weights_dir: Path) -> Path:
    """LPIPS v0.1 linear heads (non-negative, like the trained ones), in the official key layout."""
    generator = torch.Generator().manual_seed(1)
    state = {
        f"lin{k}.model.1.weight": torch.rand(1, channels, 1, 1, generator=generator) / channels
        for k, channels in enumerate((64, 128, 256, 512, 512))
    }
    path = weights_dir / "vgg.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def convnext_file(weights_dir: Path) -> Path:
    """A randomly initialised torchvision ConvNeXt-Small, as safetensors (the other loader path)."""
    torch.manual_seed(2)
    state = {
        name: tensor.half().contiguous()
        for name, tensor in torchvision.models.convnext_small().state_dict().items()
    }
    path = weights_dir / "convnext_small.safetensors"
    save_file(state, str(path))
    return path


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pixel_only_loss(**weights: float) -> TokenizerReconstructionLoss:
    no_networks = dict(perceptual_weight=0.0, gram_weight=0.0, distill_weight=0.0)
    return TokenizerReconstructionLoss(**{**no_networks, **weights})


# --- GAN objectives -----------------------------------------------------------------------------------------------


def test_hinge_d_loss_on_known_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    # Beyond the margins (real >= 1, fake <= -1) the discriminator loss is exactly 0.
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_generator_adversarial_loss_rewards_fakes_scored_as_real() -> None:
    fake_logits = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = generator_adversarial_loss(fake_logits)
    assert loss.item() == -2.0
    loss.backward()
    # Descending the loss raises the logits, i.e. the fakes look more real to D.
    assert torch.all(fake_logits.grad < 0)


def test_quantize_to_uint8_grid_snaps_clamps_and_detaches() -> None:
    images = torch.tensor([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0], requires_grad=True)
    quantized = quantize_to_uint8_grid(images)
    levels = (quantized + 1.0) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert quantized.min().item() == -1.0 and quantized.max().item() == 1.0
    assert abs(quantized[3].item() - 0.3) <= 1 / 255 + 1e-6
    assert not quantized.requires_grad
    torch.testing.assert_close(quantize_to_uint8_grid(quantized), quantized)


# --- pixel terms and construction rules ---------------------------------------------------------------------------


def test_pixel_terms_are_exact_and_need_no_network() -> None:
    loss = _pixel_only_loss(l1_weight=0.1, l2_weight=1.0)
    assert loss.frozen_names() == ()
    assert loss.state_dict() == {} and list(loss.parameters()) == []
    reconstructions = torch.zeros(2, 3, 4, 4, requires_grad=True)
    targets = torch.full((2, 3, 4, 4), 0.5)
    total, terms = loss(reconstructions, targets)
    assert set(terms) == {"l1", "l2"}
    assert terms["l1"].item() == 0.5 and terms["l2"].item() == 0.25
    assert total.item() == pytest.approx(0.1 * 0.5 + 1.0 * 0.25)
    total.backward()
    assert reconstructions.grad is not None and torch.all(reconstructions.grad < 0)


def test_distillation_term_is_mse_and_required_when_weighted() -> None:
    loss = _pixel_only_loss(l1_weight=0.0, l2_weight=0.0, distill_weight=0.7)
    prediction = torch.zeros(2, 3, 5)
    target = torch.full((2, 3, 5), 2.0)
    total, terms = loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), prediction, target)
    assert terms["distill"].item() == 4.0 and total.item() == pytest.approx(0.7 * 4.0)
    with pytest.raises(ValueError, match="distill_pred and distill_target"):
        loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def test_invalid_weights_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="l1_weight=-1.0"):
        _pixel_only_loss(l1_weight=-1.0)
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        TokenizerReconstructionLoss(
            perceptual_weight=1.1, lpips_weight=0.0, convnext_weight=0.0, gram_weight=0.0
        )


@pytest.mark.parametrize(
    ("overrides", "missing_file", "must_mention"),
    [
        (
            dict(perceptual_weight=0.0, gram_weight=10.0),
            "vgg16_weights",
            ("vgg16-397923af.pth", "gram_weight=10.0"),
        ),
        (dict(convnext_weight=0.0, gram_weight=0.0), "lpips_weights", ("vgg.pth", "lpips_weight=1.0")),
        (
            dict(lpips_weight=0.0, gram_weight=0.0),
            "convnext_weights",
            ("convnext_small", "convnext_weight=0.1"),
        ),
    ],
)
def test_missing_file_names_the_file_and_the_loss(
    tmp_path: Path,
    vgg16_file: Path,
    lpips_file: Path,
    overrides: dict[str, float],
    missing_file: str,
    must_mention: tuple[str, ...],
) -> None:
    files = {"vgg16_weights": vgg16_file, "lpips_weights": lpips_file, "convnext_weights": None}
    files[missing_file] = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError) as error:
        TokenizerReconstructionLoss(distill_weight=0.0, **overrides, **files)
    message = str(error.value)
    for text in (str(tmp_path / "absent.pth"), missing_file, "weight to 0", *must_mention):
        assert text in message


def test_require_weights_without_a_path_says_how_to_disable() -> None:
    with pytest.raises(FileNotFoundError, match="No path was given.*the Gram loss.*weight to 0"):
        require_weights(None, what="torchvision VGG16 ImageNet weights", needed_by="the Gram loss",
                        how_to_disable=LOSS_OFF)
    with pytest.raises(FileNotFoundError, match=r"the Gram loss needs it\. Pass the path of a local copy \(nothing is "
                                                r"downloaded at run time\)\.$"):
        require_weights(None, what="torchvision VGG16 ImageNet weights", needed_by="the Gram loss")


def test_load_torch_weights_rejects_a_wrapped_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="flat state dict"):
        load_torch_weights(path)


# --- pretrained-network losses ------------------------------------------------------------------------------------


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(
    vgg16_file: Path, lpips_file: Path
) -> None:
    lpips = LPIPS(vgg16_weights=vgg16_file, lpips_weights=lpips_file)
    images, other_images = _images(2, SMALL_SIZE, seed=3), _images(2, SMALL_SIZE, seed=4)
    with torch.no_grad():
        same = lpips(images, images)
        different = lpips(images, other_images)
    assert same.shape == (2,) and torch.all(same == 0)
    assert torch.all(different > 0)
    # The heads were loaded from the file, not left at their initialisation.
    torch.testing.assert_close(lpips.linear_heads[2].weight, torch.load(lpips_file)["lin2.model.1.weight"])


def test_lpips_rejects_a_head_file_with_other_keys(tmp_path: Path, vgg16_file: Path) -> None:
    path = tmp_path / "not_lpips.pth"
    torch.save({"lin0.weight": torch.zeros(1, 64, 1, 1)}, path)
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        LPIPS(vgg16_weights=vgg16_file, lpips_weights=path)


def test_gram_loss_counts_layers_like_the_official_code(vgg16_file: Path) -> None:
    """The official code records every VGG layer output; in-place ReLUs overwrite the recorded conv outputs."""
    gram = GramLoss(vgg16_weights=vgg16_file, input_size=SMALL_SIZE)
    reconstructions, targets = _images(1, 24, seed=5), _images(1, 24, seed=6)
    with torch.no_grad():
        recorded, recorded_targets = [], []
        features, target_features = gram._prepare(reconstructions), gram._prepare(targets)
        for layer in gram.vgg_features:  # torchvision's ReLU(inplace=True) produces the aliasing by itself
            features, target_features = layer(features), layer(target_features)
            recorded.append(features)
            recorded_targets.append(target_features)
        expected = sum(
            F.mse_loss(gram.gram_matrix(a), gram.gram_matrix(b)) for a, b in zip(recorded, recorded_targets)
        )
        torch.testing.assert_close(gram(reconstructions, targets), expected)
        assert gram(targets, targets).item() == 0.0


def test_full_loss_frozen_networks_grads_state_and_device(
    vgg16_file: Path, lpips_file: Path, convnext_file: Path
) -> None:
    weights = dict(
        l1_weight=0.1, l2_weight=1.0, perceptual_weight=1.1, lpips_weight=1.0, convnext_weight=0.1,
        gram_weight=10.0, distill_weight=0.7,
    )  # fmt: skip
    loss = TokenizerReconstructionLoss(
        **weights,
        vgg16_weights=vgg16_file,
        lpips_weights=lpips_file,
        convnext_weights=convnext_file,
        imagenet_input_size=SMALL_SIZE,
    )
    assert set(loss.frozen_names()) == {"perceptual", "gram"}
    frozen_parameters = [p for name in loss.frozen_names() for p in loss.frozen(name).parameters()]
    assert len(frozen_parameters) > 0
    # Checkpoints stay small and optimisers see nothing.
    assert loss.state_dict() == {} and list(loss.parameters()) == []

    loss.train()  # must not switch the frozen networks (ConvNeXt has stochastic depth) to training mode
    assert all(not module.training for name in loss.frozen_names() for module in loss.frozen(name).modules())

    reconstructions = _images(2, SMALL_SIZE, seed=7).requires_grad_(True)
    targets = _images(2, SMALL_SIZE, seed=8)
    distill_pred = torch.randn(2, 4, 8, requires_grad=True)
    distill_target = torch.randn(2, 4, 8)
    total, terms = loss(reconstructions, targets, distill_pred, distill_target)
    assert set(terms) == {"l1", "l2", "perceptual", "lpips", "convnext", "gram", "distill"}
    assert all(torch.isfinite(value) and not value.requires_grad for value in terms.values())
    perceptual = (1.0 * terms["lpips"] + 0.1 * terms["convnext"]) / 1.1
    torch.testing.assert_close(terms["perceptual"], perceptual)
    expected_total = sum(
        weights[f"{name}_weight"] * terms[name] for name in ("l1", "l2", "perceptual", "gram", "distill")
    )
    torch.testing.assert_close(total.detach(), expected_total)

    total.backward()
    assert reconstructions.grad is not None and torch.isfinite(reconstructions.grad).all()
    assert reconstructions.grad.abs().sum() > 0 and distill_pred.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in frozen_parameters)

    loss.to(torch.float64)
    assert all(
        p.dtype == torch.float64 for name in loss.frozen_names() for p in loss.frozen(name).parameters()
    )
    loss.to("meta")
    assert all(p.is_meta for name in loss.frozen_names() for p in loss.frozen(name).parameters())
    assert all(b.is_meta for name in loss.frozen_names() for b in loss.frozen(name).buffers())


def test_zero_weight_skips_the_network_and_its_file(vgg16_file: Path, lpips_file: Path) -> None:
    loss = TokenizerReconstructionLoss(
        convnext_weight=0.0,
        gram_weight=0.0,
        vgg16_weights=vgg16_file,
        lpips_weights=lpips_file,
        convnext_weights=None,
    )
    assert loss.frozen_names() == ("perceptual",)
    assert loss.frozen("perceptual").convnext is None and loss.frozen("perceptual").lpips is not None


# --- discriminators -----------------------------------------------------------------------------------------------


def _small_dino_discriminator() -> DinoDiscriminator:
    torch.manual_seed(9)
    return DinoDiscriminator(backbone_weights=None, random_backbone=True, image_size=SMALL_SIZE)


def test_dino_discriminator_shapes_trainable_heads_and_grads() -> None:
    discriminator = _small_dino_discriminator()
    patches = (SMALL_SIZE // 8) ** 2
    real, fake = _images(2, 48, seed=10), _images(2, 48, seed=11).requires_grad_(True)

    assert all(name.startswith("heads.") for name in discriminator.state_dict())
    assert all(name.startswith("heads.") for name, _ in discriminator.named_parameters())
    backbone_parameters = list(discriminator.backbone.parameters())
    assert backbone_parameters and all(not p.requires_grad for p in backbone_parameters)

    real_logits, fake_logits = discriminator(real), discriminator(fake)
    assert real_logits.shape == fake_logits.shape == (2, 5 * patches)
    hinge_d_loss(real_logits, fake_logits).backward()
    assert all(p.grad is not None for p in discriminator.heads.parameters())
    assert all(p.grad is None for p in backbone_parameters)
    # The generator's adversarial gradient reaches the images through the frozen backbone.
    assert fake.grad is not None and fake.grad.abs().sum() > 0

    discriminator.eval()  # no random crop: scores are reproducible
    with torch.no_grad():
        torch.testing.assert_close(discriminator(real), discriminator(real))
    discriminator.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in discriminator.backbone.parameters())


def test_dino_discriminator_loads_an_official_layout_backbone_strictly(tmp_path: Path) -> None:
    torch.manual_seed(12)
    reference = DinoViTBackbone()  # ViT-S/8 at 224: the checkpoint's geometry
    official_keys = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    for block in range(12):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            official_keys |= {f"blocks.{block}.{part}.weight", f"blocks.{block}.{part}.bias"}
    state = {name: tensor.half() for name, tensor in reference.state_dict().items()}
    assert set(state) == official_keys
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)

    discriminator = DinoDiscriminator(backbone_weights=path)
    loaded = discriminator.backbone.state_dict()
    width = 384
    for name, tensor in state.items():
        if name.endswith("attn.qkv.bias"):
            # The key bias is zeroed on load; query and value biases are kept.
            assert torch.all(loaded[name][width : 2 * width] == 0)
            torch.testing.assert_close(loaded[name][:width], tensor[:width].float())
            torch.testing.assert_close(loaded[name][2 * width :], tensor[2 * width :].float())
        else:
            torch.testing.assert_close(loaded[name], tensor.float())

    del state["blocks.3.mlp.fc1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="blocks.3.mlp.fc1.weight"):
        DinoDiscriminator(backbone_weights=path)
    with pytest.raises(FileNotFoundError, match=r"dino_deitsmall8_pretrain.pth.*training\.gan_weight=0 ~discriminator"):
        DinoDiscriminator(backbone_weights=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="random_backbone"):
        DinoDiscriminator(backbone_weights=path, random_backbone=True)


def test_batch_norm_local_normalises_each_virtual_batch() -> None:
    norm = BatchNormLocal(4, virtual_batch_size=8)
    x = torch.randn(16, 4, 10) * 3 + 5
    grouped = norm(x).view(2, 8, 4, 10)
    torch.testing.assert_close(grouped.mean(dim=(1, 3)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.var(dim=(1, 3), unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="batch of 9"):
        norm(torch.randn(9, 4, 10))


@pytest.mark.parametrize(("norm", "use_spectral_norm"), [("batch", False), ("none", True), ("group", False)])
def test_patch_discriminator_shape_and_grads(norm: str, use_spectral_norm: bool) -> None:
    torch.manual_seed(13)
    discriminator = PatchDiscriminator(
        base_channels=8, num_layers=3, norm=norm, use_spectral_norm=use_spectral_norm
    )
    images = _images(2, 64, seed=14).requires_grad_(True)
    logits = discriminator(images)
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, kernel 4)
    generator_adversarial_loss(logits).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in discriminator.parameters())
    assert is_parametrized(discriminator.layers[0], "weight") == use_spectral_norm
