"""The BAR-FSQ tokenizer on a GPU: the golden fixture's bits and decoding as on the CPU, and one generator step and
one discriminator step of the full-size training module (random stand-ins for its pretrained networks), the
tiny tokenizer trained with CUDA graphs (training.compile_mode=reduce-overhead) as without, and its training steps
never making the host wait for the GPU.

Skipped without a GPU; bench/h200.sh runs it.
"""

from __future__ import annotations

import pytest
import torch

from bar_lightning.config.schema import validate_train_config
from bar_lightning.run import build_tokenizer_job
from bar_lightning.stand_in_weights import write_stand_in_weights

from .conftest import fit_forbidding_host_syncs
from .test_configs import compose_train
from .test_parity_tokenizer import c2_sizes, load_tokenizer, max_error, read_fixture
from .test_tokenizer_module import fit_recording_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp32 without TF32 on the GPU: the kernels differ from the CPU's (reduction order), not the precision.
GPU_ATOL = 1e-4


@pytest.fixture
def exact_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_golden_tokenizer_encodes_and_decodes_on_the_gpu_as_on_the_cpu(exact_float32):
    meta, io, weights = read_fixture("tokenizer_C2")
    tokenizer = load_tokenizer(meta["config"], weights, *c2_sizes(meta)).cuda().eval()
    images = io["tok.images"].cuda()
    with torch.no_grad():
        features = tokenizer.encode_features(images)
        bits = tokenizer.encode_bits(images)
        decoded = tokenizer.decode_bits(io["tok.bits_flat"].cuda())
    assert max_error(features.cpu(), io["tok.encoder_features"]) < GPU_ATOL
    assert torch.equal(bits.cpu(), io["tok.bits_flat"])
    assert max_error(decoded.cpu(), io["tok.decoded"]) < GPU_ATOL


def test_full_size_tokenizer_takes_a_generator_and_a_discriminator_step(tmp_path):
    cfg = validate_train_config(compose_train(
        ["experiment=bar_fsq_16bits", "data=synthetic_images", "data.batch_size=4", "data.num_workers=0",
         f"paths.pretrained_dir={tmp_path / 'pretrained'}", "training.discriminator_start=0", "trainer.max_steps=2",
         "trainer.precision=bf16-mixed", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "logger=none", "callbacks=none",
         # the step itself, eager: the compiled step (the default) is timed by bench/tokenizer_training.py and
         # compiling the full-size modules takes ~150 s
         "training.compile=false"],
        tmp_path / "run",
    ))
    written = write_stand_in_weights(cfg)
    assert set(written) == {"loss.vgg16_weights", "loss.lpips_weights", "loss.convnext_weights",
                            "discriminator.backbone_weights", "training.encoder_init_weights"}
    module, trainer, recorder = fit_recording_steps(cfg)
    assert recorder.kinds == ["G", "D"]
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/d_loss"])
    # The frozen SigLIP2 branch, VGG, ConvNeXt and DINO stay out of the optimisers.
    trained = {id(parameter) for optimizer in trainer.optimizers for group in optimizer.param_groups
               for parameter in group["params"]}
    frozen_encoder = module.tokenizer.encoder.frozen_layers.parameters()
    assert not any(id(parameter) in trained for parameter in frozen_encoder)


def test_tiny_tokenizer_trains_with_cuda_graphs_as_compiled_without(tmp_path):
    # training.compile_mode=reduce-overhead replays the tokenizer's and the loss's compiled forwards and backwards as
    # CUDA graphs: two G and two D steps (G and D alternate from step 0) end with the weights and losses of the
    # same compiled step without graphs, and no output is read after the next replay overwrote it (torch raises then).
    # Deterministic algorithms in both runs (trainer.deterministic: cuDNN's deterministic algorithms, and Inductor's
    # deterministic fallbacks for its atomic-add kernels): without them the two runs differ by run-to-run noise, which
    # the first AdamW updates amplify (an update is about lr * sign(gradient), whatever the gradient's size) and the D
    # step's rounding of the fakes to the uint8 grid amplifies again; on 2026-12-07 that left train/logits_fake 1.9e-4
    # apart (relative) on an H100.
    results = {}
    for mode in ("default", "reduce-overhead"):
        cfg = validate_train_config(compose_train(
            ["experiment=tiny_tokenizer", "trainer=gpu", "trainer.precision=32-true", "trainer.deterministic=true",
             "training.compile=true", f"training.compile_mode={mode}", "training.discriminator_start=0",
             "trainer.max_steps=4", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false", "logger=none", "callbacks=none"],
            tmp_path / mode,
        ))
        module, trainer, recorder = fit_recording_steps(cfg)
        assert recorder.kinds == ["G", "D", "G", "D"]
        assert module._cuda_graphs is (mode == "reduce-overhead")
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
        results[mode] = metrics, {key: value.detach().cpu().clone() for key, value in module.tokenizer.state_dict().items()}
    (metrics, weights), (graph_metrics, graph_weights) = results["default"], results["reduce-overhead"]
    assert set(metrics) == set(graph_metrics) and {"train/loss", "train/d_loss"} <= set(metrics)
    # Every difference at once (a GPU run is scarce): the metrics, then the largest weight difference per tensor.
    differences = {key: (graph_metrics[key], value) for key, value in metrics.items()
                   if graph_metrics[key] != pytest.approx(value, rel=1e-4, abs=1e-6)}
    differences.update({key: float((graph_weights[key] - value).abs().max()) for key, value in weights.items()
                        if not torch.allclose(graph_weights[key], value, rtol=1e-4, atol=1e-5)})
    assert not differences, differences


@pytest.mark.parametrize("compile_setting", [["training.compile=false"], ["training.compile=true"]],
                         ids=["eager", "compiled_automatic"])
def test_tiny_tokenizer_steps_never_wait_for_the_gpu(tmp_path, compile_setting):
    # Five G/D steps in the steady state (after the compilation and the CUDA-graph recordings of the first ten), with
    # the GPU trainer's defaults (bf16-mixed, fused AdamW), the tokenizer callbacks, a CSV logger and gradient
    # clipping: nothing from the start of step 10 to the start of step 15 may make the host wait for the device
    # (torch.cuda.set_sync_debug_mode("error") raises at the first such operation). A wait per step leaves the GPU
    # idle while the host runs Lightning's loop and fetches the next batch.
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", "trainer=gpu", "training.discriminator_start=0", "trainer.max_steps=16",
         "training.gradient_clip_val=1.0", "trainer.log_every_n_steps=50", "trainer.num_sanity_val_steps=0",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv", "data.num_workers=2",
         "data.pin_memory=true", *compile_setting],
        tmp_path,
    ))
    module, trainer = fit_forbidding_host_syncs(cfg, build_tokenizer_job, first=10, last=15)
    assert trainer.global_step == 16 and int(module.ema.num_updates) == 16
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and torch.isfinite(trainer.callback_metrics["train/d_loss"])
