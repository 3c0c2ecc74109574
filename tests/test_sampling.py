"""Sampling invariants of the generator and its heads (tiny random models)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bar_lightning.models.bar import NULL_LABEL, BARGenerator
from bar_lightning.models.layers import SwiGLU
from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MASK_ID, MaskBitModelingHead, validate_tokens_allocation
from bar_lightning.models.sampler import SamplingSettings, run_sampling_loop

from .conftest import record_sampling_steps


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


def test_cfg_scale_ramps_linearly_from_one(monkeypatch):
    model = tiny_generator()
    steps = model.num_steps
    recorded = record_sampling_steps(monkeypatch, model)
    model.generate(torch.tensor([0]), guidance_scale=4.0, temperature=0.0, tokens_allocation=[4])
    assert recorded["step_cfg_scale"] == pytest.approx([1 + 3.0 * k / steps for k in range(steps)])
    assert recorded["step_conditions"][0].shape[0] == 2
    for values in recorded.values():
        values.clear()
    model.generate(torch.tensor([0]), guidance_scale=1.0, temperature=0.0, tokens_allocation=[4])
    assert recorded["step_cfg_scale"] == [1.0] * steps
    assert recorded["step_conditions"][0].shape[0] == 1  # no doubled batch without CFG


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
    with pytest.raises(ValueError, match="bits must be 0 or 1; found 2"):
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


class RefuseHostSync(TorchDispatchMode):
    """Fails on every operation that copies a tensor value to the host (`.item()`, `bool(t)`, `int(t)`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation through {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", ["mbm", "linear"])
@pytest.mark.parametrize("random_order", [False, True])
def test_sampling_loop_never_synchronises_with_the_host(head, random_order):
    # A CUDA graph can only capture the loop if it never reads a device value on the host.
    model = tiny_generator(head=head)
    allocation = (1, 1, 2) if head == "mbm" else (4,)
    settings = SamplingSettings(3.0, 1.0, allocation, random_order, "fp32")
    with RefuseHostSync():
        bits = run_sampling_loop(model, torch.tensor([0, 3]), settings, torch.Generator().manual_seed(0))
    assert bits.shape == (2, 64)
    with pytest.raises(AssertionError, match="host synchronisation"), RefuseHostSync():
        torch.tensor([1, 2]).sum().item()  # the guard itself works


def test_remask_count_follows_row_zero_without_host_reads():
    # The device-side clip max(1, min(masked_in_row_0 - 1, n)) must equal the official Python arithmetic; with
    # allocation [1, 1, 2] on 4 bits the head sees 4, 3, 2 masked bits at iterations 0, 1, 2.
    model = tiny_generator()
    masked_counts = []
    original = model.lm_head.logits

    def recording_logits(bit_ids, conditions, mask_ratio):
        masked_counts.append((bit_ids == MASK_ID).sum(-1))
        return original(bit_ids, conditions, mask_ratio)

    model.lm_head.logits = recording_logits
    latent = torch.randn(3, 1, model.head_width)
    model.lm_head.sample(latent, temperature=1.0, tokens_allocation=[1, 1, 2],
                         generator=torch.Generator().manual_seed(1))
    assert [int(count.unique()) for count in masked_counts] == [4, 3, 2]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_samples_the_same_bits_as_the_eager_loop():
    model = tiny_generator()
    labels = torch.tensor([0, 4, 2])
    kwargs = dict(guidance_scale=2.5, temperature=1.0, tokens_allocation=[1, 3])
    eager = model.generate(labels, generator=torch.Generator().manual_seed(5), **kwargs)
    model.compile_decode()
    try:
        compiled = model.generate(labels, generator=torch.Generator().manual_seed(5), **kwargs)
    finally:
        model.compile_decode(False)
    assert torch.equal(compiled, eager)


def test_fast_path_options_are_validated():
    model = tiny_generator()
    with pytest.raises(ValueError, match="precision='fp16' is not a sampling precision"):
        model.generate(torch.tensor([0]), tokens_allocation=[4], precision="fp16")
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        model.generate(torch.tensor([0]), tokens_allocation=[4], cuda_graph=True)


def test_aligned_swiglu_weights_compute_the_same_function():
    # The MBM head's hidden width 5461 is odd; zero padding to 5464 must not change the output.
    mlp = SwiGLU(48, 37)
    with torch.no_grad():
        for parameter in mlp.parameters():
            parameter.normal_()
    aligned = mlp.aligned_weights()
    assert aligned.w12.shape == (80, 48) and aligned.w3.shape == (48, 40)
    x = torch.randn(5, 48)
    torch.testing.assert_close(mlp(x, aligned), mlp(x), rtol=1e-5, atol=1e-5)
    assert SwiGLU(48, 40).aligned_weights() is None


def test_padded_head_mlps_train_with_the_same_loss_and_gradients():
    # training.align_head_matmuls (the GPU default): the gradients reach the real weights through the padding.
    torch.manual_seed(0)
    head = MaskBitModelingHead(bits_per_step=6, width=34, num_layers=2)  # MLP hidden int(2/3 * 136) = 90: unaligned
    assert head.transformer[0].mlp.w3.in_features % 8 != 0 and head.aligned_mlp_weights() is not None
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.2)
    bits = torch.randint(0, 2, (10, 6))
    conditions = torch.randn(10, 1, 34)

    hidden_widths = []  # hidden width each MLP call ran with
    head.transformer[0].mlp.register_forward_pre_hook(
        lambda module, args: hidden_widths.append(module.w3.in_features if args[1] is None else args[1].w3.shape[1])
    )

    def loss_and_grads(align):
        head.zero_grad()
        loss = head.loss(bits, conditions, torch.Generator().manual_seed(3), align_matmuls=align)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(False)
    padded_loss, padded_grads = loss_and_grads(True)
    assert hidden_widths == [90, 96]
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == plain_grads.keys() and "transformer.0.mlp.w12.weight" in padded_grads
    for name, grad in plain_grads.items():
        assert padded_grads[name].shape == grad.shape
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_decode_is_idempotent_and_switchable():
    model = tiny_generator()
    model.compile_decode()
    first = model_decode_functions(model)
    model.compile_decode()
    assert model_decode_functions(model) is first  # same compiled functions: captured graphs stay valid
    model.compile_decode(align_head=False)
    assert model_decode_functions(model) is not first and not model_decode_functions(model).align_head
    model.compile_decode(False)
    assert model_decode_functions(model) is None


def test_compiled_decode_takes_the_triton_attention_where_triton_is_installed_and_sdpa_elsewhere(monkeypatch):
    from bar_lightning.ops import decode_attention as kernel

    model = tiny_generator()
    for installed, expected in ((True, kernel.decode_attention), (False, None)):  # None: SDPA
        monkeypatch.setattr(kernel, "has_triton", lambda installed=installed: installed)
        model.compile_decode(False)
        model.compile_decode()
        assert model_decode_functions(model).fp32_attention is expected
    model.compile_decode(False)


def test_triton_decode_attention_rejects_inputs_it_does_not_handle():
    from bar_lightning.ops.decode_attention import decode_attention

    k = torch.randn(2, 3, 5, 16)
    with pytest.raises(ValueError, match="one query per row and head, got 2"):
        decode_attention(torch.randn(2, 3, 2, 16), k, k)
    with pytest.raises(ValueError, match="float32 kernel; got torch.float64"):
        decode_attention(torch.randn(2, 3, 1, 16, dtype=torch.float64), k, k)
    with pytest.raises(ValueError, match=r"keys \(2, 3, 5, 16\) / values \(2, 3, 4, 16\)"):
        decode_attention(torch.randn(2, 3, 1, 16), k, k[:, :, :4])


def model_decode_functions(model):
    from bar_lightning.models.sampler import _DECODE_FUNCTIONS

    return _DECODE_FUNCTIONS.get(model)


def test_generate_takes_one_settings_object_or_its_keyword_values():
    model = tiny_generator()
    settings = SamplingSettings.checked(model, guidance_scale=3.0, temperature=1.0, tokens_allocation=[1, 3])
    assert settings == SamplingSettings(3.0, 1.0, (1, 3), False, "fp32") and settings.use_cfg
    by_object = model.generate(torch.tensor([0, 4]), settings, generator=torch.Generator().manual_seed(5))
    by_values = model.generate(torch.tensor([0, 4]), guidance_scale=3.0, temperature=1.0, tokens_allocation=[1, 3],
                               generator=torch.Generator().manual_seed(5))
    assert torch.equal(by_object, by_values)
    with pytest.raises(TypeError, match="settings or keyword values, not both"):
        model.generate(torch.tensor([0]), settings, guidance_scale=2.0)
    # A sampling config or hyper-parameters hold other keys too: only the settings' fields are read.
    from_config = SamplingSettings.from_values(
        model, {"guidance_scale": 3.0, "temperature": 1.0, "tokens_allocation": [1, 3], "cuda_graph": True})
    assert from_config == settings
    with pytest.raises(ValueError, match="precision='fp16' is not a sampling precision"):
        SamplingSettings.checked(model, precision="fp16")
    with pytest.raises(ValueError, match="tokens_allocation"):
        SamplingSettings.checked(model, tokens_allocation=[1, 1])  # 2 of the step's 4 bits


def test_the_guidance_schedule_of_the_settings_is_the_one_the_loop_uses(monkeypatch):
    model = tiny_generator()
    settings = SamplingSettings.checked(model, guidance_scale=4.0, temperature=0.0, tokens_allocation=[4])
    recorded = record_sampling_steps(monkeypatch, model)
    model.generate(torch.tensor([0]), settings)
    assert recorded["step_cfg_scale"] == [settings.guidance_at(step, model.num_steps) for step in range(model.num_steps)]
    assert SamplingSettings.checked(model, guidance_scale=0.5).guidance_at(7, 16) == 1.0  # no CFG below 1


def test_every_registered_head_has_the_head_interface():
    import inspect

    from bar_lightning.models.heads import GENERATOR_HEADS, build_generator_head

    interface = ("build", "forward", "sample", "logits", "sampling_allocation", "check_tokens_allocation", "init_non_persistent_buffers",
                 "zero_init_modulations", "decode_logits", "aligned_mlp_weights")
    for name, head_class in GENERATOR_HEADS.items():
        assert all(callable(getattr(head_class, method, None)) for method in interface), name
        assert "align_matmuls" in inspect.signature(head_class.forward).parameters, name
        head = build_generator_head(name, bits_per_step=4, width=24, num_layers=1)
        loss = head(torch.randint(0, 2, (6, 4)), torch.randn(6, 1, 24), torch.Generator().manual_seed(0),
                    align_matmuls=False)
        assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"head='conv' is not a head; use one of \['linear', 'mbm'\]"):
        build_generator_head("conv", bits_per_step=4, width=24, num_layers=1)
