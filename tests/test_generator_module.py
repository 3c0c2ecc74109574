"""GeneratorModule: schedules, optimiser groups, a short fit of the tiny generator, checkpoint reload."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from bar_lightning.config.schema import validate_train_config
from bar_lightning.lightning.generator_module import GeneratorModule
from bar_lightning.lightning.optimization import (
    parameter_groups,
    random_order_ratio,
    upstream_no_decay,
    warmup_cosine,
)
from bar_lightning.models.bar import BARGenerator
from bar_lightning.run import build_generator_job, build_trainer

from .conftest import record_logged_values
from .test_configs import compose_train


def test_random_order_ratio_anneals_between_the_window():
    assert random_order_ratio(0, 125_000, 187_500) == 1.0
    assert random_order_ratio(125_000, 125_000, 187_500) == 1.0
    assert random_order_ratio(156_250, 125_000, 187_500) == pytest.approx(0.5)
    assert random_order_ratio(187_500, 125_000, 187_500) == 0.0
    assert random_order_ratio(200_000, 125_000, 187_500) == 0.0
    assert random_order_ratio(0, -1, -1) == 0.0  # raster-only training


def test_warmup_cosine_matches_the_official_schedule():
    kwargs = dict(warmup_steps=62_500, total_steps=250_000, base_lr=4e-4, end_lr=1e-5)
    assert warmup_cosine(0, **kwargs) == 0.0
    assert warmup_cosine(31_250, **kwargs) == pytest.approx(0.5)
    assert warmup_cosine(62_500, **kwargs) == pytest.approx(1.0)
    mid = 62_500 + (250_000 - 62_500) // 2
    assert warmup_cosine(mid, **kwargs) * 4e-4 == pytest.approx((1e-5 + 4e-4) / 2)
    assert warmup_cosine(250_000, **kwargs) * 4e-4 == pytest.approx(1e-5)


def test_weight_decay_groups_mirror_the_official_rule():
    with torch.device("meta"):
        model = BARGenerator(hidden_size=64, num_layers=1, num_heads=4, num_tokens=16, bits_per_token=4,
                             num_classes=10, repeat_class_condition=4, head_width=64, head_layers=1)
    names = dict(model.named_parameters())
    assert upstream_no_decay("blocks.0.adaLN_modulation.1.weight", names["blocks.0.adaLN_modulation.1.weight"])
    assert upstream_no_decay("embeddings.weight", names["embeddings.weight"])
    assert upstream_no_decay("lm_head.t_embedder.mlp.0.weight", names["lm_head.t_embedder.mlp.0.weight"])
    assert not upstream_no_decay("cls_token", names["cls_token"])  # 3-D, no keyword: decayed upstream too
    assert not upstream_no_decay("blocks.0.attn.qkv.weight", names["blocks.0.attn.qkv.weight"])
    no_decay, decay = parameter_groups(model.named_parameters(), 0.03, "upstream")
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.03
    assert len(no_decay["params"]) + len(decay["params"]) == len(names)
    _, everything = parameter_groups(model.named_parameters(), 0.03, "none")
    assert len(everything["params"]) == len(names)


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """Fit the tiny generator on synthetic tokens for 120 steps (about 10 s on 2 CPU cores)."""
    output_dir = tmp_path_factory.mktemp("tiny_fit")
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_generator", "logger=csv", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "callbacks.progress_bar=null"],
        output_dir,
    ))
    L.seed_everything(cfg.seed)
    module, datamodule = build_generator_job(cfg)
    trainer = build_trainer(cfg)
    initial = {key: value.clone() for key, value in module.state_dict().items()}
    module.logged_values = record_logged_values(module)
    trainer.fit(module, datamodule=datamodule)
    return cfg, module, datamodule, trainer, initial, output_dir


def test_training_logs_only_device_tensors_and_nothing_for_the_progress_bar(tiny_fit):
    # On a GPU, a host number handed to self.log is copied to the device with a blocking copy, and a value logged
    # with prog_bar=True is read back by Lightning after every step: each a host-device wait per step.
    module = tiny_fit[1]
    training = [(name, value, kwargs) for name, value, kwargs in module.logged_values if name.startswith("train/")]
    assert {"train/loss", "train/lr", "train/random_ratio", "train/samples_per_second"} <= {n for n, *_ in training}
    assert [name for name, value, _ in training if not isinstance(value, torch.Tensor)] == []
    assert [name for name, _, kwargs in training if kwargs.get("prog_bar")] == []


def test_tiny_generator_learns_the_class_conditional_bits(tiny_fit):
    cfg, module, datamodule, trainer, initial, _ = tiny_fit
    assert trainer.global_step == cfg.trainer.max_steps
    # The weights moved (negative control for the metrics below).
    assert any(not torch.equal(initial[key], value) for key, value in module.state_dict().items())
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    # Bit CE starts at log 2 = 0.693; the class prototypes make most bits predictable.
    assert float(metrics["val/loss"]) < 0.5
    # Samples follow their class prototype much better than chance (0.5 agreement).
    module.eval()
    dataset = datamodule.train_dataset
    labels = torch.arange(cfg.model.num_classes)
    bits = module.sample(labels, generator=torch.Generator().manual_seed(0), temperature=0.0, guidance_scale=2.0)
    prototypes = torch.stack([dataset._prototype(int(c)) for c in labels])
    agreement = (bits == prototypes).float().mean().item()
    assert agreement > 0.85, agreement


def test_random_ratio_followed_the_anneal_window(tiny_fit):
    cfg, module, *_ = tiny_fit
    # tiny_generator anneals between steps 20 and 40 and stops at 120: the last steps are raster-only.
    assert module.random_ratio == 0.0
    checkpoint = torch.load(tiny_fit[5] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["random_ratio"] == 0.0 and checkpoint["global_step"] == cfg.trainer.max_steps


def test_checkpoint_reloads_without_arguments(tiny_fit):
    _, module, *_ = tiny_fit
    path = tiny_fit[5] / "checkpoints" / "last.ckpt"
    reloaded = GeneratorModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    for key, value in module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    labels = torch.tensor([0, 3])
    a = module.sample(labels, generator=torch.Generator().manual_seed(5))
    b = reloaded.eval().sample(labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_the_training_step_is_compiled_by_default_on_gpus_only_outside_fsdp(tiny_fit):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    _, module, *_ = tiny_fit
    previous = module._trainer
    try:
        for device, expected in (("cuda", True), ("cpu", False)):
            module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
            assert module.compile_training_step(None) is expected
            assert module.compile_training_step(False) is False and module.compile_training_step(True) is True
        module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
        assert module.compile_training_step(None) is False
    finally:
        module._trainer = previous


def test_the_compiled_step_uses_cuda_graphs_by_default_on_one_device_only(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    def resolved(overrides, strategy, accumulate_grad_batches=1):
        cfg = validate_train_config(compose_train(["experiment=tiny_generator", *overrides], tmp_path))
        module, _ = build_generator_job(cfg)
        module._trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=accumulate_grad_batches)
        return module.training_compile_mode()

    one_device = SingleDeviceStrategy(torch.device("cpu"))
    ddp = DDPStrategy.__new__(DDPStrategy)
    assert resolved([], one_device) == "reduce-overhead"
    assert resolved([], one_device, accumulate_grad_batches=2) == "default"
    assert resolved([], ddp) == "default"
    assert resolved(["+training.compile_options.cpp_wrapper=true"], one_device) == "default"
    assert resolved(["training.compile_mode=default"], one_device) == "default"
    assert resolved(["training.compile_mode=max-autotune-no-cudagraphs"], ddp) == "max-autotune-no-cudagraphs"


def test_a_compiled_step_saves_the_same_state_as_an_eager_one(tmp_path):
    cfg = validate_train_config(compose_train(["experiment=tiny_generator", "training.compile=true"], tmp_path))
    module, _ = build_generator_job(cfg)
    eager_keys = set(module.state_dict())
    module.configure_model()
    assert module._compiled_forward is not None
    assert set(module.state_dict()) == eager_keys  # no second copy under `_compiled_forward._orig_mod.`
    assert "_compiled_forward" not in dict(module.named_children())
    fresh, _ = build_generator_job(validate_train_config(compose_train(["experiment=tiny_generator"], tmp_path)))
    fresh.load_state_dict(module.state_dict())  # strict: a compiled run's checkpoint loads into an eager module


def test_bad_batches_are_rejected_on_the_host_before_the_copy_to_the_device(tiny_fit):
    _, module, *_ = tiny_fit
    good = {"bits": torch.zeros(2, 64, dtype=torch.long), "label": torch.tensor([0, 1])}
    assert module.on_before_batch_transfer(good, 0) is good
    with pytest.raises(ValueError, match="bits must be 0 or 1; found 2"):
        module.on_before_batch_transfer({**good, "bits": torch.full((2, 64), 2)}, 0)
    with pytest.raises(ValueError, match="class label 99 is out of range"):
        module.on_before_batch_transfer({**good, "label": torch.tensor([0, 99])}, 0)
    # A DataModule with its own on_before_batch_transfer replaces the module's hook: the step checks the batch then.
    module._batch_checked_on_host = False
    with pytest.raises(ValueError, match="bits must be 0 or 1; found 2"):
        module.validation_step({**good, "bits": torch.full((2, 64), 2)}, 0)


def test_fused_adamw_under_bf16_autocast_clips_the_global_gradient_norm(tmp_path):
    # The GPU default (bf16-mixed + fused AdamW + clip 1.0): Lightning itself refuses to clip for a fused optimiser,
    # so the module clips; the clipped global norm must be the configured value.
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_generator", "logger=none", "callbacks=none", "trainer.max_steps=2",
         "trainer.precision=bf16-mixed", "optim.fused=true", "trainer.gradient_clip_val=1e-3",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
        tmp_path,
    ))
    module, datamodule = build_generator_job(cfg)
    norms = []

    class RecordNormAtStep(L.Callback):
        # The closure (forward, backward, clipping) runs inside step(); a post-hook sees the gradients used.
        def on_train_start(self, trainer, pl_module):
            def record(optimizer, args, kwargs):
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(record)

    trainer = build_trainer(cfg, enable_checkpointing=False)
    trainer.callbacks.append(RecordNormAtStep())
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert module.optimizers().optimizer.defaults["fused"] is True
    assert norms and all(abs(norm - 1e-3) < 1e-5 for norm in norms), norms
