"""Encode a dataset once with a trained tokenizer into the upstream per-image `.npz` layout.

Output (what `data=pretokenized` and the official loader read):
    <output_dir>/train/<class>/<stem>.npz   tokens, tokens_flip: bool bit arrays of length tokens * bits
    <output_dir>/metadata.json              upstream's fields, the class names, and what made the tokens
    <output_dir>/pretokenize.json           the tokenizer and settings of this folder, written at the start
Class folders are zero-padded class indices (`00042`), so their sorted order is the label order.

Each image is ADM centre-cropped to `image_size`; `tokens_flip` encodes its horizontal mirror. With `ten_crop`, the
image is resized to `ten_crop_scale * image_size` and its four corner crops and centre crop are written as
`<stem>_c{k}.npz` (each with its mirror). Runs with several processes (`torchrun --nproc_per_node N`) split the
inputs by rank; an image whose files already exist is skipped without being decoded, so an interrupted run resumes
where it stopped.

Pipeline. The job is meant to keep the accelerator busy: three stages run at the same time.
  1. `num_workers` DataLoader worker processes (`auto`: the CPU cores of this machine per pretokenize process,
     `bar_lightning.io.default_num_workers`) read and decode the images, crop them and pack the crops into batches
     of `batch_size` uint8 `[B, H, W, 3]` arrays (a quarter of the bytes of float pixels to move between processes,
     pin and copy to the GPU). The inputs of this rank are split between the workers deterministically: whole shards
     (`shards[rank::world][worker::num_workers]`), or image files likewise. A worker first looks for the files an
     image would get and decodes it only if one is missing; it still reports every image's key and label, so the
     checks below see all inputs. `num_workers=0` runs this stage in the main process (same files).
  2. The main process takes the batches in a fixed order (round robin over the workers), checks every key (once
     over the inputs of this rank), copies the pixels to the device (pinned memory, `non_blocking`), maps them to
     [-1, 1] with a 256-entry table (the same float32 values as `to_tensor`) and encodes the batch and its mirror.
     A short last batch is padded to `batch_size`, so every batch the encoder sees has one shape: the bits of an
     image do not depend on which other images share its batch, hence not on `num_workers` either.
  3. A few writer threads write the `.npz` files (atomically, `write_token_npz`) while the next batch is encoded; at
     most a few batches wait for them, and a failed write stops the run with its error. Every write has finished
     before the files are counted and `metadata.json` is written.

Inputs are read strictly (the shared shard reader, the pixel budget, training's label rule): a bad image or label,
a truncated or empty shard, or a key that occurs twice stops the run naming it (an error in a worker is raised in
the main process with its type and message; the batches decoded before it are still encoded and written), and
`metadata.json` — the mark of a complete folder — is written only when every input has its token file and nothing
else is there. A folder is only ever completed by the tokenizer (same file contents) and settings it was started
with (`pretokenize.json`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bar_lightning.config.schema import ConfigError
from bar_lightning.data.images import (
    BadSampleError,
    SkipCounter,
    SkipPolicy,
    decode_sample,
    samples_of_shard,
)
from bar_lightning.data.shards import (
    FOLDER_IMAGE_FORMATS,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    ImageTooLargeError,
    OversizedMember,
    Shard,
    decode_image,
    default_max_image_pixels,
    expand_shards,
    parse_label,
)
from bar_lightning.data.tokens import METADATA_FILENAME, NPZ_SUFFIX, write_token_metadata, write_token_npz
from bar_lightning.distributed import hold_output_folder, join_torchrun_process_group, raise_on_every_rank
from bar_lightning.eval.sampling import load_tokenizer_from_source
from bar_lightning.io import atomic_write_json, available_cpus, default_num_workers
from bar_lightning.provenance import model_source_record, provenance

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MANIFEST_FILENAME = "pretokenize.json"
CLASS_FOLDER_DIGITS = 5  # labels 0..99999: zero-padded so the folders sort in label order
MAX_LABEL = 10**CLASS_FOLDER_DIGITS - 1
MAX_STEM_BYTES = 200  # file names are at most 255 bytes on common file systems, with room for "_c4.npz"
WRITE_THREADS = 4  # np.savez_compressed releases the GIL while compressing; a few threads keep up with a GPU
WRITES_IN_FLIGHT = 2 * WRITE_THREADS  # batches encoded but not yet written, at most (bounds host memory)
ITEMS_PER_RECORD = 512  # a worker reports images whose files all exist in records of at most this many


class PretokenizeError(ValueError):
    """The inputs or the output folder do not allow a correct pretokenization; the message says which and why."""


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: box-halve while the short side is >= 2 * size, bicubic resize, then crop the centre."""
    return Image.fromarray(adm_center_crop_array(image, size))


def adm_center_crop_array(image: Image.Image, size: int) -> np.ndarray:
    """`adm_center_crop` as a `[size, size, channels]` uint8 array (a view: no copy of the crop)."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def five_crops(image: Image.Image, size: int, scale: float) -> list[Image.Image]:
    """Corner and centre crops of the image resized to `scale * size` on its short side (ten with mirrors)."""
    import torchvision.transforms.functional as TF

    resized = TF.resize(image, round(size * scale), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return list(TF.five_crop(resized, size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL (any mode) -> float `[3, H, W]` in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def pixel_table() -> torch.Tensor:
    """float32 `[256]`: the value `to_tensor` gives each uint8 pixel value (the same numpy operations, so equal)."""
    return torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0)


def pixels_to_images(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` -> float `[B, 3, H, W]` in [-1, 1], on the device of both, equal to `to_tensor`."""
    return table[pixels.long()].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Inputs: (stem, label, load) with the decoding deferred, so that an image whose files exist is never decoded
# --------------------------------------------------------------------------------------------------------------


def image_folder_files(root: Path) -> list[tuple[str, int]]:
    """`(path, label)` of every image of `<root>/<class>/<image>` (classes: sorted folder names), in order."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_folder={root} does not exist")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.image_folder={root} has no class subfolders (expected <root>/<class>/<image>)")
    if len(classes) > MAX_LABEL + 1:
        raise PretokenizeError(f"data.image_folder={root} has {len(classes)} class folders; at most {MAX_LABEL + 1}")
    return [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    ]


def _decode_file(path: Path, max_image_pixels: int) -> Image.Image:
    try:
        return decode_image(path, max_pixels=max_image_pixels, formats=FOLDER_IMAGE_FORMATS)
    except ImageTooLargeError as error:
        raise PretokenizeError(f"{path}: {error}; raise max_image_pixels if such images are wanted") from None
    except Exception as error:  # PIL raises many types
        raise PretokenizeError(f"{path} does not decode ({type(error).__name__}: {error}); fix or remove it") from None


def folder_sources(files: Sequence[tuple[str, int]], *, max_image_pixels: int
                   ) -> Iterator[tuple[str, int, Callable[[], Image.Image]]]:
    """`(stem, label, load)` of image files; `load()` decodes the image (errors name the file)."""
    for name, label in files:
        path = Path(name)
        yield path.stem, label, functools.partial(_decode_file, path, max_image_pixels)


def _well_formed_label(sample: dict[str, Any]) -> int | None:
    """The label of a sample that has an image and a readable label (what `decode_sample` checks before decoding),
    or None: then `decode_sample` is asked, and names the problem exactly as everywhere else."""
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
    label = sample.get(LABEL_EXTENSION)
    if image_extension is None or label is None:
        return None
    if isinstance(sample[image_extension], OversizedMember) or isinstance(label, OversizedMember):
        return None
    try:
        return parse_label(label)
    except ValueError:
        return None


def _decode_sample_image(sample: dict[str, Any], policy: SkipPolicy, max_image_pixels: int) -> Image.Image:
    decoded = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
    if decoded is None:  # pragma: no cover - a strict policy raises instead
        raise BadSampleError(f"sample {sample['__key__']!r} in shard {sample['__url__']} was refused")
    return decoded[0]


def _given(image: Image.Image) -> Image.Image:
    return image


def shard_sources(shards: Sequence[Shard], *, max_image_pixels: int
                  ) -> Iterator[tuple[str, int, Callable[[], Image.Image]]]:
    """`(stem, label, load)` of every sample of `shards`, read strictly by the shared reader; `load()` decodes."""
    policy = SkipPolicy(counter=SkipCounter(), strict=True)
    for shard in shards:
        for sample in samples_of_shard(shard, policy=policy, max_image_pixels=max_image_pixels):
            label = _well_formed_label(sample)
            if label is None:  # raises (strict): the shared decoder names what is wrong
                image, label = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
                load: Callable[[], Image.Image] = functools.partial(_given, image)
            else:
                load = functools.partial(_decode_sample_image, sample, policy, max_image_pixels)
            if label > MAX_LABEL:
                raise BadSampleError(
                    f"bad_label: sample {sample['__key__']!r} in shard {shard.url}: label {label} is above {MAX_LABEL} "
                    f"(class folders have {CLASS_FOLDER_DIGITS} digits)"
                )
            yield str(sample["__key__"]).replace("/", "_"), label, load


def iter_image_folder(root: Path, rank: int, world_size: int, *, max_image_pixels: int
                      ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of `<root>/<class>/<image>` (classes: sorted folder names), this rank's share."""
    files = image_folder_files(root)[rank::world_size]
    for stem, label, load in folder_sources(files, max_image_pixels=max_image_pixels):
        yield stem, label, load()


def iter_shards(spec: Any, rank: int, world_size: int, *, max_image_pixels: int
                ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of every sample of this rank's shards, read strictly by the shared reader.

    Whole shards per rank: every image is encoded by exactly one process.
    """
    for stem, label, load in shard_sources(expand_shards(spec)[rank::world_size], max_image_pixels=max_image_pixels):
        yield stem, label, load()


def check_stem(stem: str) -> None:
    if len(stem.encode("utf-8")) > MAX_STEM_BYTES:
        raise PretokenizeError(f"the input key {stem[:60]!r}... is {len(stem.encode())} bytes long; token files are "
                               f"named by their key, at most {MAX_STEM_BYTES} bytes: shorten the keys")


# --------------------------------------------------------------------------------------------------------------
# Stage 1: decode and crop (DataLoader workers)
# --------------------------------------------------------------------------------------------------------------


def _as_is(record: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate function: records are batched by the dataset already."""
    return record


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives the trip to the main process (pickle) with its type and message, else a RuntimeError
    with both in its message."""
    try:
        clone = pickle.loads(pickle.dumps(error))
        if type(clone) is type(error) and str(clone) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any failure to pickle means: send a plain copy
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


class WorkerTraceback(Exception):
    """Where in a DataLoader worker an error was raised (the `__cause__` of the error raised in the main process)."""


class CropBatches(IterableDataset):
    """Records of this rank's inputs, each `{"items", "paths", "pixels", "error", "traceback"}`:

    * `items`: `(stem, label, crops already present)` of every image taken in this record, in input order;
    * `paths`, `pixels`: the token files still to write and their crops, uint8 `[n, size, size, 3]` (n <= batch);
      an image's crops may continue in the worker's next record;
    * `error`: an exception that stopped this worker's inputs (after the items and crops before it), else None.

    Worker `w` of `n` takes units (shards or files) `w::n` of this rank's units, in order.
    """

    def __init__(self, *, units: Sequence[Any], shards: bool, output: str, image_size: int, ten_crop: bool,
                 ten_crop_scale: float, max_image_pixels: int, batch_size: int) -> None:
        super().__init__()
        self.units, self.shards, self.output = list(units), shards, Path(output)
        self.image_size, self.ten_crop, self.ten_crop_scale = image_size, ten_crop, ten_crop_scale
        self.max_image_pixels, self.batch_size = max_image_pixels, batch_size

    def crop_paths(self, stem: str, label: int) -> list[Path]:
        class_dir = self.output / "train" / f"{label:0{CLASS_FOLDER_DIGITS}d}"
        if self.ten_crop:
            return [class_dir / f"{stem}_c{index}{NPZ_SUFFIX}" for index in range(5)]
        return [class_dir / f"{stem}{NPZ_SUFFIX}"]

    def crops(self, image: Image.Image) -> list[np.ndarray]:
        if self.ten_crop:
            return [np.asarray(crop.convert("RGB")) for crop in five_crops(image, self.image_size, self.ten_crop_scale)]
        if image.mode != "RGB":
            image = image.convert("RGB")
        return [adm_center_crop_array(image, self.image_size)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        units = self.units[worker::workers]
        sources = (shard_sources(units, max_image_pixels=self.max_image_pixels) if self.shards else
                   folder_sources(units, max_image_pixels=self.max_image_pixels))
        size = self.image_size
        items: list[tuple[str, int, int]] = []
        paths: list[str] = []
        pixels = torch.empty((self.batch_size, size, size, 3), dtype=torch.uint8)

        def record(error: BaseException | None = None) -> dict[str, Any]:
            nonlocal items, paths, pixels
            taken = {"items": items, "paths": paths, "pixels": pixels[: len(paths)] if paths else None,
                     "error": None, "traceback": None}
            if error is not None:
                taken["error"] = error if info is None else _portable(error)
                taken["traceback"] = None if info is None else "".join(traceback.format_exception(error))
            if paths:  # the pixels leave with the record: the next crops go to a new buffer
                pixels = torch.empty((self.batch_size, size, size, 3), dtype=torch.uint8)
            items, paths = [], []
            return taken

        buffer = pixels.numpy()  # the crops are written straight into the tensor that is sent
        try:
            for stem, label, load in sources:
                check_stem(stem)  # before any file name is made of it
                crop_paths = self.crop_paths(stem, label)
                missing = [index for index, path in enumerate(crop_paths) if not path.is_file()]
                # Files present were written by an earlier attempt of this folder (same tokenizer: pretokenize.json).
                items.append((stem, label, len(crop_paths) - len(missing)))
                if missing:
                    crops = self.crops(load())
                    for index in missing:
                        buffer[len(paths)] = crops[index]
                        paths.append(str(crop_paths[index]))
                        if len(paths) == self.batch_size:
                            yield record()
                            buffer = pixels.numpy()
                if len(items) >= ITEMS_PER_RECORD:  # many images whose files exist: report them
                    yield record()
                    buffer = pixels.numpy()
        except Exception as error:  # noqa: BLE001 - raised by the main process, after what came before it
            yield record(error)
            return
        if items or paths:
            yield record()


# --------------------------------------------------------------------------------------------------------------
# Stage 3: background writes
# --------------------------------------------------------------------------------------------------------------


def _write_batch(paths: Sequence[str], bits: np.ndarray, bits_flip: np.ndarray) -> None:
    for path, tokens, tokens_flip in zip(paths, bits, bits_flip):
        write_token_npz(path, tokens, tokens_flip)


class BackgroundWriter:
    """Writes batches of token files on a few threads; at most `in_flight` batches wait. `submit` raises the error
    of a failed write as soon as it is seen, `finish` waits for every write (and raises the first error)."""

    def __init__(self, *, threads: int = WRITE_THREADS, in_flight: int = WRITES_IN_FLIGHT) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pretokenize-write")
        self.in_flight = in_flight
        self.pending: deque[Future[None]] = deque()

    def submit(self, paths: Sequence[str], bits: np.ndarray, bits_flip: np.ndarray) -> None:
        self.pending.append(self.pool.submit(_write_batch, paths, bits, bits_flip))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.in_flight):
            self.pending.popleft().result()

    def finish(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        """Let the queued writes end (their files are complete tokens of this run), then stop the threads. Called
        after `finish`, or while another error is raised: then a failed write is only logged."""
        for future in self.pending:
            if future.exception() is not None:
                log.warning("a token file write failed while the run stopped: %s", future.exception())
        self.pending.clear()
        self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------


def tokenizer_identity(cfg: DictConfig, tokenizer: torch.nn.Module) -> dict[str, Any]:
    """What decides the content of every token file: the tokenizer's files (by hash) and the encoding settings."""
    files = model_source_record(cfg.tokenizer)
    return {
        "tokenizer_sha256": {key: record["sha256"] for key, record in files.items()},
        "bits_per_token": int(tokenizer.bits_per_token),
        "num_tokens": int(tokenizer.num_tokens),
        "image_size": int(tokenizer.image_size),
        "ten_crop": bool(cfg.ten_crop),
        "ten_crop_scale": float(cfg.ten_crop_scale) if cfg.ten_crop else None,
    }


def resolve_num_workers(value: Any) -> int:
    """`num_workers`: a count >= 0, or `auto` (the CPU cores of this machine per pretokenize process)."""
    if value == "auto":
        return default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f"num_workers={value!r}: use a count >= 0 (0 decodes the images in the main process) or auto "
                      f"(the CPU cores of this machine per pretokenize process, here {available_cpus()} cores)")


def run_pretokenize(cfg: DictConfig) -> dict[str, Any]:
    """Encode `cfg.data` into `cfg.output_dir`; returns the metadata that is written.

    The output folder is held by this job (`run.lock`): a second pretokenize.py in it stops at once.
    """
    num_workers = resolve_num_workers(cfg.get("num_workers", "auto"))
    rank, world_size = join_torchrun_process_group()
    output = Path(cfg.output_dir)
    with hold_output_folder(output, purpose="pretokenize.py", rank=rank, world_size=world_size,
                            recursive_cleanup=True):
        return _pretokenize(cfg, rank=rank, world_size=world_size, output=output, num_workers=num_workers)


def _pretokenize(cfg: DictConfig, *, rank: int, world_size: int, output: Path, num_workers: int) -> dict[str, Any]:
    distributed = world_size > 1 and torch.distributed.is_initialized()
    if not cfg.data.get("shards") and not cfg.data.get("image_folder"):
        raise ValueError("give data.shards=<shards: pattern, folder or index file> or data.image_folder=<folder of "
                         "class folders>")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    tokenizer = load_tokenizer_from_source(cfg.tokenizer, decode_only=False).to(device).eval()
    identity = tokenizer_identity(cfg, tokenizer)

    if cfg.overwrite and rank == 0:
        # Start over: only the files this script writes are removed.
        shutil.rmtree(output / "train", ignore_errors=True)
        for name in (METADATA_FILENAME, MANIFEST_FILENAME):
            (output / name).unlink(missing_ok=True)
    refusal = check_output_folder(output, identity) if rank == 0 else None
    raise_on_every_rank(refusal, world_size=world_size)
    if (output / METADATA_FILENAME).is_file():
        log.info("%s/%s exists: pretokenization already complete (overwrite=true to redo)", output, METADATA_FILENAME)
        return json.loads((output / METADATA_FILENAME).read_text())
    if rank == 0 and not (output / MANIFEST_FILENAME).is_file():
        atomic_write_json(output / MANIFEST_FILENAME, {"identity": identity}, indent=2)
    if distributed:
        torch.distributed.barrier()

    size = tokenizer.image_size
    max_image_pixels = cfg.get("max_image_pixels") or default_max_image_pixels(size)
    from_shards = bool(cfg.data.get("shards"))
    # Whole shards (or files) per rank: every image is encoded by exactly one process.
    units: list[Any] = (expand_shards(cfg.data.shards) if from_shards else
                        image_folder_files(Path(cfg.data.image_folder)))[rank::world_size]
    counts = encode_inputs(
        CropBatches(units=units, shards=from_shards, output=str(output), image_size=size, ten_crop=bool(cfg.ten_crop),
                    ten_crop_scale=float(cfg.ten_crop_scale), max_image_pixels=max_image_pixels,
                    batch_size=int(cfg.batch_size)),
        tokenizer, device=device, batch_size=int(cfg.batch_size), num_workers=min(num_workers, len(units)),
    )

    counts = torch.tensor(counts, device=device)  # NCCL reduces CUDA tensors only
    if distributed:
        torch.distributed.all_reduce(counts)  # also makes rank 0 wait until every rank has written its files
    expected = int(counts.sum())
    metadata: dict[str, Any] = {}
    problem = None
    if rank == 0:
        try:
            class_folders, found = check_token_files(output, expected=expected)
            metadata = {
                "num_samples": found,
                "img_size": size,
                "codebook_size": 2**tokenizer.bits_per_token,
                "token_size": tokenizer.bits_per_token,
                "num_tokens": tokenizer.num_tokens,
                "levels_per_channel": 2,
                "token_dtype": "bool",
                "ten_crop": bool(cfg.ten_crop),
                "class_folders": class_folders,
                "num_classes": len(class_folders),
                "tokenizer_identity": identity,
                "provenance": provenance(cfg, inputs={"tokenizer": model_source_record(cfg.tokenizer),
                                                      "data": OmegaConf.to_container(cfg.data, resolve=True)}),
            }
            write_token_metadata(output, **metadata)
            log.info("encoded %d images (%d already present) into %s", int(counts[0]), int(counts[1]), output)
        except PretokenizeError as error:
            problem = error
    raise_on_every_rank(problem, world_size=world_size)
    return metadata


def encode_inputs(batches: CropBatches, tokenizer: torch.nn.Module, *, device: torch.device, batch_size: int,
                  num_workers: int) -> list[int]:
    """Decode (workers), encode (here) and write (threads) every input of `batches`; returns `[written, present]`
    token files. Every write has finished when it returns, also when it raises."""
    log.info("pretokenizing with %d DataLoader worker(s), batches of %d on %s", num_workers, batch_size, device)
    loader = DataLoader(batches, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    table = pixel_table().to(device)
    written = present = 0
    first_seen: dict[str, int] = {}  # stem -> label, this rank's inputs

    def encode(pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        count = pixels.shape[0]
        pixels = pixels.to(device, non_blocking=True)
        if count < batch_size:  # one shape for every batch: an image's bits do not depend on its batch
            pixels = torch.cat([pixels, pixels.new_zeros((batch_size - count, *pixels.shape[1:]))])
        images = pixels_to_images(pixels, table)
        with torch.no_grad():
            bits = tokenizer.encode_bits(images)
            bits_flip = tokenizer.encode_bits(torch.flip(images, dims=[-1]))
        # 0/1 -> bool on the device: an eighth of the int64 bytes to copy back
        return bits[:count].bool().cpu().numpy(), bits_flip[:count].bool().cpu().numpy()

    records = iter(loader)  # starts the workers (before the writer's threads: fork copies no running thread)
    writer = BackgroundWriter()
    try:
        for record in records:
            for stem, label, crops_present in record["items"]:
                if stem in first_seen:
                    raise PretokenizeError(
                        f"the input key {stem!r} occurs twice (labels {first_seen[stem]} and {label}): one token file "
                        "per image; remove the duplicate from the inputs"
                    )
                first_seen[stem] = label
                present += crops_present
            if record["paths"]:
                writer.submit(record["paths"], *encode(record["pixels"]))
                written += len(record["paths"])
            if record["error"] is not None:
                error = record["error"]
                if record["traceback"]:
                    raise error from WorkerTraceback(f"raised in a DataLoader worker:\n{record['traceback']}")
                raise error
        writer.finish()
    finally:
        shutdown = getattr(records, "_shutdown_workers", None)  # now, not when the iterator is collected
        if shutdown is not None:
            shutdown()
        writer.close()
    return [written, present]


def check_output_folder(output: Path, identity: dict[str, Any]) -> PretokenizeError | None:
    """Why `output` must not be (re)used for these tokens, or None: tokens of another tokenizer or settings, or of
    unknown origin, are never mixed with these."""
    manifest_path = output / MANIFEST_FILENAME
    recorded = None
    for path in (manifest_path, output / METADATA_FILENAME):
        if path.is_file():
            try:
                recorded = json.loads(path.read_text()).get("identity" if path == manifest_path else "tokenizer_identity")
            except (OSError, ValueError, AttributeError):
                return PretokenizeError(f"{path} is unreadable; use another output_dir or overwrite=true to start over")
            if recorded is not None:
                break
    if recorded is None:
        if (output / METADATA_FILENAME).is_file():
            return None  # complete, written before folders recorded their tokenizer (or by the official script)
        if (output / "train").is_dir() and any((output / "train").iterdir()):
            return PretokenizeError(
                f"output_dir={output} holds token files (train/) but no record of the tokenizer that made them "
                f"({MANIFEST_FILENAME}); they cannot be completed with these. Use another output_dir, or overwrite=true "
                "to delete them and start over"
            )
        return None
    if recorded != identity:
        differences = [f"{key}: {recorded.get(key)!r} there, {identity.get(key)!r} now"
                       for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
        return PretokenizeError(
            f"output_dir={output} was started with another tokenizer or settings ({'; '.join(differences)}); its token "
            "files must not be mixed with these. Use another output_dir, or overwrite=true to start over"
        )
    return None


def check_token_files(output: Path, *, expected: int) -> tuple[list[str], int]:
    """The class folders and the number of token files, after checking that every input has exactly one file.

    More files than inputs means files from another input set or a key in two classes; fewer means a key that
    occurred twice (its second image was dropped). Either way the folder is not complete.
    """
    train = output / "train"
    if expected == 0:
        raise PretokenizeError("the inputs hold no images: nothing to pretokenize (check data.shards / data.image_folder)")
    class_folders = sorted(entry.name for entry in os.scandir(train) if entry.is_dir()) if train.is_dir() else []
    classes_of_stem: dict[str, list[str]] = {}
    found = 0
    for folder in class_folders:
        for entry in os.scandir(train / folder):
            if entry.name.endswith(NPZ_SUFFIX) and entry.is_file():
                found += 1
                classes_of_stem.setdefault(entry.name, []).append(folder)
    in_two = {stem: folders for stem, folders in classes_of_stem.items() if len(folders) > 1}
    if in_two:
        stem, folders = next(iter(sorted(in_two.items())))
        raise PretokenizeError(
            f"{len(in_two)} key(s) have token files in more than one class (e.g. {stem} in {folders}): a key occurs "
            "twice in the inputs with different labels; fix the inputs, then overwrite=true"
        )
    if found != expected:
        raise PretokenizeError(
            f"{train} holds {found} token files but the inputs give {expected}: "
            + ("keys occur twice in the inputs (across shards or ranks)" if found < expected else
               "files from another input set are there")
            + "; fix the inputs or use another output_dir, then overwrite=true. metadata.json was not written"
        )
    return class_folders, found
