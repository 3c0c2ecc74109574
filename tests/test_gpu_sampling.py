"""The GPU fast path (CUDA graph + compiled decode step) against the eager reference loop and the golden fixtures.

Skipped without a GPU; run on one with `python -m pytest tests/test_gpu_sampling.py` (bench/h200.sh does).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bar_lightning.compat.upstream import load_generator

from .conftest import FIXTURES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    # TF32 would make eager and fast runs both differ from the CPU fixtures by ~1e-3: compare in true float32.
    # The suite's deterministic mode (for CPU parity) would refuse cuBLAS without a workspace setting; the
    # comparisons here are run-to-run exact without it.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(False)
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(scope="module", params=["A1", "A2", "A3"])
def fixture(request):
    meta = json.loads((FIXTURES / f"generator_{request.param}.json").read_text())
    io = load_file(str(FIXTURES / f"generator_{request.param}.io.safetensors"))
    model = load_generator(meta["config"], FIXTURES / f"generator_{request.param}.weights.safetensors")
    return meta, io, model.cuda().eval()


def sample(model, labels, meta, run, *, fast: bool, temperature: float = 0.0, seed: int = 0, precision="fp32"):
    model.compile_decode(fast)
    rng = torch.Generator(device="cuda").manual_seed(seed)
    bits = model.generate(
        labels.cuda(), guidance_scale=float(meta["generate"][run]["guidance_scale"]), temperature=temperature,
        tokens_allocation=meta["generate"]["tokens_allocation"], generator=rng, cuda_graph=fast, precision=precision,
    )
    return bits, rng


@pytest.mark.parametrize("run", ["g1", "g3"])
def test_fast_path_reproduces_the_fixture_bits(fixture, run):
    meta, io, model = fixture
    labels = io[f"gen.{run}.class_labels"]
    eager, _ = sample(model, labels, meta, run, fast=False)
    fast, _ = sample(model, labels, meta, run, fast=True)  # the Triton fp32 decode attention
    again, _ = sample(model, labels, meta, run, fast=True)  # a graph replay
    assert torch.equal(eager.cpu(), io[f"gen.{run}.bits"])
    assert torch.equal(fast, eager)
    assert torch.equal(again, eager)


def test_fast_path_draws_the_same_random_numbers_as_the_eager_loop(fixture):
    meta, io, model = fixture
    labels = io["gen.g3.class_labels"]
    eager, eager_rng = sample(model, labels, meta, "g3", fast=False, temperature=2.0, seed=11)
    fast, fast_rng = sample(model, labels, meta, "g3", fast=True, temperature=2.0, seed=11)
    other, _ = sample(model, labels, meta, "g3", fast=True, temperature=2.0, seed=12)
    assert torch.equal(fast, eager)
    assert torch.equal(fast_rng.get_state(), eager_rng.get_state())  # the caller's generator advanced alike
    assert not torch.equal(other, fast)


def test_replays_take_new_labels(fixture):
    meta, io, model = fixture
    labels = io["gen.g3.class_labels"]
    sample(model, labels, meta, "g3", fast=True)
    flipped = labels.flip(0)
    fast, _ = sample(model, flipped, meta, "g3", fast=True, temperature=1.0, seed=3)
    eager, _ = sample(model, flipped, meta, "g3", fast=False, temperature=1.0, seed=3)
    assert torch.equal(fast, eager)


def test_bf16_mode_runs_and_stays_close_to_float32(fixture):
    meta, io, model = fixture
    bits = io["tf.input_bits"].cuda()
    labels = io["tf.class_labels"].cuda()
    with torch.no_grad():
        reference = model.latent_conditions(bits, labels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model.latent_conditions(bits, labels).float()
    assert (low - reference).norm() / reference.norm() < 3e-2
    fast, _ = sample(model, io["gen.g3.class_labels"], meta, "g3", fast=True, precision="bf16")
    assert fast.shape == io["gen.g3.bits"].shape and set(fast.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("head_dim", [64, 28])  # BAR's 64, and a dimension that is not a power of two
@pytest.mark.parametrize("length", [1, 33, 64, 65, 289])
def test_triton_decode_attention_matches_float64_attention_on_cache_views(length, head_dim):
    from bar_lightning.models.sampler import StaticKVCache
    from bar_lightning.ops.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(length)
    rows, heads = 6, 4
    cache = StaticKVCache(num_layers=2, batch=rows, num_heads=heads, max_len=300, head_dim=head_dim,
                          dtype=torch.float32, device=torch.device("cuda"))
    keys, values = (torch.randn(rows, heads, length, head_dim, device="cuda", generator=generator) * 3
                    for _ in range(2))
    k, v = cache.write(1, keys, values)  # strided views into the preallocated cache
    q = torch.randn(rows, 1, heads, head_dim, device="cuda", generator=generator).transpose(1, 2)  # not contiguous
    out = decode_attention(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())  # float64
    assert out.shape == (rows, heads, 1, head_dim) and out.dtype == torch.float32
    assert (out.double() - reference).abs().max() < 2e-5
