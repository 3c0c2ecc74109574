"""The attention's queries, keys and values are computed position-major (the qkv projection's own layout) and viewed
head-major only for the attention (models/bar_blocks.py, and the tokenizer's pixel decoder and DINO discriminator):
outputs and gradients must equal the head-major formulation's, under bf16 autocast as in training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bar_lightning.models.bar import BARGenerator
from bar_lightning.models.bar_blocks import Attention, RotaryRows
from bar_lightning.models.discriminator import _Block as DinoBlock
from bar_lightning.models.layers import apply_rope
from bar_lightning.models.vit import DecoderBlock, FusedQKVAttention


def head_major_projection(attention: Attention, x: torch.Tensor, rope: RotaryRows):
    """The formulation before the change: split head-major, tables `[B, 2, 1, N, hd]` and `[B, 1, N, hd]`."""
    batch, length, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    qkv = attention.qkv(x).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
    q, k = attention.q_norm(q), attention.k_norm(k)
    q_cos, q_sin = rope.q_cos.permute(0, 2, 3, 1, 4), rope.q_sin.permute(0, 2, 3, 1, 4)  # [B, 2, 1, N, hd]
    q = apply_rope(q.unflatten(1, (2, heads // 2)), q_cos, q_sin).flatten(1, 2)
    k = apply_rope(k, rope.k_cos.transpose(1, 2), rope.k_sin.transpose(1, 2))
    return q, k, v


def test_position_major_projection_equals_the_head_major_one_with_its_gradients():
    torch.manual_seed(0)
    batch, length, width, heads = 3, 11, 64, 4
    head_dim = width // heads
    attention = Attention(width, heads)
    with torch.no_grad():  # non-trivial norm weights, so that their gradients are compared too
        attention.q_norm.weight.uniform_(0.5, 1.5)
        attention.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(batch, length, width)
    angles = torch.rand(batch, length, 2, 1, head_dim) * 6.3
    rope = RotaryRows(angles.cos(), angles.sin(), angles[:, :, 0].cos(), angles[:, :, 0].sin())
    assert rope.q_cos.shape == (batch, length, 2, 1, head_dim) and rope.k_cos.shape == (batch, length, 1, head_dim)

    results = []
    for project in (attention.project, lambda x_, r: head_major_projection(attention, x_, r)):
        attention.zero_grad()
        x_leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = project(x_leaf, rope)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended.float().square().sum().backward()
        grads = [x_leaf.grad] + [p.grad.clone() for p in attention.parameters() if p.grad is not None]
        results.append(((q, k, v), attended, grads))

    (ours, ours_attended, ours_grads), (reference, reference_attended, reference_grads) = results
    for tensor, expected in zip(ours, reference):
        assert tensor.shape == (batch, heads, length, head_dim)
        assert torch.equal(tensor, expected)
    assert torch.equal(ours_attended, reference_attended)
    assert len(ours_grads) == len(reference_grads) == 5  # x, the qkv weight and bias, the two norm weights
    # The input's and the projection's gradients are the same elements in the same order; the norm weights' sum
    # over batch, positions and heads, whose order follows the layout: float32 rounding apart, equal.
    for grad, expected in zip(ours_grads[:3], reference_grads[:3]):
        assert torch.equal(grad, expected)
    for grad, expected in zip(ours_grads[3:], reference_grads[3:]):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=0)


def test_generator_gathers_rope_tables_position_major():
    model = BARGenerator(
        hidden_size=32, num_layers=1, num_heads=2, num_tokens=16, bits_per_token=4, num_classes=3,
        repeat_class_condition=2, head_width=16, head_layers=1,
    )
    own_rows = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 9]])  # [B, N]
    target_rows = torch.tensor([[3, 5, 7, 8], [2, 4, 9, 6]])
    rope = model.rotary_rows(own_rows, target_rows)
    head_dim = 32 // 2
    assert rope.q_cos.shape == rope.q_sin.shape == (2, 4, 2, 1, head_dim)  # [B, N, own / target, 1, hd]
    assert rope.k_cos.shape == rope.k_sin.shape == (2, 4, 1, head_dim)
    assert torch.equal(rope.q_cos[:, :, 0, 0], model.rope_cos[own_rows])
    assert torch.equal(rope.q_cos[:, :, 1, 0], model.rope_cos[target_rows])
    assert torch.equal(rope.q_sin[:, :, 1, 0], model.rope_sin[target_rows])
    assert torch.equal(rope.k_cos[:, :, 0], model.rope_cos[own_rows])
    assert torch.equal(rope.k_sin[:, :, 0], model.rope_sin[own_rows])


def head_major_attention(qkv_linear: torch.nn.Linear, proj: torch.nn.Linear, heads: int, x: torch.Tensor):
    """Plain multi-head attention with the head-major split, written out as the reference."""
    batch, length, width = x.shape
    qkv = qkv_linear(x).reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(*qkv.unbind(0))  # [B, heads, L, head_dim]
    return proj(attended.transpose(1, 2).reshape(batch, length, width))


@pytest.mark.parametrize("family", ["decoder", "discriminator"])
def test_tokenizer_attentions_split_qkv_as_the_head_major_reference(family):
    """The pixel decoder's and the DINO discriminator's attention split their projection position-major too: the same
    queries, keys and values in the same heads, so outputs and every gradient equal the head-major reference's."""
    torch.manual_seed(1)
    width, heads = 48, 4
    if family == "decoder":
        attention = DecoderBlock(width, heads, mlp_ratio=2.0).attn
    else:
        attention = DinoBlock(width=width, num_heads=heads, mlp_ratio=2.0, norm_eps=1e-6).attn
    assert isinstance(attention, FusedQKVAttention)  # one module for both families
    x = torch.randn(2, 7, width)
    results = []
    for forward in (attention, lambda x_: head_major_attention(attention.qkv, attention.proj, heads, x_)):
        attention.zero_grad()
        x_leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x_leaf)
        out.float().square().sum().backward()
        results.append((out, [x_leaf.grad] + [p.grad.clone() for p in attention.parameters()]))
    (out, grads), (expected_out, expected_grads) = results
    assert out.shape == (2, 7, width)
    assert torch.equal(out, expected_out)
    assert len(grads) == len(expected_grads) == 5  # x, the qkv and output projections' weights and biases
    for grad, expected in zip(grads, expected_grads):
        assert torch.equal(grad, expected)
