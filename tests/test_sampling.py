"""Sampling invariants of the generator and its heads (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from bar_lightning.models.bar import NULL_LABEL, BARGenerator
from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MASK_ID, MaskBitModelingHead, validate_tokens_allocation


def tiny_generator(patch_size: int = 1, head: str = "mbm", seed: int = 0) -> BARGenerator:
    torch.manual_seed(seed)
    model = BARGenerator(
        hidden_size=32, num_layers=2, num_heads=2, num_tokens=16, bits_per_token=4, num_classes=5,
        patch_size=patch_size, repeat_class_condition=3, head=head, head_width=24, head_layers=1,
    )
    # Re-randomise every weight at unit scale (as the golden fixtures do): with the training init (std 0.02, zero
    # adaLN) the class and the bits barely influence a fresh model's logits.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_generate_returns_flat_bits(patch_size):
    model = tiny_generator(patch_size)
    allocation = [1, 1, 2] if patch_size == 1 else [model.bits_per_step // 2] * 2
    generator = torch.Generator().manual_seed(0)
    bits = model.generate(torch.tensor([0, 4, 2]), guidance_scale=2.0, temperature=1.0,
                          tokens_allocation=allocation, generator=generator)
    assert bits.shape == (3, 16 * 4) and bits.dtype == torch.long
    assert set(bits.unique().tolist()) <= {0, 1}


def test_generation_is_reproducible_with_a_generator_and_varies_with_the_seed():
    model = tiny_generator()
    labels = torch.tensor([1, 1, 3])
    runs = [
        model.generate(labels, guidance_scale=3.0, temperature=2.0, tokens_allocation=[1, 1, 2],
                       generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_head_fixes_exactly_the_allocated_bits_per_iteration(monkeypatch):
    head = MaskBitModelingHead(bits_per_step=16, width=32, num_layers=1)
    masked_counts: list[list[int]] = []
    original = head.logits

    def recording_logits(bit_ids, conditions, mask_ratio):
        masked_counts.append((bit_ids == MASK_ID).sum(-1).tolist())
        return original(bit_ids, conditions, mask_ratio)

    monkeypatch.setattr(head, "logits", recording_logits)
    bits = head.sample(torch.randn(4, 1, 32), temperature=1.0, tokens_allocation=[2, 2, 5, 7],
                       generator=torch.Generator().manual_seed(0))
    assert masked_counts == [[16] * 4, [14] * 4, [12] * 4, [7] * 4]
    assert set(bits.unique().tolist()) <= {0, 1}


def test_cfg_scale_ramps_linearly_from_one():
    model = tiny_generator()
    trace: dict = {}
    model.generate(torch.tensor([0]), guidance_scale=4.0, temperature=0.0, tokens_allocation=[4], trace=trace)
    steps = model.num_steps
    assert trace["step_cfg_scale"] == pytest.approx([1 + 3.0 * k / steps for k in range(steps)])
    no_cfg: dict = {}
    model.generate(torch.tensor([0]), guidance_scale=1.0, temperature=0.0, tokens_allocation=[4], trace=no_cfg)
    assert no_cfg["step_cfg_scale"] == [1.0] * steps
    assert no_cfg["step_conditions"][0].shape[0] == 1  # no doubled batch without CFG
    assert trace["step_conditions"][0].shape[0] == 2


def test_guidance_changes_samples_and_null_label_is_accepted():
    model = tiny_generator()
    labels = torch.tensor([0, 1, 2, 3])
    plain = model.generate(labels, guidance_scale=1.0, temperature=0.0, tokens_allocation=[4])
    guided = model.generate(labels, guidance_scale=8.0, temperature=0.0, tokens_allocation=[4])
    assert not torch.equal(plain, guided)
    unconditional = model.generate(torch.tensor([NULL_LABEL]), guidance_scale=1.0, temperature=0.0,
                                   tokens_allocation=[4])
    assert unconditional.shape == (1, 64)


def test_random_order_generation_places_steps_at_their_locations():
    # With temperature 0 and a model whose output ignores positions, orders must not change the result...
    model = tiny_generator()
    bits = model.generate(torch.tensor([0, 1]), temperature=0.0, tokens_allocation=[4], random_order=True,
                          generator=torch.Generator().manual_seed(3))
    assert bits.shape == (2, 64)
    # ...and for the real model, teacher forcing the generated sequence in that same order is consistent.
    steps = model.tokens_to_steps(bits)
    assert torch.equal(model.steps_to_tokens(steps), bits)


@pytest.mark.parametrize(
    "allocation, message",
    [([1, 1, 1], "sums to 3"), ([0, 2, 2], "non-positive"), ([3, 1], "non-decreasing"), ([], "empty")],
)
def test_invalid_tokens_allocation_is_rejected(allocation, message):
    with pytest.raises(ValueError, match=message):
        validate_tokens_allocation(allocation, 4)
    model = tiny_generator()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([0]), tokens_allocation=allocation)


def test_bad_labels_and_bits_are_rejected():
    model = tiny_generator()
    with pytest.raises(ValueError, match=r"class label 5 is out of range; expected 0\.\.4"):
        model.generate(torch.tensor([5]), tokens_allocation=[4])
    with pytest.raises(ValueError, match=r"shape \[B, 64\]"):
        model.check_bits(torch.zeros(2, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        model.check_bits(torch.full((2, 64), 2))


def test_training_masks_follow_the_logit_normal_schedule():
    head = MaskBitModelingHead(bits_per_step=16, width=32, num_layers=1)
    target = torch.randint(0, 2, (4000, 16))
    masked, is_masked, ratio = head.mask_bits(target, torch.Generator().manual_seed(0))
    counts = is_masked.sum(-1)
    assert counts.min() >= 1
    assert torch.equal(counts, (16 * ratio).round().clamp(min=1).long())
    assert torch.equal(masked[~is_masked], target[~is_masked]) and bool((masked[is_masked] == MASK_ID).all())
    # E[1 - sigmoid(N(0, 0.8^2))] = 0.5 by symmetry.
    assert abs(ratio.mean().item() - 0.5) < 0.02


def test_linear_head_codes_round_trip_and_loss():
    head = LinearSoftmaxHead(bits_per_step=6, width=16)
    bits = torch.randint(0, 2, (32, 6))
    assert torch.equal(head.codes_to_bits(head.bits_to_codes(bits)), bits)
    conditions = torch.randn(32, 1, 16)
    loss = head.loss(bits, conditions)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.2)
    samples = head.sample(torch.randn(10, 1, 16), guidance_scale=2.0, temperature=1.0, use_cfg=True)
    assert samples.shape == (5, 6)
    with pytest.raises(ValueError, match="bits_per_step=30"):
        LinearSoftmaxHead(bits_per_step=30, width=16)


def test_linear_head_generator_trains_and_samples():
    model = tiny_generator(head="linear").train()
    bits = torch.randint(0, 2, (3, 64))
    loss = model(bits, torch.tensor([0, 1, NULL_LABEL]))
    loss.backward()
    assert model.lm_head.output.weight.grad is not None
    out = model.eval().generate(torch.tensor([0, 1]), guidance_scale=2.0, temperature=1.0)
    assert out.shape == (2, 64)
