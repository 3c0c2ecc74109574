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

Modules: the inputs, crops and pixel values are in :mod:`bar_lightning.pretokenize_inputs`, stages 1 and 3 in
:mod:`bar_lightning.pretokenize_stages`; this module runs the job (stage 2, the checks of the output folder and
`metadata.json`) and re-exports their names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from bar_lightning.config.schema import ConfigError
from bar_lightning.data.shards import default_max_image_pixels, expand_shards
from bar_lightning.data.tokens import METADATA_FILENAME, NPZ_SUFFIX, write_token_metadata
from bar_lightning.distributed import hold_output_folder, join_torchrun_process_group, raise_on_every_rank
from bar_lightning.eval.sampling import load_tokenizer_from_source
from bar_lightning.io import atomic_write_json, available_cpus, default_num_workers
from bar_lightning.pretokenize_inputs import (
    CLASS_FOLDER_DIGITS,
    IMAGE_SUFFIXES,
    MAX_LABEL,
    MAX_STEM_BYTES,
    PretokenizeError,
    adm_center_crop,
    adm_center_crop_array,
    check_stem,
    five_crops,
    folder_sources,
    image_folder_files,
    iter_image_folder,
    iter_shards,
    pixel_table,
    pixels_to_images,
    shard_sources,
    to_tensor,
)
from bar_lightning.pretokenize_stages import (
    ITEMS_PER_RECORD,
    WRITE_THREADS,
    WRITES_IN_FLIGHT,
    BackgroundWriter,
    CropBatches,
    WorkerTraceback,
    _as_is,
)
from bar_lightning.provenance import model_source_record, provenance

__all__ = [
    "CLASS_FOLDER_DIGITS",
    "IMAGE_SUFFIXES",
    "ITEMS_PER_RECORD",
    "MANIFEST_FILENAME",
    "MAX_LABEL",
    "MAX_STEM_BYTES",
    "WRITES_IN_FLIGHT",
    "WRITE_THREADS",
    "BackgroundWriter",
    "CropBatches",
    "PretokenizeError",
    "WorkerTraceback",
    "adm_center_crop",
    "adm_center_crop_array",
    "check_output_folder",
    "check_stem",
    "check_token_files",
    "encode_inputs",
    "five_crops",
    "folder_sources",
    "image_folder_files",
    "iter_image_folder",
    "iter_shards",
    "pixel_table",
    "pixels_to_images",
    "resolve_num_workers",
    "run_pretokenize",
    "shard_sources",
    "to_tensor",
    "tokenizer_identity",
]

log = logging.getLogger(__name__)
MANIFEST_FILENAME = "pretokenize.json"


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
