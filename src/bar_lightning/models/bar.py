"""BAR: the causal transformer backbone over bit tokens, with an MBM (or linear) head per AR step.

Sequence layout (P = 1 + R prefix positions, L AR steps):
    [cls] [class x R] [step order[0]] ... [step order[L-2]]
Position `P - 1 + j` produces the latent condition of AR step `j` (the step at grid location `order[j]`).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bar_lightning.models.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    init_linear_and_embedding_,
    modulate,
    rope_2d_tables,
    swiglu_hidden_width,
    zero_init_,
)
from bar_lightning.models.linear_head import LinearSoftmaxHead
from bar_lightning.models.mbm_head import MaskBitModelingHead, validate_tokens_allocation
from bar_lightning.ops import decode_attention as decode_attention_kernel

NULL_LABEL = -1  # class label meaning "no class" (the CFG null condition / dropped label)
MASK_ID = 2
FIRST_CLASS_ROW = 3  # rows 0..2 of the class table exist in released checkpoints but are never read


class RotaryRows(NamedTuple):
    """Cos/sin tables gathered for one forward: queries `[B, 2, 1, N, hd]` (own / target half), keys `[B, 1, N, hd]`."""

    q_cos: torch.Tensor
    q_sin: torch.Tensor
    k_cos: torch.Tensor
    k_sin: torch.Tensor


class StaticKVCache:
    """Preallocated keys/values for every layer, filled left to right; `write` returns `[B, H, length, hd]` views.

    `values_length_major=True` stores the values as `[layers, B, H, hd, max_len]` (the returned views are transposes
    with the length dimension contiguous), so that a single-query attention written as a sum over the cache length
    reduces over contiguous memory (`fused_decode_attention`). SDPA still accepts these views, through its general
    kernel.
    """

    def __init__(self, *, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, values_length_major: bool = False) -> None:
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values_length_major = values_length_major
        value_shape = (num_layers, batch, num_heads, head_dim, max_len) if values_length_major else shape
        self.values = torch.empty(value_shape, dtype=dtype, device=device)
        self.length = 0  # positions already written (shared by all layers)
        self.max_len = max_len

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of `layer` and return all keys/values written so far."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[layer, :, :, self.length : end] = keys
        if self.values_length_major:
            self.values[layer, :, :, :, self.length : end] = values.transpose(-1, -2)
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :, :end].transpose(-1, -2)
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions


class Attention(nn.Module):
    """Causal self-attention with QK RMSNorm and target-aware 2-D RoPE (half of the query heads)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"hidden_size={width} must be divisible by num_heads={num_heads}")
        if num_heads % 2 != 0:
            raise ValueError(f"target-aware RoPE splits the query heads in two halves; num_heads={num_heads} is odd")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor, rope: RotaryRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values `[B, H, N, hd]`, normalised and rotated."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        # First half of the query heads rotate by their own location, second half by the location predicted next.
        q = apply_rope(q.unflatten(1, (2, self.num_heads // 2)), rope.q_cos, rope.q_sin).flatten(1, 2)
        k = apply_rope(k, rope.k_cos, rope.k_sin)
        return q, k, v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """`[B, H, N, hd]` attention result -> `[B, N, D]` after the output projection."""
        batch, _, length, _ = attended.shape
        out = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        # As upstream, attention-probability dropout is not applied; only the output projection drops.
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (6 vectors per position)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden_width(width), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention_inputs(
        self, x: torch.Tensor, condition: torch.Tensor, rope: RotaryRows
    ) -> tuple[torch.Tensor, ...]:
        """First half of the block, up to attention: `(q, k, v, gate1, shift2, scale2, gate2)`.

        Split from `finish` so that the single-position decode step can run both halves compiled while the
        attention over a growing KV cache (a new length every step) stays outside the compiled code.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(condition).chunk(6, dim=-1)
        q, k, v = self.attn.project(modulate(self.norm1(x), shift1, scale1), rope)
        return q, k, v, gate1, shift2, scale2, gate2

    def finish(
        self,
        x: torch.Tensor,
        attended: torch.Tensor,
        gate1: torch.Tensor,
        shift2: torch.Tensor,
        scale2: torch.Tensor,
        gate2: torch.Tensor,
    ) -> torch.Tensor:
        """Second half: output projection, both residual branches and the MLP."""
        x = x + gate1 * self.attn.output(attended)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def forward(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        rope: RotaryRows,
        attn_mask: torch.Tensor | None,
        kv_cache: StaticKVCache | None = None,
        layer: int = 0,
        is_causal: bool = False,
    ) -> torch.Tensor:
        q, k, v, *modulation = self.attention_inputs(x, condition, rope)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)  # [B, H, cached + N, hd]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, N, hd]
        return self.finish(x, attended, *modulation)


class BARGenerator(nn.Module):
    """Class-conditional masked Bit AutoRegressive generator.

    Args:
        hidden_size: backbone width D.
        num_layers: backbone depth.
        num_heads: attention heads (even: half of them rotate queries by the target location).
        num_tokens: tokenizer tokens per image L0 (a square grid unless `latent_height/width` are given).
        bits_per_token: bits per tokenizer token Cb (FSQ channels).
        num_classes: number of classes K; the class table has K + 4 rows (class c -> row c + 3, null -> K + 3).
        patch_size: p; one AR step covers p x p neighbouring tokens (C = Cb * p^2 bits).
        repeat_class_condition: R, how many times the class embedding is repeated in the prefix.
        dropout: dropout after attention projection and inside the MLPs (0.2 for BAR-L).
        head: "mbm" (Masked Bit Modeling, the paper's head) or "linear" (softmax over 2^C codes, the baseline).
        head_width: width W of the latent condition and of the MBM head.
        head_layers: residual blocks of the MBM head.
        use_checkpoint: activation checkpointing of every backbone block during training.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_tokens: int,
        bits_per_token: int,
        num_classes: int,
        patch_size: int = 1,
        latent_height: int | None = None,
        latent_width: int | None = None,
        repeat_class_condition: int = 32,
        dropout: float = 0.0,
        head: str = "mbm",
        head_width: int = 2048,
        head_layers: int = 3,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if latent_height is None or latent_width is None:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"num_tokens={num_tokens} is not a square; give latent_height and latent_width")
            latent_height = latent_width = side
        if latent_height * latent_width != num_tokens:
            raise ValueError(f"latent_height*latent_width={latent_height * latent_width} != num_tokens={num_tokens}")
        if latent_height % patch_size or latent_width % patch_size:
            raise ValueError(f"the {latent_height}x{latent_width} token grid is not divisible by patch_size={patch_size}")
        if latent_height != latent_width:
            raise ValueError("2-D RoPE over the AR-step grid needs a square token grid")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.bits_per_token = bits_per_token
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.latent_height = latent_height
        self.latent_width = latent_width
        self.bits_per_step = bits_per_token * patch_size**2  # C
        self.num_steps = num_tokens // patch_size**2  # L
        self.step_grid_side = latent_height // patch_size  # S
        self.repeat_class_condition = repeat_class_condition
        self.prefix_len = 1 + repeat_class_condition  # P
        self.null_class_row = num_classes + FIRST_CLASS_ROW
        self.use_checkpoint = use_checkpoint
        self.head_type = head
        width, steps = hidden_size, self.num_steps
        bit_embed_width = -(-width // self.bits_per_step)  # ceil(D / C)

        # Upstream table sizes (L + 128 / L + 100 rows) are kept so released checkpoints load; extra rows are unused.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, steps + 128, width))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, steps + 128, width))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, steps + 100, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, dropout) for _ in range(num_layers))
        self.norm = RMSNorm(width)
        if head == "mbm":
            self.lm_head: nn.Module = MaskBitModelingHead(
                bits_per_step=self.bits_per_step, width=head_width, num_layers=head_layers
            )
        elif head == "linear":
            self.lm_head = LinearSoftmaxHead(bits_per_step=self.bits_per_step, width=head_width)
        else:
            raise ValueError(f"head={head!r} is not a head; use 'mbm' or 'linear'")
        self.head_width = head_width
        self.latent_condition_proj = nn.Linear(width, head_width)
        self.embeddings = nn.Embedding(num_classes + FIRST_CLASS_ROW + 1, width)
        self.input_embeddings = nn.Embedding(3, bit_embed_width)  # rows: bit 0, bit 1, mask
        self.input_merge = nn.Linear(self.bits_per_step * bit_embed_width, width)

        self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # [P + L, hd]
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_non_persistent_buffers()
        self.reset_parameters()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute buffers that are not saved: needed after building on the meta device and `to_empty`."""
        device = self.cls_token.device
        rope_cos, rope_sin = rope_2d_tables(self.hidden_size // self.num_heads, self.step_grid_side, self.prefix_len)
        self.rope_cos, self.rope_sin = rope_cos.to(device), rope_sin.to(device)
        if isinstance(self.lm_head, LinearSoftmaxHead):
            self.lm_head.bit_weights = 2 ** torch.arange(self.bits_per_step, device=device)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        self.apply(init_linear_and_embedding_)
        for table in (self.cls_token, self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, mean=0.0, std=0.02)
        for block in self.blocks:
            zero_init_(block.adaLN_modulation[-1])
        if isinstance(self.lm_head, MaskBitModelingHead):
            for block in self.lm_head.transformer:
                zero_init_(block.adaLN_modulation[-1])
            zero_init_(self.lm_head.adaln_before_head.adaLN_modulation[-1])

    # ------------------------------------------------------------------ layout helpers
    def tokens_to_steps(self, bits: torch.Tensor) -> torch.Tensor:
        """Flat tokenizer bits `[B, L0 * Cb]` -> AR-step bits `[B, L, C]` (p x p patches, bits ordered (i, j, n))."""
        p, side = self.patch_size, self.step_grid_side
        grid = bits.reshape(bits.shape[0], side, p, side, p, self.bits_per_token)  # [B, h, i, w, j, n]
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(bits.shape[0], self.num_steps, self.bits_per_step)

    def steps_to_tokens(self, steps: torch.Tensor) -> torch.Tensor:
        """Inverse of `tokens_to_steps`: `[B, L, C]` -> flat `[B, L0 * Cb]`."""
        p, side = self.patch_size, self.step_grid_side
        grid = steps.reshape(steps.shape[0], side, side, p, p, self.bits_per_token)  # [B, h, w, i, j, n]
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(steps.shape[0], -1)

    def class_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """Raw labels (0..K-1, or NULL_LABEL) -> rows of the class table."""
        return torch.where(labels == NULL_LABEL, self.null_class_row, labels + FIRST_CLASS_ROW)

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        bad = (labels < NULL_LABEL) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"class label {int(labels[bad][0])} is out of range; expected 0..{self.num_classes - 1} "
                f"(or {NULL_LABEL} for the null class)"
            )

    def check_bits(self, bits: torch.Tensor) -> None:
        expected = self.num_tokens * self.bits_per_token
        if bits.dim() != 2 or bits.shape[1] != expected:
            raise ValueError(
                f"bits must have shape [B, {expected}] ({self.num_tokens} tokens x {self.bits_per_token} bits), "
                f"got {tuple(bits.shape)}"
            )
        bad = (bits != 0) & (bits != 1)
        if bool(bad.any()):
            raise ValueError(
                f"bits must be 0 or 1; found {bits[bad][0].item()} (expected 0 or 1: packed codes or mask ids are "
                "not accepted)"
            )

    def raster_orders(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.num_steps, device=device).unsqueeze(0).expand(batch, -1)

    def sample_orders(
        self, batch: int, random_ratio: float, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample generation orders `[B, L]`: a random permutation with probability `random_ratio`, else raster.

        Both candidates are always drawn (as upstream) so the random stream does not depend on the ratio.
        """
        random_orders = torch.rand(batch, self.num_steps, device=device, generator=generator).argsort(dim=-1)
        use_random = torch.rand(batch, 1, device=device, generator=generator) < random_ratio
        return torch.where(use_random, random_orders, self.raster_orders(batch, device))

    # ------------------------------------------------------------------ backbone
    def embed_steps(self, step_bits: torch.Tensor) -> torch.Tensor:
        """`[B, n, C]` bits in {0, 1, 2} -> `[B, n, D]`: per-bit embeddings concatenated in bit order, merged."""
        return self.input_merge(self.input_embeddings(step_bits).flatten(2))

    def rotary_rows(self, own_rows: torch.Tensor, target_rows: torch.Tensor) -> RotaryRows:
        """Gather RoPE tables for table rows `own_rows` / `target_rows` `[B, N]`."""
        own_cos, own_sin = self.rope_cos[own_rows], self.rope_sin[own_rows]  # [B, N, hd]
        tgt_cos, tgt_sin = self.rope_cos[target_rows], self.rope_sin[target_rows]
        return RotaryRows(
            q_cos=torch.stack([own_cos, tgt_cos], dim=1).unsqueeze(2),  # [B, 2, 1, N, hd]
            q_sin=torch.stack([own_sin, tgt_sin], dim=1).unsqueeze(2),
            k_cos=own_cos.unsqueeze(1),  # [B, 1, N, hd]
            k_sin=own_sin.unsqueeze(1),
        )

    def run_blocks(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        rope: RotaryRows,
        causal: bool,
        kv_cache: StaticKVCache | None = None,
    ) -> torch.Tensor:
        """Run all blocks; `causal` masks the new positions among themselves (earlier cached ones are visible)."""
        attn_mask, is_causal = None, False
        if causal and x.shape[1] > 1:
            if x.device.type == "cpu":
                # The official additive float mask: on CPU it keeps SDPA on the same kernel, hence bit-exact parity.
                length = x.shape[1]
                attn_mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
            else:
                is_causal = True  # lets SDPA use flash / memory-efficient kernels on GPU
        for layer, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training and kv_cache is None:
                x = checkpoint(block, x, condition, rope, attn_mask, None, layer, is_causal, use_reentrant=False)
            else:
                x = block(x, condition, rope, attn_mask, kv_cache, layer, is_causal)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return x

    def prefix(self, class_rows: torch.Tensor, first_targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings, adaLN conditions and RoPE rows of the P prefix positions.

        `first_targets [B]` is the grid location of the first AR step: every prefix position is told about it.
        """
        batch, prefix = class_rows.shape[0], self.prefix_len
        class_embed = self.embeddings(class_rows)  # [B, D]
        x = torch.cat(
            [self.cls_token.expand(batch, -1, -1), class_embed.unsqueeze(1).expand(-1, self.repeat_class_condition, -1)],
            dim=1,
        )  # [B, P, D]
        x = x + self.pos_embed[:, :prefix]
        x = x + self.target_aware_pos_embed[0, prefix + first_targets].unsqueeze(1)
        condition = class_embed.unsqueeze(1) + self.timesteps_embeddings[:, :prefix]  # [B, P, D]
        own_rows = torch.arange(prefix, device=x.device).expand(batch, -1)
        target_rows = (prefix + first_targets).unsqueeze(1).expand(-1, prefix)
        return x, condition, own_rows, target_rows

    def latent_conditions(self, bits: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced latent conditions `[B, L + 1, W]`; index j conditions the j-th generated step.

        Args:
            bits: flat tokenizer bits `[B, L0 * Cb]` in raster layout.
            labels: raw class ids `[B]` (NULL_LABEL for the null class).
            orders: generation orders `[B, L]` (raster if None).
        """
        batch = bits.shape[0]
        if orders is None:
            orders = self.raster_orders(batch, bits.device)
        prefix, steps = self.prefix_len, self.num_steps
        class_rows = self.class_rows(labels)
        step_bits = self.tokens_to_steps(bits).gather(1, orders.unsqueeze(-1).expand(-1, -1, self.bits_per_step))
        targets = torch.cat([orders[:, 1:], orders[:, -1:]], dim=1)  # location each step position predicts next

        x_prefix, c_prefix, own_prefix, target_prefix = self.prefix(class_rows, orders[:, 0])
        x_steps = self.embed_steps(step_bits)  # [B, L, D]
        x_steps = x_steps + self.pos_embed[0, prefix + orders]
        x_steps = x_steps + self.target_aware_pos_embed[0, prefix + targets]
        # The last step position only predicts beyond the image; it is dropped (length P + L - 1 suffices).
        x = torch.cat([x_prefix, x_steps], dim=1)  # [B, P + L, D]
        condition = torch.cat(
            [c_prefix, self.embeddings(class_rows).unsqueeze(1) + self.timesteps_embeddings[:, prefix : prefix + steps]],
            dim=1,
        )
        rope = self.rotary_rows(
            torch.cat([own_prefix, prefix + orders], dim=1), torch.cat([target_prefix, prefix + targets], dim=1)
        )
        x = self.run_blocks(x, condition, rope, causal=True)
        return self.latent_condition_proj(self.norm(x[:, prefix - 1 :]))  # [B, L + 1, W]

    def forward(
        self,
        bits: torch.Tensor,
        labels: torch.Tensor,
        orders: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        align_head_matmuls: bool = False,
    ) -> torch.Tensor:
        """Training loss of the head on every AR step (teacher forcing).

        `align_head_matmuls`: run the MBM head's MLPs with their hidden width padded to a multiple of 8 (5461 ->
        5464 in the released models): the same loss, with aligned matrix products on GPUs (ignored by the linear
        head).
        """
        if orders is None:
            orders = self.raster_orders(bits.shape[0], bits.device)
        latents = self.latent_conditions(bits, labels, orders)[:, :-1]  # [B, L, W]
        step_bits = self.tokens_to_steps(bits).gather(1, orders.unsqueeze(-1).expand(-1, -1, self.bits_per_step))
        step_bits, latents = step_bits.reshape(-1, self.bits_per_step), latents.reshape(-1, 1, self.head_width)
        # Through the head's forward (its loss), not `.loss`: under FSDP only a unit's forward gathers its weights.
        if isinstance(self.lm_head, MaskBitModelingHead):
            return self.lm_head(step_bits, latents, generator, align_matmuls=align_head_matmuls)
        return self.lm_head(step_bits, latents, generator)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def guidance_ramp(guidance_scale: float, step: int, num_steps: int) -> float:
        """CFG scale at AR step `step`: rises linearly from 1 (first step) towards `guidance_scale`."""
        if guidance_scale <= 1.0:
            return 1.0
        return 1.0 + (guidance_scale - 1.0) * (step / num_steps)

    def compile_decode(
        self, enabled: bool = True, *, fp32_attention: str | None = None, align_head: bool = True,
        values_length_major: bool = False,
    ) -> None:
        """Compile the per-step work of `generate` (both halves of every block and the MBM head) with torch.compile.

        Only the shapes of one decode step are compiled (static, one compilation serves all blocks). This fuses the
        many small element-wise kernels (norms, modulation, RoPE, gates, SiLU) between the matrix products.

        Args:
            fp32_attention: the float32 attention of the new position over the cache (bf16 sampling keeps SDPA,
                which dispatches to cuDNN). "triton" (the default where Triton is installed): one kernel with an
                online softmax that streams K and V once (`bar_lightning.ops.decode_attention`), at the bandwidth
                floor on an H200; "reductions" (the default without Triton): two compiled reductions with a dynamic
                cache length, ~3x the floor; "sdpa": PyTorch's SDPA, whose float32 kernel pads the single query to
                a 64-row tile (5x the floor; docs/benchmarks.md, Sampling, items 4 and 6).
            align_head: run the MBM head's MLPs (odd hidden width 5461) on zero-padded aligned weight copies made
                once per batch (see `SwiGLU.aligned_weights`).
            values_length_major: with "reductions", store the cached values length-major so that both reductions
                read contiguous memory (see `StaticKVCache`).
        """
        if not enabled:
            if _DECODE_FUNCTIONS.pop(self, None) is not None:
                drop_captured_generations(self)
            return
        if fp32_attention is None:
            fp32_attention = "triton" if decode_attention_kernel.has_triton() else "reductions"
        if fp32_attention not in FP32_DECODE_ATTENTION:
            raise ValueError(
                f"fp32_attention={fp32_attention!r} is not a decode attention; use one of {FP32_DECODE_ATTENTION}"
            )
        if fp32_attention == "triton" and not decode_attention_kernel.has_triton():
            raise ValueError('fp32_attention="triton" needs Triton (it comes with CUDA builds of PyTorch); '
                             'use "reductions"')
        values_length_major = values_length_major and fp32_attention == "reductions"
        options = (fp32_attention, align_head, values_length_major)
        current = _DECODE_FUNCTIONS.get(self)
        if current is not None and (current.fp32_attention_name, current.align_head,
                                    current.values_length_major) == options:
            return  # already compiled with these options: keep the compiled functions and the captured graphs
        compiled_head = None
        if isinstance(self.lm_head, MaskBitModelingHead):
            compiled_head = torch.compile(self.lm_head.logits, dynamic=False)
        attention = None  # "sdpa"
        if fp32_attention == "reductions":
            attention = torch.compile(fused_decode_attention, dynamic=True)
        elif fp32_attention == "triton":
            attention = decode_attention_kernel.decode_attention
        _DECODE_FUNCTIONS[self] = DecodeFunctions(
            attention_inputs=torch.compile(Block.attention_inputs, dynamic=False),
            finish=torch.compile(Block.finish, dynamic=False),
            head_logits=compiled_head,
            fp32_attention=attention,
            fp32_attention_name=fp32_attention,
            align_head=align_head,
            values_length_major=values_length_major,
        )
        drop_captured_generations(self)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Moving or casting the weights invalidates every captured CUDA graph (they hold the old addresses).
        drop_captured_generations(self)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        tokens_allocation: Sequence[int] | None = None,
        random_order: bool = False,
        generator: torch.Generator | None = None,
        trace: dict[str, list] | None = None,
        cuda_graph: bool | None = None,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Sample images' bits for class `labels [B]`.

        CFG is on iff `guidance_scale > 1`: the backbone then runs on a doubled batch (class rows, then null rows)
        and the head combines logits with the linear ramp `1 + (g - 1) * k / L`. Uses a preallocated KV cache.
        If `trace` is a dict, per-step latent conditions, CFG scales and bits are appended to it (for debugging).

        Args:
            cuda_graph: capture the whole sampling loop in one CUDA graph and replay it (default: on for CUDA
                inputs without `trace`). The first call for a new (batch, settings) pair runs eagerly once, then
                captures; later calls replay. Same random stream and same bits as the eager loop.
            precision: "fp32" (float32 weights and activations; TF32 matmuls if enabled, as the official sampler)
                or "bf16" (bf16 autocast with a bf16 KV cache: faster, not bit-identical to fp32).

        Returns:
            `[B, L0 * Cb]` int64 bits in the flat tokenizer layout (raster tokens, bits minor).
        """
        self.check_labels(labels)
        if tokens_allocation is None:
            tokens_allocation = [self.bits_per_step]
        if self.head_type == "mbm":
            tokens_allocation = validate_tokens_allocation(tokens_allocation, self.bits_per_step)
        if precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a sampling precision; use one of {SAMPLING_PRECISIONS}")
        settings = SamplingSettings(
            float(guidance_scale), float(temperature), tuple(int(a) for a in tokens_allocation), bool(random_order),
            precision,
        )
        if cuda_graph is None:
            cuda_graph = labels.is_cuda and trace is None
        if cuda_graph:
            if trace is not None:
                raise ValueError("trace records per-step tensors eagerly; call generate with cuda_graph=False")
            if not labels.is_cuda:
                raise ValueError(f"cuda_graph=True needs CUDA tensors; labels are on {labels.device}")
            if labels.shape[0] == 0:
                return self._generate(labels, settings, generator, None)
            return captured_generation(self, labels.shape[0], settings, labels.device)(labels, generator)
        return self._generate(labels, settings, generator, trace)

    def _generate(
        self,
        labels: torch.Tensor,
        settings: SamplingSettings,
        generator: torch.Generator | None,
        trace: dict[str, list] | None,
    ) -> torch.Tensor:
        """The sampling loop. No host synchronisation (CUDA-graph capturable); labels are assumed valid."""
        decode = _DECODE_FUNCTIONS.get(self, EAGER_DECODE)
        autocast = (
            torch.autocast(labels.device.type, dtype=torch.bfloat16) if settings.precision == "bf16" else nullcontext()
        )
        with autocast:
            return self._generation_loop(labels, settings, generator, trace, decode)

    def _generation_loop(
        self,
        labels: torch.Tensor,
        settings: SamplingSettings,
        generator: torch.Generator | None,
        trace: dict[str, list] | None,
        decode: DecodeFunctions,
    ) -> torch.Tensor:
        batch, device, prefix, steps = labels.shape[0], labels.device, self.prefix_len, self.num_steps
        use_cfg = settings.guidance_scale > 1.0
        class_rows = self.class_rows(labels)
        if settings.random_order:
            orders = self.sample_orders(batch, 1.0, device, generator)
        else:
            orders = self.raster_orders(batch, device)
        if use_cfg:
            class_rows = torch.cat([class_rows, torch.full_like(class_rows, self.null_class_row)])
            orders = torch.cat([orders, orders])
        rows = class_rows.shape[0]
        class_embed = self.embeddings(class_rows)  # [rows, D]
        targets = torch.cat([orders[:, 1:], orders[:, -1:]], dim=1)
        cache_dtype = torch.bfloat16 if settings.precision == "bf16" else self.pos_embed.dtype
        attention = F.scaled_dot_product_attention
        if decode.fp32_attention is not None and cache_dtype == torch.float32 and device.type == "cuda":
            attention = decode.fp32_attention  # a model cast to 16-bit weights keeps SDPA (flash / cuDNN)
        cache = StaticKVCache(
            num_layers=len(self.blocks), batch=rows, num_heads=self.num_heads, max_len=prefix + steps - 1,
            head_dim=self.hidden_size // self.num_heads, dtype=cache_dtype, device=device,
            values_length_major=decode.values_length_major and attention is decode.fp32_attention,
        )

        x, condition, own_rows, target_rows = self.prefix(class_rows, orders[:, 0])
        hidden = self.run_blocks(x, condition, self.rotary_rows(own_rows, target_rows), True, cache)
        latent = self.latent_condition_proj(self.norm(hidden[:, -1:]))  # [rows, 1, W]

        head_logits = decode.head_logits
        if decode.align_head and isinstance(self.lm_head, MaskBitModelingHead):
            aligned = self.lm_head.aligned_mlp_weights()  # once per batch, so it follows the current weights
            if aligned is not None and settings.precision == "bf16":
                # Autocast would re-cast these non-parameter copies at every call; cast them once (same values).
                aligned = [type(weights)(*(t.to(torch.bfloat16) for t in weights)) for weights in aligned]
            if aligned is not None:
                head_logits = partial(head_logits or self.lm_head.logits, aligned_mlps=aligned)

        generated = torch.empty(batch, steps, self.bits_per_step, dtype=torch.long, device=device)
        for step in range(steps):
            scale = self.guidance_ramp(settings.guidance_scale, step, steps)
            step_bits = self.lm_head.sample(
                latent, guidance_scale=scale, temperature=settings.temperature,
                tokens_allocation=settings.tokens_allocation, use_cfg=use_cfg, generator=generator,
                logits_fn=head_logits,
            )  # [B, C]
            generated[:, step] = step_bits
            if trace is not None:
                trace.setdefault("step_conditions", []).append(latent[:, 0].clone())
                trace.setdefault("step_cfg_scale", []).append(scale)
                trace.setdefault("step_bits", []).append(step_bits.clone())
            if step == steps - 1:
                break
            # Feed the step just sampled at sequence position P + step; it predicts the location targets[:, step].
            step_input = torch.cat([step_bits, step_bits]) if use_cfg else step_bits
            location, target = orders[:, step : step + 1], targets[:, step : step + 1]  # [rows, 1]
            x = self.embed_steps(step_input.unsqueeze(1))  # [rows, 1, D]
            x = x + self.pos_embed[0, prefix + location]
            x = x + self.target_aware_pos_embed[0, prefix + target]
            condition = class_embed.unsqueeze(1) + self.timesteps_embeddings[:, prefix + step : prefix + step + 1]
            rope = self.rotary_rows(prefix + location, prefix + target)
            hidden = self.decode_blocks(x, condition, rope, cache, decode, attention)
            latent = self.latent_condition_proj(self.norm(hidden))  # [rows, 1, W]

        # Undo the generation order (step j sits at grid location orders[j]) and the patch grouping.
        in_raster = torch.empty_like(generated)
        in_raster.scatter_(1, orders[:batch].unsqueeze(-1).expand(-1, -1, self.bits_per_step), generated)
        return self.steps_to_tokens(in_raster)

    def decode_blocks(
        self, x: torch.Tensor, condition: torch.Tensor, rope: RotaryRows, cache: StaticKVCache,
        decode: DecodeFunctions, attention: Callable[..., torch.Tensor] = F.scaled_dot_product_attention,
    ) -> torch.Tensor:
        """All blocks for one new position `[rows, 1, D]` against the cache (same arithmetic as `run_blocks`)."""
        for layer, block in enumerate(self.blocks):
            q, k, v, *modulation = decode.attention_inputs(block, x, condition, rope)
            k, v = cache.write(layer, k, v)  # [rows, H, cached + 1, hd]
            attended = attention(q, k, v)  # [rows, H, 1, hd]
            x = decode.finish(block, x, attended, *modulation)
        cache.advance(x.shape[1])
        return x


SAMPLING_PRECISIONS = ("fp32", "bf16")
FP32_DECODE_ATTENTION = ("reductions", "triton", "sdpa")  # see BARGenerator.compile_decode


class SamplingSettings(NamedTuple):
    """Everything besides the labels that a captured sampling graph depends on."""

    guidance_scale: float
    temperature: float
    tokens_allocation: tuple[int, ...]
    random_order: bool
    precision: str


class DecodeFunctions(NamedTuple):
    """The per-step functions of `generate`: the plain methods, or their torch.compile'd versions."""

    attention_inputs: Callable[..., tuple[torch.Tensor, ...]]
    finish: Callable[..., torch.Tensor]
    head_logits: Callable[..., torch.Tensor] | None  # None: the head's own `logits`
    fp32_attention: Callable[..., torch.Tensor] | None  # None: SDPA
    fp32_attention_name: str  # one of FP32_DECODE_ATTENTION
    align_head: bool
    values_length_major: bool  # cache layout for fp32_attention (see StaticKVCache)


def fused_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row `q [R, H, 1, hd]` over `k, v [R, H, L, hd]` as two reductions.

    Compiled, each reduction reads the cache once (memory-bound, as a single-query attention must be).
    """
    scores = (q * k).sum(dim=-1, keepdim=True) * q.shape[-1] ** -0.5  # [R, H, L, 1]
    weights = torch.softmax(scores, dim=2)
    return (weights * v).sum(dim=2, keepdim=True)  # [R, H, 1, hd]


EAGER_DECODE = DecodeFunctions(
    attention_inputs=Block.attention_inputs, finish=Block.finish, head_logits=None, fp32_attention=None,
    fp32_attention_name="sdpa", align_head=False, values_length_major=False,
)
# Per-model state that must not travel with deepcopy/pickle/state_dict: compiled functions and captured graphs.
_DECODE_FUNCTIONS: weakref.WeakKeyDictionary[BARGenerator, DecodeFunctions] = weakref.WeakKeyDictionary()
_CAPTURED: weakref.WeakKeyDictionary[BARGenerator, OrderedDict] = weakref.WeakKeyDictionary()
MAX_CAPTURED_GENERATIONS = 2  # graphs kept per model; each holds a KV cache's worth of device memory


def drop_captured_generations(model: BARGenerator) -> None:
    _CAPTURED.pop(model, None)


class CapturedGeneration:
    """One CUDA graph of the whole sampling loop for a fixed batch size and settings.

    Capture: one eager run on a side stream (cuBLAS handles, compiled kernels, allocator warm), then the loop is
    recorded with a private random generator registered with the graph. Replay: labels are copied in, the private
    generator takes the caller's generator state (or the default CUDA generator's), and the caller's state is
    advanced afterwards exactly as an eager run would, so graph and eager runs draw the same random numbers.
    """

    def __init__(self, model: BARGenerator, batch: int, settings: SamplingSettings, device: torch.device) -> None:
        self.device = device
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(0)
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            model._generate(self.labels, settings, self.rng, None)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.rng)
        with torch.cuda.graph(self.graph):
            self.bits = model._generate(self.labels, settings, self.rng, None)

    def __call__(self, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        self.labels.copy_(labels)
        state = generator.get_state() if generator is not None else torch.cuda.get_rng_state(self.device)
        self.rng.set_state(state)
        self.graph.replay()
        if generator is not None:
            generator.set_state(self.rng.get_state())
        else:
            torch.cuda.set_rng_state(self.rng.get_state(), self.device)
        return self.bits.clone()


def captured_generation(
    model: BARGenerator, batch: int, settings: SamplingSettings, device: torch.device
) -> CapturedGeneration:
    """The captured graph for (batch, settings, device), capturing it on first use (least recently used evicted)."""
    graphs = _CAPTURED.setdefault(model, OrderedDict())
    key = (batch, settings, str(device), _DECODE_FUNCTIONS.get(model) is not None)
    if key not in graphs:
        while len(graphs) >= MAX_CAPTURED_GENERATIONS:
            graphs.popitem(last=False)
        graphs[key] = CapturedGeneration(model, batch, settings, device)
    graphs.move_to_end(key)
    return graphs[key]
