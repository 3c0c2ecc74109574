"""Sampling from a BAR generator: the KV-cached loop over the AR steps with classifier-free guidance, its compiled
decode step, and one CUDA graph of the whole loop per (batch, settings). Kept apart from the network
(`models/bar.py`): the network defines the function, this module runs it fast.

`BARGenerator.generate` and `BARGenerator.compile_decode` call `generate` and `compile_decode` here.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from bar_lightning.models.bar_blocks import Block, RotaryRows
from bar_lightning.ops import decode_attention as decode_attention_kernel

if TYPE_CHECKING:
    from bar_lightning.models.bar import BARGenerator


class StaticKVCache:
    """Preallocated keys/values for every layer, filled left to right; `write` returns `[B, H, length, hd]` views."""

    def __init__(self, *, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions already written (shared by all layers)
        self.max_len = max_len

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of `layer` and return all keys/values written so far."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions


class SamplingSettings(NamedTuple):
    """How to sample, besides the labels: one object, validated once where it is made (`SamplingSettings.checked`
    for keyword values, `evaluate.py` from its validated config), then trusted by the loop and used as the key of
    the captured CUDA graphs.

    The schedules across the AR steps live here: classifier-free guidance ramps linearly from 1 at the first step
    towards `guidance_scale` (`guidance_at`); the Gumbel temperature `temperature` is annealed inside each step by
    the head (`MaskBitModelingHead.sample`: iteration i of n uses `T * (1 - i / n)`).
    """

    guidance_scale: float
    temperature: float
    tokens_allocation: tuple[int, ...]
    random_order: bool = False
    precision: str = "fp32"

    @classmethod
    def checked(
        cls,
        model: BARGenerator,
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        tokens_allocation: Sequence[int] | None = None,
        random_order: bool = False,
        precision: str = "fp32",
    ) -> SamplingSettings:
        """Settings for `model` from plain values: `tokens_allocation` checked by the model's head (default: every
        bit of a step at once), `precision` one of SAMPLING_PRECISIONS."""
        if tokens_allocation is None:
            tokens_allocation = [model.bits_per_step]
        tokens_allocation = model.lm_head.check_tokens_allocation(list(tokens_allocation))
        if precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a sampling precision; use one of {SAMPLING_PRECISIONS}")
        return cls(float(guidance_scale), float(temperature), tuple(int(a) for a in tokens_allocation),
                   bool(random_order), precision)

    @classmethod
    def from_values(cls, model: BARGenerator, values: Mapping[str, Any], **overrides: Any) -> SamplingSettings:
        """`checked` settings from a mapping that holds them among other keys (a `sampling` config or a
        checkpoint's hyper-parameters): every field found there is taken, so a new field needs no change in the callers."""
        given = {name: values[name] for name in cls._fields if name in values}
        return cls.checked(model, **{**given, **overrides})

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance runs (on a doubled batch) iff the scale is above 1."""
        return self.guidance_scale > 1.0

    def guidance_at(self, step: int, num_steps: int) -> float:
        """CFG scale at AR step `step`: rises linearly from 1 (first step) towards `guidance_scale`."""
        if self.guidance_scale <= 1.0:
            return 1.0
        return 1.0 + (self.guidance_scale - 1.0) * (step / num_steps)


def compile_decode(model: BARGenerator, enabled: bool = True, *, align_head: bool = True) -> None:
    """Compile the per-step work of `generate` (both halves of every block and the MBM head) with torch.compile.

    Only the shapes of one decode step are compiled (static, one compilation serves all blocks). This fuses the
    many small element-wise kernels (norms, modulation, RoPE, gates, SiLU) between the matrix products.

    The float32 attention of the new position over a CUDA cache runs as one Triton kernel where Triton is installed
    (`bar_lightning.ops.decode_attention`, at the bandwidth floor on an H200): SDPA's float32 kernel pads the single
    query to a 64-row tile (5x the floor; docs/benchmarks.md, Sampling, items 4 and 6). Elsewhere (CPU, no Triton,
    16-bit caches, which SDPA sends to cuDNN) the attention stays SDPA.

    Args:
        align_head: run the MBM head's MLPs (odd hidden width 5461) on zero-padded aligned weight copies made
            once per batch (see `SwiGLU.aligned_weights`).
    """
    if not enabled:
        if _DECODE_FUNCTIONS.pop(model, None) is not None:
            drop_captured_generations(model)
        return
    current = _DECODE_FUNCTIONS.get(model)
    if current is not None and current.align_head == align_head:
        return  # already compiled with these options: keep the compiled functions and the captured graphs
    compiled_head = model.lm_head.decode_logits()
    _DECODE_FUNCTIONS[model] = DecodeFunctions(
        attention_inputs=torch.compile(Block.attention_inputs, dynamic=False),
        finish=torch.compile(Block.finish, dynamic=False),
        head_logits=compiled_head,
        fp32_attention=decode_attention_kernel.decode_attention if decode_attention_kernel.has_triton() else None,
        align_head=align_head,
    )
    drop_captured_generations(model)


@torch.no_grad()
def generate(
    model: BARGenerator,
    labels: torch.Tensor,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    **values: Any,
) -> torch.Tensor:
    """Sample images' bits for class `labels [B]`.

    `settings` says how (a `SamplingSettings`); without it, the settings are made from keyword `values`
    (`guidance_scale`, `temperature`, `tokens_allocation`, `random_order`, `precision`) by
    `SamplingSettings.checked`. CFG is on iff `guidance_scale > 1`: the backbone then runs on a doubled batch (class
    rows, then null rows) and the head combines logits with the linear ramp `1 + (g - 1) * k / L`. Uses a
    preallocated KV cache.

    Args:
        cuda_graph: capture the whole sampling loop in one CUDA graph and replay it (default: on for CUDA
            inputs). The first call for a new (batch, settings) pair runs eagerly once, then captures; later calls
            replay. Same random stream and same bits as the eager loop.
        settings.precision: "fp32" (float32 weights and activations; TF32 matmuls if enabled, as the official
            sampler) or "bf16" (bf16 autocast with a bf16 KV cache: faster, not bit-identical to fp32).

    Returns:
        `[B, L0 * Cb]` int64 bits in the flat tokenizer layout (raster tokens, bits minor).
    """
    model.check_labels(labels)
    if settings is None:
        settings = SamplingSettings.checked(model, **values)
    elif values:
        raise TypeError(f"generate takes settings or keyword values, not both; got settings and {sorted(values)}")
    if cuda_graph is None:
        cuda_graph = labels.is_cuda
    if cuda_graph:
        if not labels.is_cuda:
            raise ValueError(f"cuda_graph=True needs CUDA tensors; labels are on {labels.device}")
        if labels.shape[0] == 0:
            return run_sampling_loop(model, labels, settings, generator)
        return captured_generation(model, labels.shape[0], settings, labels.device)(labels, generator)
    return run_sampling_loop(model, labels, settings, generator)


def run_sampling_loop(
    model: BARGenerator,
    labels: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The sampling loop. No host synchronisation (CUDA-graph capturable); labels are assumed valid."""
    decode = _DECODE_FUNCTIONS.get(model, EAGER_DECODE)
    autocast = (
        torch.autocast(labels.device.type, dtype=torch.bfloat16) if settings.precision == "bf16" else nullcontext()
    )
    with autocast:
        return _generation_loop(model, labels, settings, generator, decode)


def _generation_loop(
    model: BARGenerator,
    labels: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    decode: DecodeFunctions,
) -> torch.Tensor:
    batch, device, prefix, steps = labels.shape[0], labels.device, model.prefix_len, model.num_steps
    use_cfg = settings.use_cfg
    class_rows = model.class_rows(labels)
    if settings.random_order:
        orders = model.sample_orders(batch, 1.0, device, generator)
    else:
        orders = model.raster_orders(batch, device)
    if use_cfg:
        class_rows = torch.cat([class_rows, torch.full_like(class_rows, model.null_class_row)])
        orders = torch.cat([orders, orders])
    rows = class_rows.shape[0]
    class_embed = model.embeddings(class_rows)  # [rows, D]
    targets = torch.cat([orders[:, 1:], orders[:, -1:]], dim=1)
    cache_dtype = torch.bfloat16 if settings.precision == "bf16" else model.pos_embed.dtype
    attention = F.scaled_dot_product_attention
    if decode.fp32_attention is not None and cache_dtype == torch.float32 and device.type == "cuda":
        attention = decode.fp32_attention  # a model cast to 16-bit weights keeps SDPA (flash / cuDNN)
    cache = StaticKVCache(
        num_layers=len(model.blocks), batch=rows, num_heads=model.num_heads, max_len=prefix + steps - 1,
        head_dim=model.hidden_size // model.num_heads, dtype=cache_dtype, device=device,
    )

    x, condition, own_rows, target_rows = model.prefix(class_rows, orders[:, 0])
    hidden = model.run_blocks(x, condition, model.rotary_rows(own_rows, target_rows), True, cache)
    latent = model.latent_condition_proj(model.norm(hidden[:, -1:]))  # [rows, 1, W]

    head_logits = decode.head_logits
    if decode.align_head:
        aligned = model.lm_head.aligned_mlp_weights()  # once per batch, so it follows the current weights
        if aligned is not None and settings.precision == "bf16":
            # Autocast would re-cast these non-parameter copies at every call; cast them once (same values).
            aligned = [type(weights)(*(t.to(torch.bfloat16) for t in weights)) for weights in aligned]
        if aligned is not None:
            head_logits = partial(head_logits or model.lm_head.logits, aligned_mlps=aligned)

    generated = torch.empty(batch, steps, model.bits_per_step, dtype=torch.long, device=device)
    for step in range(steps):
        scale = settings.guidance_at(step, steps)
        step_bits = model.lm_head.sample(
            latent, guidance_scale=scale, temperature=settings.temperature,
            tokens_allocation=settings.tokens_allocation, use_cfg=use_cfg, generator=generator,
            logits_fn=head_logits,
        )  # [B, C]
        generated[:, step] = step_bits
        if step == steps - 1:
            break
        # Feed the step just sampled at sequence position P + step; it predicts the location targets[:, step].
        step_input = torch.cat([step_bits, step_bits]) if use_cfg else step_bits
        location, target = orders[:, step : step + 1], targets[:, step : step + 1]  # [rows, 1]
        x = model.embed_steps(step_input.unsqueeze(1))  # [rows, 1, D]
        x = x + model.pos_embed[0, prefix + location]
        x = x + model.target_aware_pos_embed[0, prefix + target]
        condition = class_embed.unsqueeze(1) + model.timesteps_embeddings[:, prefix + step : prefix + step + 1]
        rope = model.rotary_rows(prefix + location, prefix + target)
        hidden = decode_blocks(model, x, condition, rope, cache, decode, attention)
        latent = model.latent_condition_proj(model.norm(hidden))  # [rows, 1, W]

    # Undo the generation order (step j sits at grid location orders[j]) and the patch grouping.
    in_raster = torch.empty_like(generated)
    in_raster.scatter_(1, orders[:batch].unsqueeze(-1).expand(-1, -1, model.bits_per_step), generated)
    return model.steps_to_tokens(in_raster)


def decode_blocks(
    model, x: torch.Tensor, condition: torch.Tensor, rope: RotaryRows, cache: StaticKVCache,
    decode: DecodeFunctions, attention: Callable[..., torch.Tensor] = F.scaled_dot_product_attention,
) -> torch.Tensor:
    """All blocks for one new position `[rows, 1, D]` against the cache (same arithmetic as `run_blocks`)."""
    for layer, block in enumerate(model.blocks):
        q, k, v, *modulation = decode.attention_inputs(block, x, condition, rope)
        k, v = cache.write(layer, k, v)  # [rows, H, cached + 1, hd]
        attended = attention(q, k, v)  # [rows, H, 1, hd]
        x = decode.finish(block, x, attended, *modulation)
    cache.advance(x.shape[1])
    return x


SAMPLING_PRECISIONS = ("fp32", "bf16")


class DecodeFunctions(NamedTuple):
    """The per-step functions of `generate`: the plain methods, or their torch.compile'd versions."""

    attention_inputs: Callable[..., tuple[torch.Tensor, ...]]
    finish: Callable[..., torch.Tensor]
    head_logits: Callable[..., torch.Tensor] | None  # None: the head's own `logits`
    fp32_attention: Callable[..., torch.Tensor] | None  # for a float32 CUDA cache (the Triton kernel); None: SDPA
    align_head: bool


EAGER_DECODE = DecodeFunctions(
    attention_inputs=Block.attention_inputs, finish=Block.finish, head_logits=None, fp32_attention=None,
    align_head=False,
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
            run_sampling_loop(model, self.labels, settings, self.rng)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.rng)
        with torch.cuda.graph(self.graph):
            self.bits = run_sampling_loop(model, self.labels, settings, self.rng)

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
