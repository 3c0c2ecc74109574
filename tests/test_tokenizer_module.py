"""TokenizerModule: the G/D schedule, the EMA, a tiny fit, checkpoint export, configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from bar_lightning.config.schema import ConfigError, validate_train_config
from bar_lightning.lightning.ema import EMA, ema_decay
from bar_lightning.lightning.tokenizer_module import TokenizerModule, bit_entropy
from bar_lightning.models.conv_tokenizer import ConvFSQTokenizer
from bar_lightning.run import build_tokenizer_job, build_trainer

from .conftest import record_logged_values
from .test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]


class OptimizerStepRecorder(L.Callback):
    """Records, per batch, which optimiser took a step (from AdamW's per-parameter step counters)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self._before: tuple[int, int] = (0, 0)

    @staticmethod
    def _steps(trainer: L.Trainer) -> tuple[int, int]:
        counts = []
        for optimizer in trainer.optimizers:
            states = [state for state in optimizer.state.values() if "step" in state]
            counts.append(int(states[0]["step"]) if states else 0)
        return tuple(counts + [0] * (2 - len(counts)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = self._steps(trainer)
        stepped = [name for name, b, a in zip("GD", self._before, after) if a > b]
        self.kinds.append("".join(stepped))


def fit_recording_steps(cfg, seed: int = 0) -> tuple[TokenizerModule, L.Trainer, OptimizerStepRecorder]:
    """Seed, build the tokenizer job of `cfg` and fit it, recording which optimiser stepped at each batch."""
    L.seed_everything(seed)
    module, datamodule = build_tokenizer_job(cfg)
    recorder = OptimizerStepRecorder()
    trainer = build_trainer(cfg)
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, recorder


@pytest.fixture(scope="module")
def tiny_tokenizer_fit(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    cfg = validate_train_config(compose_train(["experiment=tiny_tokenizer", *QUIET], output_dir))
    L.seed_everything(cfg.seed)
    module, datamodule = build_tokenizer_job(cfg)
    recorder = OptimizerStepRecorder()
    trainer = build_trainer(cfg)
    trainer.callbacks.append(recorder)
    initial = {key: value.clone() for key, value in module.tokenizer.state_dict().items()}
    module.logged_values = record_logged_values(module)
    trainer.fit(module, datamodule=datamodule)
    return cfg, module, trainer, recorder, initial, output_dir


def test_generator_and_discriminator_alternate_after_the_start_step(tiny_tokenizer_fit):
    cfg, module, trainer, recorder, *_ = tiny_tokenizer_fit
    start, steps = cfg.training.discriminator_start, cfg.trainer.max_steps
    expected = ["G"] * start + ["G" if (step - start) % 2 == 0 else "D" for step in range(start, steps)]
    assert recorder.kinds == expected
    assert trainer.global_step == steps  # global_step counts both kinds, as upstream
    assert [module.is_generator_step(s) for s in range(start + 4)] == [True] * (start + 1) + [False, True, False]


def test_tiny_tokenizer_learns_and_uses_its_bits(tiny_tokenizer_fit):
    _, module, trainer, _, initial, _ = tiny_tokenizer_fit
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/d_loss"])
    assert float(metrics["val/psnr"]) > 11.0  # a blank (all-zero) reconstruction of these images gives ~7 dB
    assert float(metrics["val/bit_entropy"]) > 0.5  # bits are used, not stuck at one value
    assert any(not torch.equal(initial[k], v) for k, v in module.tokenizer.state_dict().items())


def test_training_logs_only_device_tensors_and_nothing_for_the_progress_bar(tiny_tokenizer_fit):
    # On a GPU, a host number handed to self.log is copied to the device with a blocking copy, and a value logged
    # with prog_bar=True is read back by Lightning after every step: each a host-device wait per step.
    module = tiny_tokenizer_fit[1]
    training = [(name, value, kwargs) for name, value, kwargs in module.logged_values if name.startswith(("train/", "data/"))]
    assert {"train/loss", "train/d_loss", "train/lr", "train/generator_step"} <= {name for name, *_ in training}
    assert [name for name, value, _ in training if not isinstance(value, torch.Tensor)] == []
    assert [name for name, _, kwargs in training if kwargs.get("prog_bar")] == []
    lr = [float(value) for name, value, _ in training if name == "train/lr"]
    assert lr[-1] > 0 and all(value.device.type == module.device.type for _, value, _ in training)


def count_host_reads(function, *args):
    """`function(*args)` and the number of tensor-to-host-number reads (`.item()`, `int(t)`, ...) it made: on a GPU
    each waits for the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    with CountReads():
        result = function(*args)
    return result, CountReads.reads


def test_ema_reads_its_update_count_from_the_device_once():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    reads = [count_host_reads(ema.update, model)[1] for _ in range(4)]
    assert reads == [1, 0, 0, 0]  # the first update reads the buffer, then the host copy counts
    assert int(ema.num_updates) == 4
    # A loaded count replaces the host copy: the next update continues from it, reading it once.
    state = ema.state_dict()
    state["num_updates"] = torch.tensor(20)
    ema.load_state_dict(state)
    decay, reads = count_host_reads(ema.update, model)
    assert (decay, reads, int(ema.num_updates)) == (ema_decay(21, 0.999), 1, 21)
    assert count_host_reads(ema.update, model)[1] == 0 and int(ema.num_updates) == 22
    # A fresh EMA loading a checkpoint's state (resume) continues its count too.
    resumed = EMA(model, decay=0.999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.update(model) == ema_decay(23, 0.999) and int(resumed.num_updates) == 23


def test_ema_weights_follow_the_official_recurrence():
    assert [ema_decay(u, 0.999) for u in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert ema_decay(10_000, 0.999) == 0.999
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.999)
    expected = model.weight.detach().clone()
    for update in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        decay = ema.update(model)
        expected = decay * expected + (1 - decay) * model.weight.detach()
        assert decay == ema_decay(update, 0.999)
        assert torch.allclose(ema.averaged.weight, expected)
    assert int(ema.num_updates) == 5 and "num_updates" in ema.state_dict()


def test_checkpoint_holds_the_ema_and_exports_a_decoder_only_tokenizer(tiny_tokenizer_fit):
    _, module, *_, output_dir = tiny_tokenizer_fit
    path = output_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert any(key.startswith("ema.averaged.") for key in checkpoint["state_dict"])
    assert not any("lpips" in key or "vgg" in key for key in checkpoint["state_dict"])
    exported = TokenizerModule.load_tokenizer(path, use_ema=True)
    for key, value in module.ema.averaged.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value)
    decoder_only = TokenizerModule.load_tokenizer(path, decode_only=True)
    assert decoder_only.encoder is None
    bits = exported.encode_bits(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert bits.shape == (2, 16 * 6) and set(bits.unique().tolist()) <= {0, 1}
    assert torch.allclose(decoder_only.decode_bits(bits), exported.decode_bits(bits))
    reloaded = TokenizerModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert torch.equal(reloaded.tokenizer.quantize.in_proj.weight, module.tokenizer.quantize.in_proj.weight)


def test_conv_tokenizer_rejects_bad_input_and_starts_with_balanced_bits():
    tokenizer = ConvFSQTokenizer(image_size=16, bits_per_token=6, base_channels=16, encoder_width=32,
                                 decoder_width=32)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*got \(1, 1, 16, 16\)"):
        tokenizer.encode_bits(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 96\]"):
        tokenizer.decode_bits(torch.zeros(1, 95, dtype=torch.long))
    bits = tokenizer.encode_token_bits(torch.rand(8, 3, 16, 16) * 2 - 1)
    assert bit_entropy(bits).mean() > 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer=fsdp"], "trainer=fsdp is not supported for the tokenizer"),
        (["~discriminator"], r"discriminator\.kind=None is unknown"),
        (["+model.hidden=3"], r"model: unknown key\(s\) \['hidden'\]"),
        (["trainer.gradient_clip_val=1.0"], "manual optimisation"),
        (["data.crop_size=32"], "does not match model.image_size=16"),
        (["training.compile_mode=fastest"], r"training\.compile_mode='fastest' is not offered for the tokenizer"),
        (["trainer.accumulate_grad_batches=2"], r"trainer\.accumulate_grad_batches=2 is not supported for the tokenizer"),
    ],
)
def test_invalid_tokenizer_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose_train(["experiment=tiny_tokenizer", *overrides]))


def test_gan_weight_without_discriminator_is_refused():
    from omegaconf import open_dict

    cfg = compose_train(["experiment=tiny_tokenizer"])
    with open_dict(cfg):
        cfg.discriminator = None
    with pytest.raises(ConfigError, match="training.gan_weight=0.1 needs a discriminator"):
        validate_train_config(cfg)


@pytest.mark.parametrize("experiment, bits, size", [("bar_fsq_16bits", 16, 256), ("bar_fsq_10bits_res512", 10, 512)])
def test_official_tokenizer_recipes_compose(experiment, bits, size):
    cfg = validate_train_config(compose_train([f"experiment={experiment}", "data.train_shards='/x/{0..1}.tar'"]))
    assert (cfg.model.bits_per_token, cfg.model.image_size, cfg.data.crop_size) == (bits, size, size)
    assert (cfg.loss.l1_weight, cfg.loss.l2_weight, cfg.loss.perceptual_weight, cfg.loss.gram_weight,
            cfg.loss.distill_weight) == (0.1, 1.0, 1.1, 10.0, 0.7)
    assert (cfg.training.discriminator_start, cfg.training.gan_weight, cfg.training.ema_decay) == (100_000, 0.05, 0.999)
    assert (cfg.optim.learning_rate, cfg.optim.encoder_lr_multiplier, cfg.optim.warmup_steps) == (1e-4, 0.1, 10_000)
    assert cfg.trainer.max_steps == 200_000 and cfg.discriminator.kind == "dino"


def test_missing_pretrained_file_stops_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=bar_fsq_16bits", "trainer=cpu",
         "training.encoder_init_weights=null", "data.train_shards='/nonexistent/{000000..000001}.tar'",
         f"paths.pretrained_dir={tmp_path}/pretrained", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert f"{tmp_path}/pretrained/vgg16-397923af.pth" in result.stderr and "LPIPS" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_rfid_uses_the_local_inception_weights(tiny_tokenizer_fit, inception_weights):
    _, module, *_ = tiny_tokenizer_fit
    from bar_lightning.lightning.image_datamodule import SyntheticImageDataModule

    module.evaluation = {"rfid": True, "inception_weights": inception_weights}
    datamodule = SyntheticImageDataModule(image_size=16, batch_size=8, num_samples=16, val_num_samples=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert metrics["val/rfid"] > 0 and torch.isfinite(torch.tensor(metrics["val/rfid"]))
    assert {"val/psnr", "val/ssim", "val/bit_entropy"} <= set(metrics)


def test_rfid_refuses_a_missing_inception_file(tiny_tokenizer_fit, tmp_path):
    _, module, *_ = tiny_tokenizer_fit
    if hasattr(module, "_fid_metric"):
        object.__delattr__(module, "_fid_metric")
    module.evaluation = {"rfid": True, "inception_weights": str(tmp_path / "missing.pth")}
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        module._fid()


def test_ema_shares_frozen_weights_and_averages_trainable_ones_in_a_state_dict_of_the_whole_model(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen branch, like the tokenizer's SigLIP2 half
    ema = EMA(model, decay=0.5)
    assert ema.averaged[0].weight is model[0].weight  # held once
    assert ema.averaged[1].weight.data_ptr() != model[1].weight.data_ptr()  # averaged separately
    with torch.no_grad():
        model[1].weight.add_(1.0)
    before = ema.averaged[1].weight.clone()
    for _ in range(3):
        decay = ema.update(model)
        before = decay * before + (1 - decay) * model[1].weight
        torch.testing.assert_close(ema.averaged[1].weight, before)
    state = ema.state_dict()
    assert {"averaged.0.weight", "averaged.0.bias", "averaged.1.weight", "num_updates"} <= set(state)
    torch.save(state, tmp_path / "ema.pt")
    other = EMA(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    torch.testing.assert_close(other.averaged[0].weight, model[0].weight)
    torch.testing.assert_close(other.averaged[1].weight, ema.averaged[1].weight)
    # A frozen weight that is not shared (a fresh model) is copied in by copy_frozen_from.
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fresh[0].requires_grad_(False)
    other.copy_frozen_from(fresh)
    torch.testing.assert_close(other.averaged[0].weight, fresh[0].weight)


@pytest.mark.parametrize("compile_discriminator", [False, True])
def test_training_compile_compiles_the_tokenizer_and_loss_and_the_discriminator_only_when_asked(
        tmp_path, compile_discriminator):
    from types import SimpleNamespace

    from torch._dynamo.eval_frame import OptimizedModule

    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", "training.compile=true",
         f"training.compile_discriminator={str(compile_discriminator).lower()}"], tmp_path))
    module, _ = build_tokenizer_job(cfg)
    assert module.discriminator is not None
    # Compilation is for CUDA devices; a trainer on one is described to the module (torch.compile is lazy: nothing
    # is compiled until a compiled forward is called).
    for device, compiled_expected in (("cpu", False), ("cuda", True)):
        module._compiled = None
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        try:
            module.on_fit_start()
        finally:
            module._trainer = None
        for name in ("tokenizer", "loss", "discriminator"):
            compiled = isinstance(module._forward(name), OptimizedModule)
            wanted = compiled_expected and (name != "discriminator" or compile_discriminator)
            assert compiled == wanted, (device, name)
            assert getattr(module._forward(name), "_orig_mod", module._forward(name)) is getattr(module, name)


@pytest.mark.parametrize("pin_memory, workers, persistent", [(True, 1, True), (False, 0, False)])
def test_synthetic_image_data_takes_the_loader_keys_of_the_config(tmp_path, pin_memory, workers, persistent):
    # data.pin_memory / data.persistent_workers reach the synthetic source's loaders as the webdataset one's (they
    # were once ignored there, and the tokenizer bench copied unpinned batches).
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", "data=synthetic_images", f"data.pin_memory={str(pin_memory).lower()}",
         f"data.num_workers={workers}", f"data.persistent_workers={str(persistent).lower()}",
         "data.synthetic_val_num_samples=8"], tmp_path))
    _, datamodule = build_tokenizer_job(cfg)
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        assert (loader.pin_memory, loader.num_workers, loader.persistent_workers) == (pin_memory, workers, persistent)


def test_synthetic_image_data_refuses_persistent_workers_without_workers():
    from bar_lightning.lightning.image_datamodule import SyntheticImageDataModule

    with pytest.raises(ValueError, match="persistent_workers=True needs num_workers > 0"):
        SyntheticImageDataModule(image_size=16, batch_size=8, num_samples=16, persistent_workers=True)


@pytest.mark.parametrize("compile_mode, graphs", [("default", False), ("reduce-overhead", True)])
def test_training_compile_mode_reaches_the_tokenizer_and_loss_but_not_the_discriminator(
        tmp_path, monkeypatch, compile_mode, graphs):
    from types import SimpleNamespace

    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", "training.compile=true", "training.compile_discriminator=true",
         f"training.compile_mode={compile_mode}"], tmp_path))
    module, _ = build_tokenizer_job(cfg)
    modes = {}

    def recording_compile(model, mode=None):
        modes[next(name for name in ("tokenizer", "loss", "discriminator") if getattr(module, name) is model)] = mode
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cuda")))
    try:
        module.on_fit_start()
    finally:
        module._trainer = None
    wanted = "reduce-overhead" if graphs else None
    assert modes == {"tokenizer": wanted, "loss": wanted, "discriminator": None}
    assert module._cuda_graphs is graphs


def test_automatic_compile_mode_replays_cuda_graphs_on_one_gpu_only(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    def resolved(overrides, strategy):
        cfg = validate_train_config(compose_train(["experiment=tiny_tokenizer", *overrides], tmp_path))
        module, _ = build_tokenizer_job(cfg)
        module._trainer = SimpleNamespace(strategy=strategy, world_size=2)
        try:
            return module.training_compile_mode()
        finally:
            module._trainer = None

    one_gpu = SingleDeviceStrategy(torch.device("cuda"))
    ddp = DDPStrategy(parallel_devices=[torch.device("cuda", 0), torch.device("cuda", 1)])
    assert resolved([], one_gpu) == "reduce-overhead"
    assert resolved([], ddp) == "default"
    assert resolved(["training.compile_mode=default"], one_gpu) == "default"
    assert resolved(["training.compile_mode=max-autotune-no-cudagraphs"], ddp) == "max-autotune-no-cudagraphs"
    # A checkpoint written before training.compile_mode existed holds no such key: automatic as well.
    cfg = validate_train_config(compose_train(["experiment=tiny_tokenizer"], tmp_path))
    module, _ = build_tokenizer_job(cfg)
    del module.hparams.training["compile_mode"]
    assert "compile_mode" not in module.hparams.training
    module._trainer = SimpleNamespace(strategy=one_gpu, world_size=1)
    try:
        assert module.training_compile_mode() == "reduce-overhead"
    finally:
        module._trainer = None
    # Automatic under DDP compiles without graphs instead of refusing the run, as an explicit reduce-overhead does.
    cfg = validate_train_config(compose_train(["experiment=tiny_tokenizer", "training.compile=true"], tmp_path))
    module, _ = build_tokenizer_job(cfg)
    module._trainer = SimpleNamespace(strategy=ddp, world_size=2)
    try:
        module.on_fit_start()
    finally:
        module._trainer = None
    assert module._compiled is not None and module._cuda_graphs is False


def test_cuda_graph_mode_is_refused_beyond_one_gpu(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", "training.compile=true", "training.compile_mode=reduce-overhead"], tmp_path))
    module, _ = build_tokenizer_job(cfg)
    module._trainer = SimpleNamespace(strategy=DDPStrategy(parallel_devices=[torch.device("cuda", 0),
                                                                             torch.device("cuda", 1)]),
                                      world_size=2)
    try:
        with pytest.raises(ValueError, match=r"compile_mode='reduce-overhead'.*DDPStrategy on 2.*compile_mode=default"):
            module.on_fit_start()
    finally:
        module._trainer = None
    assert module._compiled is None


def test_a_step_with_cuda_graph_copies_trains_and_logs_as_without(tmp_path):
    # The copies made for CUDA-graph replays (training.compile_mode=reduce-overhead) keep the gradient path: on the
    # CPU, with the same seed, two G and two D steps log the same losses and leave the same weights either way.
    results = []
    for graphs in (False, True):
        cfg = validate_train_config(compose_train(
            ["experiment=tiny_tokenizer", *QUIET, "training.discriminator_start=0", "trainer.max_steps=4",
             "callbacks=none", "logger=none"], tmp_path / str(graphs)))
        L.seed_everything(cfg.seed)
        module, datamodule = build_tokenizer_job(cfg)
        object.__setattr__(module, "_cuda_graphs", graphs)  # as on_fit_start sets it on a GPU
        trainer = build_trainer(cfg)
        trainer.fit(module, datamodule=datamodule)
        assert module._cuda_graphs is graphs
        results.append(({key: float(value) for key, value in trainer.callback_metrics.items()},
                        {key: value.clone() for key, value in module.tokenizer.state_dict().items()}))
    (metrics, weights), (graph_metrics, graph_weights) = results
    assert {"train/loss", "train/d_loss"} <= set(metrics)
    assert metrics == graph_metrics
    for key, value in weights.items():
        torch.testing.assert_close(graph_weights[key], value, rtol=0, atol=0)


class GradientHolders(L.Callback):
    """Records, after every batch, the names of the module's parameters that still hold a gradient."""

    def __init__(self) -> None:
        self.after_batch: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_batch.append([name for name, parameter in pl_module.named_parameters() if parameter.grad is not None])


def test_gradients_are_released_once_applied(tmp_path):
    # Under CUDA graphs a gradient is an output of the backward graph that the next replay overwrites; one kept past
    # its step made Lightning's teardown (module.cpu()) fail on the GPU. After every G and D step no parameter
    # holds one, and the fit still trains both networks.
    cfg = validate_train_config(compose_train(
        ["experiment=tiny_tokenizer", *QUIET, "training.discriminator_start=0", "trainer.max_steps=4",
         "callbacks=none", "logger=none"], tmp_path))
    L.seed_everything(cfg.seed)
    module, datamodule = build_tokenizer_job(cfg)
    initial = {name: parameter.detach().clone() for name, parameter in module.named_parameters()
               if parameter.requires_grad}
    holders, recorder = GradientHolders(), OptimizerStepRecorder()
    trainer = build_trainer(cfg)
    trainer.callbacks += [holders, recorder]
    trainer.fit(module, datamodule=datamodule)
    assert recorder.kinds == ["G", "D", "G", "D"]
    assert holders.after_batch == [[], [], [], []]
    changed = {name.split(".")[0] for name, parameter in module.named_parameters()
               if name in initial and not torch.equal(parameter.detach(), initial[name])}
    assert {"tokenizer", "discriminator"} <= changed
