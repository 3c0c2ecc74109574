"""Float32 single-query attention over a KV cache, as one Triton kernel (the decode step of the sampler).

Why hand-written: PyTorch's SDPA has no float32 decode kernel (its float32 memory-efficient kernel pads the one query
to a 64-row tile and ran 3-5x over the bandwidth floor on the H200), the flash / cuDNN kernels take 16-bit inputs
only, and a compiled two-reduction version (since retired) read the values along a strided dimension at ~3x the
floor. Here one program per (row, head) streams its keys and values once, in blocks of cache positions, with an
online softmax in float32 (no TF32: the products are float32 multiply-adds).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; without it, `compile_decode` keeps SDPA.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_POSITIONS = 64  # cache positions per iteration of a program (64 x head_dim floats of K, then of V)


def has_triton() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, length, scale_log2,
        q_stride_row, q_stride_head, q_stride_dim,
        k_stride_row, k_stride_head, k_stride_pos, k_stride_dim,
        v_stride_row, v_stride_head, v_stride_pos, v_stride_dim,
        out_stride_row, out_stride_head, out_stride_dim,
        HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        dims = tl.arange(0, BLOCK_DIM)  # BLOCK_DIM: HEAD_DIM rounded up to a power of two (Triton's block sizes)
        in_head = dims < HEAD_DIM
        positions = tl.arange(0, BLOCK)
        # The scale is folded with log2(e) so the softmax can use exp2; scores are then in log2 units.
        query = tl.load(q_ptr + row * q_stride_row + head * q_stride_head + dims * q_stride_dim, mask=in_head, other=0.0)
        query = query * scale_log2
        k_base = k_ptr + row * k_stride_row + head * k_stride_head
        v_base = v_ptr + row * v_stride_row + head * v_stride_head
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        accumulated = tl.zeros((BLOCK_DIM,), tl.float32)
        for block in range(0, tl.cdiv(length, BLOCK)):
            position = block * BLOCK + positions
            valid = position < length
            keys = tl.load(
                k_base + position[:, None] * k_stride_pos + dims[None, :] * k_stride_dim,
                mask=valid[:, None] & in_head[None, :], other=0.0,
            )  # [BLOCK, BLOCK_DIM]
            scores = tl.sum(keys * query[None, :], axis=1)  # [BLOCK]
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            weights = tl.exp2(scores - new_max)  # [BLOCK], 0 at invalid positions
            correction = tl.exp2(running_max - new_max)  # 0 on the first block (running_max = -inf)
            values = tl.load(
                v_base + position[:, None] * v_stride_pos + dims[None, :] * v_stride_dim,
                mask=valid[:, None] & in_head[None, :], other=0.0,
            )  # [BLOCK, BLOCK_DIM]
            running_sum = running_sum * correction + tl.sum(weights, axis=0)
            accumulated = accumulated * correction + tl.sum(weights[:, None] * values, axis=0)
            running_max = new_max
        out = accumulated / running_sum
        tl.store(out_ptr + row * out_stride_row + head * out_stride_head + dims * out_stride_dim, out, mask=in_head)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of `q [R, H, 1, hd]` over `k, v [R, H, L, hd]` (any strides, e.g. views of a KV cache).

    The same function as `F.scaled_dot_product_attention` with one query (tested against it in float64).

    Float32 only (the sampler's default precision), any head dimension. Launch parameters depend only on the shapes
    and `L`, so the call can be captured in a CUDA graph.
    """
    rows, heads, queries, head_dim = q.shape
    length = k.shape[2]
    if queries != 1:
        raise ValueError(f"decode_attention takes one query per row and head, got {queries}")
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        raise ValueError(f"decode_attention is the float32 kernel; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != (rows, heads, length, head_dim) or v.shape != k.shape:
        raise ValueError(f"keys {tuple(k.shape)} / values {tuple(v.shape)} do not match queries {tuple(q.shape)}")
    if length == 0:
        raise ValueError("decode_attention over an empty cache")
    if triton is None:
        raise RuntimeError("decode_attention needs Triton (installed with CUDA builds of PyTorch)")
    out = torch.empty((rows, heads, 1, head_dim), dtype=torch.float32, device=q.device)
    scale_log2 = head_dim**-0.5 * 1.4426950408889634  # 1 / sqrt(hd) * log2(e)
    _decode_attention_kernel[(rows, heads)](
        q, k, v, out, length, scale_log2,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        HEAD_DIM=head_dim, BLOCK_DIM=triton.next_power_of_2(head_dim), BLOCK=BLOCK_POSITIONS, num_warps=4,
    )
    return out
