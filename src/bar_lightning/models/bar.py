"""BAR: the causal transformer backbone over bit tokens, with an MBM (or linear) head per AR step.

Sequence layout (P = 1 + R prefix positions, L AR steps):
    [cls] [class x R] [step order[0]] ... [step order[L-2]]
Position `P - 1 + j` produces the latent condition of AR step `j` (the step at grid location `order[j]`).

The network only: its block is in `models/bar_blocks.py`, and sampling (KV cache, compiled decode step, CUDA
graphs) in `models/sampler.py`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from bar_lightning.models.bar_blocks import Block, RotaryRows
from bar_lightning.models.heads import build_generator_head
from bar_lightning.models.layers import (
    RMSNorm,
    init_linear_and_embedding_,
    rope_2d_tables,
    zero_init_,
)

if TYPE_CHECKING:
    from bar_lightning.models.sampler import SamplingSettings, StaticKVCache

NULL_LABEL = -1  # class label meaning "no class" (the CFG null condition / dropped label)
FIRST_CLASS_ROW = 3  # rows 0..2 of the class table exist in released checkpoints but are never read


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
        self.lm_head = build_generator_head(head, bits_per_step=self.bits_per_step, width=head_width,
                                            num_layers=head_layers)
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
        self.lm_head.init_non_persistent_buffers(device)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        self.apply(init_linear_and_embedding_)
        for table in (self.cls_token, self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, mean=0.0, std=0.02)
        for block in self.blocks:
            zero_init_(block.adaLN_modulation[-1])
        self.lm_head.zero_init_modulations()

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
            q_cos=torch.stack([own_cos, tgt_cos], dim=2).unsqueeze(3),  # [B, N, 2, 1, hd]
            q_sin=torch.stack([own_sin, tgt_sin], dim=2).unsqueeze(3),
            k_cos=own_cos.unsqueeze(2),  # [B, N, 1, hd]
            k_sin=own_sin.unsqueeze(2),
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
        return self.lm_head(step_bits, latents, generator, align_matmuls=align_head_matmuls)

    # ------------------------------------------------------------------ sampling (models/sampler.py)
    def compile_decode(self, enabled: bool = True, *, align_head: bool = True) -> None:
        """Compile the per-step work of `generate`; see `bar_lightning.models.sampler.compile_decode`."""
        from bar_lightning.models import sampler

        sampler.compile_decode(self, enabled, align_head=align_head)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Moving or casting the weights invalidates every captured CUDA graph (they hold the old addresses).
        from bar_lightning.models.sampler import drop_captured_generations

        drop_captured_generations(self)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        settings: SamplingSettings | None = None,
        *,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        **values: Any,
    ) -> torch.Tensor:
        """Sample images' bits `[B, L0 * Cb]` for class `labels [B]` with `settings` (a `SamplingSettings`) or the
        keyword `values` it is made of (`guidance_scale`, `temperature`, `tokens_allocation`, `random_order`,
        `precision`); see `bar_lightning.models.sampler.generate`."""
        from bar_lightning.models import sampler

        return sampler.generate(self, labels, settings, generator=generator, cuda_graph=cuda_graph, **values)
