"""The structured-config schemas: every key a run may set, its type and (where the YAML does not give it) its
default. `config/schema.py` merges the composed Hydra config into these dataclasses and checks the rules between
keys; a typo or a wrong type stops the run with the full key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and the fix."""


@dataclass
class GeneratorModelConfig:
    """Sizes of `BARGenerator` (same names as its keyword arguments)."""

    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 12
    num_tokens: int = 256
    bits_per_token: int = 16
    num_classes: int = 1000
    patch_size: int = 1
    repeat_class_condition: int = 32
    dropout: float = 0.0
    head: str = "mbm"
    head_width: int = 2048
    head_layers: int = 3
    use_checkpoint: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr`, stepped once per optimiser step."""

    learning_rate: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.96])
    weight_decay: float = 0.03
    warmup_steps: int = 62_500
    total_steps: int = 250_000
    end_lr: float = 1e-5
    # "upstream": no decay for 1-D tensors, biases and names containing norm/ln/embed (lower-cased), as the
    # official script; "none": decay everything.
    no_decay_rule: str = "upstream"
    fused: bool | None = None  # None: fused AdamW on CUDA, the default kernel elsewhere


TRAINING_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class GeneratorTrainingConfig:
    class_label_dropout: float = 0.1
    # Random-order probability is 1 before `randomness_anneal_start`, 0 after `randomness_anneal_end`, linear between.
    randomness_anneal_start: int = 125_000
    randomness_anneal_end: int = 187_500
    # torch.compile the training forward/backward. None: on for CUDA devices (one GPU or DDP; 2.3x faster and 40%
    # less memory for BAR-B on an H200: 227.1 -> 532.2 img/s, 82.3 -> 49.65 GiB, docs/benchmarks.md, Training), off
    # on CPU (compilation outlasts short runs) and under FSDP (not run compiled yet); true / false force it.
    compile: bool | None = None
    # torch.compile mode of the training forward/backward: "default", "reduce-overhead" (forward and backward
    # replayed as CUDA graphs: 3% faster and 1.3 GiB less for BAR-B on an H200, docs/benchmarks.md, Training) or
    # "max-autotune-no-cudagraphs" (Triton GEMM autotuning: minutes more compilation). None: "reduce-overhead" for
    # a one-device run without gradient accumulation (a replay would overwrite the accumulated gradients), otherwise
    # "default" (also under DDP, where CUDA graphs with DDP's gradient hooks are not tested yet, and when
    # compile_options are given).
    compile_mode: str | None = None
    # Inductor options for that compilation (names: torch._inductor.list_options(); on the command line
    # `+training.compile_options.cpp_wrapper=true`). torch takes these or a compile_mode other than "default".
    compile_options: dict[str, Any] = field(default_factory=dict)
    # Pad the MBM head's MLP hidden width to a multiple of 8 (5461 -> 5464) in the training step: the same loss with
    # aligned matrix products. None: on for CUDA devices, off on CPU (where the summation order would change).
    align_head_matmuls: bool | None = None
    preview_every_n_steps: int = 5000
    preview_classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279, 1, 323])
    check_inputs: bool = True


@dataclass
class SamplingConfig:
    """Read by training previews and by evaluate.py."""

    guidance_scale: float = 5.0
    temperature: float = 2.5
    tokens_allocation: list[int] = field(default_factory=lambda: [2, 2, 5, 7])
    random_order: bool = False
    # Speed settings of evaluate.py on a GPU (ignored on CPU). The defaults are the fast path; every one of them
    # keeps float32 results except precision=bf16 (see docs/benchmarks.md).
    cuda_graph: bool = True  # replay the whole sampling loop as one CUDA graph
    compile: bool = True  # torch.compile the per-step block halves and the MBM head
    precision: str = "fp32"  # fp32 (official numerics, TF32 matmuls allowed) or bf16 (autocast, bf16 KV cache)


@dataclass
class TokenDataConfig:
    source: str = "synthetic"
    root: str | None = None
    batch_size: int = 128
    num_workers: Any = 0  # a count, or "auto" (see bar_lightning.io.default_num_workers)
    tokens: int = 256
    bits_per_token: int = 16
    num_classes: int = 1000
    flip_probability: float = 0.5
    synthetic_num_samples: int = 1024
    synthetic_noise: float = 0.1
    val_num_samples: int = 0
    seed: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    drop_last: bool = True


@dataclass
class PreemptionConfig:
    """What a preemption signal does: save `<run dir>/checkpoints/last.ckpt` at the next step boundary, then exit.

    The exit code is distinct from success (0) and errors (1); with `requeue` and `SLURM_JOB_ID` set, the job is
    also requeued with `scontrol requeue`. See docs/reliability.md.
    """

    enabled: bool = True
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    exit_code: int = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again"
    requeue: bool = True
    interrupt: bool = True  # Ctrl-C saves at the next step boundary too, then exits with 130 (never requeues)


@dataclass
class ModelSourceConfig:
    """A network for evaluate.py (and train.py's preview tokenizer): a checkpoint of this project, or released
    weights with their official yaml."""

    checkpoint: str | None = None
    upstream_weights: str | None = None
    upstream_config: str | None = None


@dataclass
class PreviewConfig:
    """What the training previews are decoded with. `tokenizer`: the keys of evaluate.py's `tokenizer.*` (a
    tokenizer checkpoint of this project, or released weights with their yaml); unset, previews are bit maps."""

    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)


@dataclass
class TrainerConfig:
    """Arguments of `lightning.Trainer` that runs may set."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    max_steps: int = 250_000
    max_epochs: int | None = -1
    gradient_clip_val: float | None = 1.0
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 0
    deterministic: Any = False
    benchmark: bool | None = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    fast_dev_run: Any = False
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False
    overfit_batches: Any = 0.0  # debug=overfit: train (and validate) on this many batches (an int) or fraction
    # debug=profiler: "simple" / "advanced" (report in the log), or a profiler config with _target_ (report in a file)
    profiler: Any = None


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    pretrained_dir: str = "pretrained"
    output_dir: str = "outputs"
    log_dir: str = "logs"


@dataclass
class GeneratorTrainConfig:
    task: str = "generator"
    experiment_name: str = "default"
    tags: list[str] = field(default_factory=list)
    print_config: bool = True
    seed: int = 42
    float32_matmul_precision: str = "high"
    ckpt_path: str | None = None
    # A generator over 50M parameters on a CPU-only run is refused (plain `python train.py` is BAR-B) unless true.
    allow_large_model_on_cpu: bool = False
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class TokenizerLossConfig:
    """Keyword arguments of `TokenizerReconstructionLoss`; a term with weight 0 needs no pretrained file."""

    l1_weight: float = 0.1
    l2_weight: float = 1.0
    perceptual_weight: float = 1.1
    lpips_weight: float = 1.0
    convnext_weight: float = 0.1
    gram_weight: float = 10.0
    distill_weight: float = 0.7
    vgg16_weights: str | None = None
    lpips_weights: str | None = None
    convnext_weights: str | None = None
    imagenet_input_size: int = 224


@dataclass
class TokenizerOptimConfig:
    learning_rate: float = 1e-4
    discriminator_learning_rate: float = 1e-4
    encoder_lr_multiplier: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 10_000
    total_steps: int = 200_000
    end_lr: float = 1e-5
    # Fused AdamW kernels (one launch per parameter group). None: on for CUDA (not under 16-mixed).
    fused: bool | None = None


@dataclass
class TokenizerTrainingConfig:
    discriminator_start: int = 100_000
    gan_weight: float = 0.05
    ema: bool = True
    ema_decay: float = 0.999
    gradient_clip_val: float = 1.0
    encoder_init_weights: str | None = None
    # torch.compile the tokenizer's and the losses' forward (the official recipe's compile_model: true); ignored on
    # CPU and under FSDP. Off until measured (docs/benchmarks.md, "Tokenizer training").
    compile: bool = False


@dataclass
class TokenizerEvaluationConfig:
    rfid: bool = False
    inception_weights: str | None = None


@dataclass
class ImageDataConfig:
    """`source: webdataset` reads shards (ImageDataModule); `source: synthetic` generates images."""

    source: str = "webdataset"
    train_shards: str | None = None
    eval_shards: str | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: Any = 0  # a count, or "auto" (see bar_lightning.io.default_num_workers)
    resize_shorter_edge: int = 256
    crop_size: int = 256
    random_crop: bool = True
    random_flip: bool = True
    shuffle_buffer: int = 1000
    samples_per_epoch: int = 1_281_167
    seed: int = 0
    max_skip_rate: float = 0.01
    min_samples_for_skip_rate: int = 100
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    # Images larger than this many pixels are refused from their header (skipped in training, an error in
    # validation); null: max(4096 x 4096, 16 x crop_size²).
    max_image_pixels: int | None = None
    synthetic_num_samples: int = 256
    synthetic_val_num_samples: int = 0


@dataclass
class TokenizerTrainConfig:
    task: str = "tokenizer"
    experiment_name: str = "default"
    tags: list[str] = field(default_factory=list)
    print_config: bool = True
    seed: int = 42
    float32_matmul_precision: str = "high"
    ckpt_path: str | None = None
    allow_large_model_on_cpu: bool = False  # (the check applies to generators)
    model: dict[str, Any] = field(default_factory=dict)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    discriminator: dict[str, Any] | None = None
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    training: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    evaluation: TokenizerEvaluationConfig = field(default_factory=TokenizerEvaluationConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)


SCHEMAS = {"generator": GeneratorTrainConfig, "tokenizer": TokenizerTrainConfig}


@dataclass
class SaveConfig:
    npz: bool = True  # ADM-style samples.npz (arr_0: N x H x W x 3 uint8)
    png: bool = False  # one PNG per sample under samples/


@dataclass
class MetricsConfig:
    names: list[str] = field(default_factory=lambda: ["fid", "sfid", "isc", "kid", "prc"])
    # "inception" (torch-fidelity, FID Inception weights from a local file) or "demo_classifier" (Fashion-MNIST demo)
    feature_network: str = "inception"
    reference: str | None = None
    inception_weights: str | None = None
    demo_classifier: str | None = None
    batch_size: int = 200
    kid_subset_size: int = 1000
    allow_small_sample: bool = False


@dataclass
class SpeedConfig:
    enabled: bool = False
    warmup_batches: int = 10
    timed_batches: int = 20
    include_decoder: bool = False


@dataclass
class EvaluateConfig:
    task: str = "evaluate"
    experiment_name: str = "evaluate"
    tags: list[str] = field(default_factory=list)
    print_config: bool = True
    seed: int = 0
    ckpt_path: str | None = None  # the same as generator.checkpoint (the key train.py resumes from)
    generator: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_samples_per_class: int = 50
    classes: list[int] | None = None
    batch_size: int = 125
    device: str = "auto"
    float32_matmul_precision: str = "high"
    save: SaveConfig = field(default_factory=SaveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class AppConfig:
    """The sampler page (`python -m bar_lightning.app`): evaluate.py's model and sampling keys, plus the server's."""

    task: str = "app"
    experiment_name: str = "app"
    print_config: bool = True
    seed: int = 0  # the page's initial seed
    ckpt_path: str | None = None  # the same as generator.checkpoint, as in evaluate.py
    generator: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    float32_matmul_precision: str = "high"
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log line gives the URL)
    # Names of the classes in label order (a list, or a classes.json / one-name-per-line file); null: looked up from
    # the data the generator was trained on, else the page shows class indices.
    class_names: Any = None
    max_images: int = 64  # images per request, over every column of a guidance grid
    max_grid_columns: int = 12
    paths: PathsConfig = field(default_factory=PathsConfig)
