"""Encode a dataset once with a trained tokenizer into the upstream per-image `.npz` layout.

Output (what `data=pretokenized` and the official loader read):
    <output_dir>/train/<class>/<stem>.npz   tokens, tokens_flip: bool bit arrays of length tokens * bits
    <output_dir>/metadata.json              upstream's fields, the class names, and what made the tokens
    <output_dir>/pretokenize.json           the tokenizer and settings of this folder, written at the start
Class folders are zero-padded class indices (`00042`), so their sorted order is the label order.

Each image is ADM centre-cropped to `image_size`; `tokens_flip` encodes its horizontal mirror. With `ten_crop`, the
image is resized to `ten_crop_scale * image_size` and its four corner crops and centre crop are written as
`<stem>_c{k}.npz` (each with its mirror). Runs with several processes (`torchrun --nproc_per_node N`) split the
inputs by rank; an image whose file already exists is skipped, so an interrupted run resumes where it stopped.

Inputs are read strictly (the shared shard reader, the pixel budget, training's label rule): a bad image or label,
a truncated or empty shard, or a key that occurs twice stops the run naming it, and `metadata.json` — the mark of a
complete folder — is written only when every input has its token file and nothing else is there. A folder is only
ever completed by the tokenizer (same file contents) and settings it was started with (`pretokenize.json`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bar_lightning.data.images import (
    BadSampleError,
    SkipCounter,
    SkipPolicy,
    decode_sample,
    samples_of_shard,
)
from bar_lightning.data.shards import (
    FOLDER_IMAGE_FORMATS,
    ImageTooLargeError,
    decode_image,
    default_max_image_pixels,
    expand_shards,
)
from bar_lightning.data.tokens import METADATA_FILENAME, NPZ_SUFFIX, write_token_metadata, write_token_npz
from bar_lightning.distributed import hold_output_folder, join_torchrun_process_group, raise_on_every_rank
from bar_lightning.eval.sampling import load_tokenizer_from_source
from bar_lightning.io import atomic_write_json
from bar_lightning.provenance import model_source_record, provenance

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MANIFEST_FILENAME = "pretokenize.json"
CLASS_FOLDER_DIGITS = 5  # labels 0..99999: zero-padded so the folders sort in label order
MAX_LABEL = 10**CLASS_FOLDER_DIGITS - 1
MAX_STEM_BYTES = 200  # file names are at most 255 bytes on common file systems, with room for "_c4.npz"


class PretokenizeError(ValueError):
    """The inputs or the output folder do not allow a correct pretokenization; the message says which and why."""


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: box-halve while the short side is >= 2 * size, bicubic resize, then crop the centre."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return Image.fromarray(array[top : top + size, left : left + size])


def five_crops(image: Image.Image, size: int, scale: float) -> list[Image.Image]:
    """Corner and centre crops of the image resized to `scale * size` on its short side (ten with mirrors)."""
    import torchvision.transforms.functional as TF

    resized = TF.resize(image, round(size * scale), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return list(TF.five_crop(resized, size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL (any mode) -> float `[3, H, W]` in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def iter_image_folder(root: Path, rank: int, world_size: int, *, max_image_pixels: int
                      ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of `<root>/<class>/<image>` (classes: sorted folder names), this rank's share."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_folder={root} does not exist")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.image_folder={root} has no class subfolders (expected <root>/<class>/<image>)")
    if len(classes) > MAX_LABEL + 1:
        raise PretokenizeError(f"data.image_folder={root} has {len(classes)} class folders; at most {MAX_LABEL + 1}")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    ]
    for path, label in files[rank::world_size]:
        try:
            image = decode_image(path, max_pixels=max_image_pixels, formats=FOLDER_IMAGE_FORMATS)
        except ImageTooLargeError as error:
            raise PretokenizeError(f"{path}: {error}; raise max_image_pixels if such images are wanted") from None
        except Exception as error:  # PIL raises many types
            raise PretokenizeError(f"{path} does not decode ({type(error).__name__}: {error}); fix or remove it") from None
        yield path.stem, label, image


def iter_shards(spec: Any, rank: int, world_size: int, *, max_image_pixels: int
                ) -> Iterator[tuple[str, int, Image.Image]]:
    """`(stem, label, RGB image)` of every sample of this rank's shards, read strictly by the shared reader.

    Whole shards per rank: every image is encoded by exactly one process.
    """
    policy = SkipPolicy(counter=SkipCounter(), strict=True)
    for shard in expand_shards(spec)[rank::world_size]:
        for sample in samples_of_shard(shard, policy=policy, max_image_pixels=max_image_pixels):
            image, label = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
            if label > MAX_LABEL:
                raise BadSampleError(
                    f"bad_label: sample {sample['__key__']!r} in shard {shard.url}: label {label} is above {MAX_LABEL} "
                    f"(class folders have {CLASS_FOLDER_DIGITS} digits)"
                )
            yield str(sample["__key__"]).replace("/", "_"), label, image


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


def run_pretokenize(cfg: DictConfig) -> dict[str, Any]:
    """Encode `cfg.data` into `cfg.output_dir`; returns the metadata that is written.

    The output folder is held by this job (`run.lock`): a second pretokenize.py in it stops at once.
    """
    rank, world_size = join_torchrun_process_group()
    output = Path(cfg.output_dir)
    with hold_output_folder(output, purpose="pretokenize.py", rank=rank, world_size=world_size,
                            recursive_cleanup=True):
        return _pretokenize(cfg, rank=rank, world_size=world_size, output=output)


def _pretokenize(cfg: DictConfig, *, rank: int, world_size: int, output: Path) -> dict[str, Any]:
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
    if cfg.data.get("shards"):
        images = iter_shards(cfg.data.shards, rank, world_size, max_image_pixels=max_image_pixels)
    else:
        images = iter_image_folder(Path(cfg.data.image_folder), rank, world_size, max_image_pixels=max_image_pixels)

    written = present = 0
    first_seen: dict[str, int] = {}  # stem -> label, this rank's inputs
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        batch = torch.stack([image for _, image in pending]).to(device)
        with torch.no_grad():
            bits = tokenizer.encode_bits(batch).cpu().numpy().astype(bool)
            bits_flip = tokenizer.encode_bits(torch.flip(batch, dims=[-1])).cpu().numpy().astype(bool)
        for (path, _), tokens, tokens_flip in zip(pending, bits, bits_flip):
            write_token_npz(path, tokens, tokens_flip)
        written += len(pending)
        pending.clear()

    for stem, label, image in images:
        if len(stem.encode("utf-8")) > MAX_STEM_BYTES:
            raise PretokenizeError(f"the input key {stem[:60]!r}... is {len(stem.encode())} bytes long; token files are "
                                   f"named by their key, at most {MAX_STEM_BYTES} bytes: shorten the keys")
        if stem in first_seen:
            raise PretokenizeError(
                f"the input key {stem!r} occurs twice (labels {first_seen[stem]} and {label}): one token file per "
                "image; remove the duplicate from the inputs"
            )
        first_seen[stem] = label
        class_dir = output / "train" / f"{label:0{CLASS_FOLDER_DIGITS}d}"
        crops = five_crops(image, size, cfg.ten_crop_scale) if cfg.ten_crop else [adm_center_crop(image, size)]
        for index, crop in enumerate(crops):
            path = class_dir / (f"{stem}_c{index}{NPZ_SUFFIX}" if cfg.ten_crop else f"{stem}{NPZ_SUFFIX}")
            if path.is_file():
                present += 1  # written by an earlier attempt of this folder (same tokenizer: pretokenize.json)
                continue
            pending.append((path, to_tensor(crop)))
            if len(pending) >= cfg.batch_size:
                flush()
    flush()

    counts = torch.tensor([written, present], device=device)  # NCCL reduces CUDA tensors only
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
