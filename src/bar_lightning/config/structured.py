"""The structured-config schemas: every key a run may set and its type, but no values. Defaults live once, in the
YAML under conf/ (each group file sets every key of its section; experiment files only override). `config/schema.py`
merges the composed Hydra config into these dataclasses and checks the rules between keys; a typo, a wrong type or
a key no yaml sets stops the run with the full key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and the fix."""


@dataclass
class GeneratorModelConfig:
    """Sizes of `BARGenerator` (same names as its keyword arguments)."""

    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_tokens: int = MISSING
    bits_per_token: int = MISSING
    num_classes: int = MISSING
    patch_size: int = MISSING
    repeat_class_condition: int = MISSING
    dropout: float = MISSING
    head: str = MISSING
    head_width: int = MISSING
    head_layers: int = MISSING
    use_checkpoint: bool = MISSING


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr`, stepped once per optimiser step."""

    learning_rate: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    total_steps: int = MISSING
    end_lr: float = MISSING
    # "upstream": no decay for 1-D tensors, biases and names containing norm/ln/embed (lower-cased), as the
    # official script; "none": decay everything.
    no_decay_rule: str = MISSING
    fused: bool | None = MISSING  # None: fused AdamW on CUDA, the default kernel elsewhere


TRAINING_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class GeneratorTrainingConfig:
    class_label_dropout: float = MISSING
    # Random-order probability is 1 before `randomness_anneal_start`, 0 after `randomness_anneal_end`, linear between.
    randomness_anneal_start: int = MISSING
    randomness_anneal_end: int = MISSING
    # torch.compile the training forward/backward. None: on for CUDA devices (one GPU or DDP; 2.3x faster and 40%
    # less memory for BAR-B on an H200: 227.1 -> 532.2 img/s, 82.3 -> 49.65 GiB, docs/benchmarks.md, Training), off
    # on CPU (compilation outlasts short runs) and under FSDP (not run compiled yet); true / false force it.
    compile: bool | None = MISSING
    # torch.compile mode of the training forward/backward: "default", "reduce-overhead" (forward and backward
    # replayed as CUDA graphs: 3% faster and 1.3 GiB less for BAR-B on an H200, docs/benchmarks.md, Training) or
    # "max-autotune-no-cudagraphs" (Triton GEMM autotuning: minutes more compilation). None: "reduce-overhead" for
    # a one-device run without gradient accumulation (a replay would overwrite the accumulated gradients), otherwise
    # "default" (also under DDP, where CUDA graphs with DDP's gradient hooks are not tested yet, and when
    # compile_options are given).
    compile_mode: str | None = MISSING
    # Inductor options for that compilation (names: torch._inductor.list_options(); on the command line
    # `+training.compile_options.cpp_wrapper=true`). torch takes these or a compile_mode other than "default".
    compile_options: dict[str, Any] = MISSING
    # Pad the MBM head's MLP hidden width to a multiple of 8 (5461 -> 5464) in the training step: the same loss with
    # aligned matrix products. None: on for CUDA devices, off on CPU (where the summation order would change).
    align_head_matmuls: bool | None = MISSING
    preview_every_n_steps: int = MISSING
    preview_classes: list[int] = MISSING
    check_inputs: bool = MISSING


@dataclass
class SamplingConfig:
    """Read by training previews and by evaluate.py."""

    guidance_scale: float = MISSING
    temperature: float = MISSING
    tokens_allocation: list[int] = MISSING
    random_order: bool = MISSING
    # Speed settings of evaluate.py on a GPU (ignored on CPU). The defaults are the fast path; every one of them
    # keeps float32 results except precision=bf16 (see docs/benchmarks.md).
    cuda_graph: bool = MISSING  # replay the whole sampling loop as one CUDA graph
    compile: bool = MISSING  # torch.compile the per-step block halves and the MBM head
    precision: str = MISSING  # fp32 (official numerics, TF32 matmuls allowed) or bf16 (autocast, bf16 KV cache)


# The `data.source` values of each task; run.py builds a DataModule for each (TokenDataModule; IMAGE_DATA_SOURCES).
TOKEN_DATA_SOURCES = ("synthetic", "pretokenized")
IMAGE_DATA_SOURCES = ("webdataset", "synthetic")


@dataclass
class TokenDataConfig:
    source: str = MISSING
    root: str | None = MISSING
    batch_size: int = MISSING
    num_workers: Any = MISSING  # a count, or "auto" (see bar_lightning.io.default_num_workers)
    tokens: int = MISSING
    bits_per_token: int = MISSING
    num_classes: int = MISSING
    flip_probability: float = MISSING
    synthetic_num_samples: int = MISSING
    synthetic_noise: float = MISSING
    val_num_samples: int = MISSING
    seed: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    drop_last: bool = MISSING


@dataclass
class PreemptionConfig:
    """What a preemption signal does: save `<run dir>/checkpoints/last.ckpt` at the next step boundary, then exit.

    The exit code is distinct from success (0) and errors (1); with `requeue` and `SLURM_JOB_ID` set, the job is
    also requeued with `scontrol requeue`. See docs/reliability.md.
    """

    enabled: bool = MISSING
    signals: list[str] = MISSING
    exit_code: int = MISSING  # sysexits.h EX_TEMPFAIL: "temporary failure, try again"
    requeue: bool = MISSING
    interrupt: bool = MISSING  # Ctrl-C saves at the next step boundary too, then exits with 130 (never requeues)


@dataclass
class ModelSourceConfig:
    """A network for evaluate.py (and train.py's preview tokenizer): a checkpoint of this project, or released
    weights with their official yaml."""

    checkpoint: str | None = MISSING
    upstream_weights: str | None = MISSING
    upstream_config: str | None = MISSING


@dataclass
class PreviewConfig:
    """What the training previews are decoded with. `tokenizer`: the keys of evaluate.py's `tokenizer.*` (a
    tokenizer checkpoint of this project, or released weights with their yaml); unset, previews are bit maps."""

    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)


@dataclass
class TrainerConfig:
    """Arguments of `lightning.Trainer` that runs may set."""

    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    strategy: Any = MISSING
    precision: Any = MISSING
    max_steps: int = MISSING
    max_epochs: int | None = MISSING
    gradient_clip_val: float | None = MISSING
    gradient_clip_algorithm: str = MISSING
    accumulate_grad_batches: int = MISSING
    log_every_n_steps: int = MISSING
    val_check_interval: Any = MISSING
    check_val_every_n_epoch: int | None = MISSING
    limit_train_batches: Any = MISSING
    limit_val_batches: Any = MISSING
    num_sanity_val_steps: int = MISSING
    deterministic: Any = MISSING
    benchmark: bool | None = MISSING
    enable_progress_bar: bool = MISSING
    enable_model_summary: bool = MISSING
    fast_dev_run: Any = MISSING
    use_distributed_sampler: bool = MISSING
    sync_batchnorm: bool = MISSING
    overfit_batches: Any = MISSING  # debug=overfit: train (and validate) on this many batches (an int) or fraction
    # debug=profiler: "simple" / "advanced" (report in the log), or a profiler config with _target_ (report in a file)
    profiler: Any = MISSING


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    pretrained_dir: str = MISSING
    output_dir: str = MISSING
    log_dir: str = MISSING


@dataclass
class TrainRunConfig:
    """The keys every train.py run has, whatever its task; `GeneratorTrainConfig` and `TokenizerTrainConfig` add the
    task's own sections."""

    task: str = MISSING
    experiment_name: str = MISSING
    tags: list[str] = MISSING
    print_config: bool = MISSING
    seed: int = MISSING
    float32_matmul_precision: str = MISSING
    ckpt_path: str | None = MISSING
    # A generator over 50M parameters on a CPU-only run is refused (plain `python train.py` is BAR-B) unless true
    # (a tokenizer run carries the key, the check applies to generators).
    allow_large_model_on_cpu: bool = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    callbacks: dict[str, Any] = MISSING
    logger: dict[str, Any] = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class GeneratorTrainConfig(TrainRunConfig):
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: GeneratorTrainingConfig = field(default_factory=GeneratorTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)


@dataclass
class TokenizerLossConfig:
    """Keyword arguments of `TokenizerReconstructionLoss`; a term with weight 0 needs no pretrained file."""

    l1_weight: float = MISSING
    l2_weight: float = MISSING
    perceptual_weight: float = MISSING
    lpips_weight: float = MISSING
    convnext_weight: float = MISSING
    gram_weight: float = MISSING
    distill_weight: float = MISSING
    vgg16_weights: str | None = MISSING
    lpips_weights: str | None = MISSING
    convnext_weights: str | None = MISSING
    imagenet_input_size: int = MISSING


@dataclass
class TokenizerOptimConfig:
    learning_rate: float = MISSING
    discriminator_learning_rate: float = MISSING
    encoder_lr_multiplier: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    total_steps: int = MISSING
    end_lr: float = MISSING
    # Fused AdamW kernels (one launch per parameter group). None: on for CUDA (not under 16-mixed).
    fused: bool | None = MISSING


@dataclass
class TokenizerTrainingConfig:
    discriminator_start: int = MISSING
    gan_weight: float = MISSING
    ema: bool = MISSING
    ema_decay: float = MISSING
    gradient_clip_val: float = MISSING
    encoder_init_weights: str | None = MISSING
    # torch.compile the tokenizer's and the losses' forward (the official recipe's compile_model: true); ignored on
    # CPU and under FSDP.
    compile: bool = MISSING
    # With `compile`, also torch.compile the discriminator (the official recipe compiles it, inside its loss module);
    # off until measured against the eager discriminator (bench/tokenizer_training.py, variant compile+discriminator).
    compile_discriminator: bool = MISSING
    # torch.compile mode of the tokenizer's and the losses' forward: null (automatic: "reduce-overhead" on one GPU,
    # "default" under DDP), "default", "reduce-overhead" (replayed as CUDA graphs, one GPU only: 8.4 ms and 2.8 GiB
    # less per generator step on an H100, docs/benchmarks.md 5f; its GPU test: 5h) or "max-autotune-no-cudagraphs".
    # The discriminator keeps "default".
    compile_mode: str | None = MISSING


@dataclass
class TokenizerEvaluationConfig:
    rfid: bool = MISSING
    inception_weights: str | None = MISSING


@dataclass
class ImageDataConfig:
    """`source: webdataset` reads shards (ImageDataModule); `source: synthetic` generates images."""

    source: str = MISSING
    train_shards: str | None = MISSING
    eval_shards: str | None = MISSING
    batch_size: int = MISSING
    eval_batch_size: int | None = MISSING
    num_workers: Any = MISSING  # a count, or "auto" (see bar_lightning.io.default_num_workers)
    resize_shorter_edge: int = MISSING
    crop_size: int = MISSING
    random_crop: bool = MISSING
    random_flip: bool = MISSING
    shuffle_buffer: int = MISSING
    samples_per_epoch: int = MISSING
    seed: int = MISSING
    max_skip_rate: float = MISSING
    min_samples_for_skip_rate: int = MISSING
    pin_memory: bool | None = MISSING
    persistent_workers: bool | None = MISSING
    # Images larger than this many pixels are refused from their header (skipped in training, an error in
    # validation); null: max(4096 x 4096, 16 x crop_size²).
    max_image_pixels: int | None = MISSING
    synthetic_num_samples: int = MISSING
    synthetic_val_num_samples: int = MISSING


@dataclass
class TokenizerTrainConfig(TrainRunConfig):
    model: dict[str, Any] = MISSING
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    discriminator: dict[str, Any] | None = MISSING
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    training: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    evaluation: TokenizerEvaluationConfig = field(default_factory=TokenizerEvaluationConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)


SCHEMAS = {"generator": GeneratorTrainConfig, "tokenizer": TokenizerTrainConfig}


@dataclass
class SaveConfig:
    npz: bool = MISSING  # ADM-style samples.npz (arr_0: N x H x W x 3 uint8)
    png: bool = MISSING  # one PNG per sample under samples/


@dataclass
class MetricsConfig:
    names: list[str] = MISSING
    # "inception" (torch-fidelity, FID Inception weights from a local file) or "demo_classifier" (Fashion-MNIST demo)
    feature_network: str = MISSING
    reference: str | None = MISSING
    inception_weights: str | None = MISSING
    demo_classifier: str | None = MISSING
    batch_size: int = MISSING
    kid_subset_size: int = MISSING
    allow_small_sample: bool = MISSING


@dataclass
class SpeedConfig:
    enabled: bool = MISSING
    warmup_batches: int = MISSING
    timed_batches: int = MISSING
    include_decoder: bool = MISSING


@dataclass
class EvaluateConfig:
    task: str = MISSING
    experiment_name: str = MISSING
    tags: list[str] = MISSING
    print_config: bool = MISSING
    seed: int = MISSING
    ckpt_path: str | None = MISSING  # the same as generator.checkpoint (the key train.py resumes from)
    generator: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_samples_per_class: int = MISSING
    classes: list[int] | None = MISSING
    batch_size: int = MISSING
    overlap_decoding: bool = MISSING  # CUDA only: decoding behind the next batch's sampling
    device: str = MISSING
    float32_matmul_precision: str = MISSING
    save: SaveConfig = field(default_factory=SaveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class AppConfig:
    """The sampler page (`python -m bar_lightning.app`): evaluate.py's model and sampling keys, plus the server's."""

    task: str = MISSING
    experiment_name: str = MISSING
    print_config: bool = MISSING
    seed: int = MISSING  # the page's initial seed
    ckpt_path: str | None = MISSING  # the same as generator.checkpoint, as in evaluate.py
    generator: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    tokenizer: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = MISSING
    float32_matmul_precision: str = MISSING
    host: str = MISSING
    port: int = MISSING  # 0: any free port (the log line gives the URL)
    # Names of the classes in label order (a list, or a classes.json / one-name-per-line file); null: looked up from
    # the data the generator was trained on, else the page shows class indices.
    class_names: Any = MISSING
    max_images: int = MISSING  # images per request, over every column of a guidance grid
    max_grid_columns: int = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
