"""Encode a dataset once with a trained tokenizer into the upstream per-image `.npz` layout.

Output (what `data=pretokenized` and the official loader read):
    <output_dir>/train/<class>/<stem>.npz   tokens, tokens_flip: bool bit arrays of length tokens * bits
    <output_dir>/metadata.json
Class folders are zero-padded class indices (`00042`), so their sorted order is the label order.

Each image is ADM centre-cropped to `image_size`; `tokens_flip` encodes its horizontal mirror. With `ten_crop`, the
image is resized to `ten_crop_scale * image_size` and its four corner crops and centre crop are written as
`<stem>_c{k}.npz` (each with its mirror). Runs with several processes (`torchrun --nproc_per_node N`) split the
inputs by rank; an image whose file already exists is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bar_lightning.data.tokens import write_token_metadata, write_token_npz
from bar_lightning.distributed import join_torchrun_process_group

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


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


def iter_image_folder(root: Path, rank: int, world_size: int) -> Iterator[tuple[str, int, Image.Image]]:
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.image_folder={root} has no class subfolders (expected <root>/<class>/<image>)")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    for path, label in files[rank::world_size]:
        with Image.open(path) as image:
            yield path.stem, label, image.convert("RGB")


def iter_shards(pattern: str, rank: int, world_size: int) -> Iterator[tuple[str, int, Image.Image]]:
    import webdataset as wds

    shards = wds.shardlists.expand_urls(pattern)
    missing = [shard for shard in shards if "://" not in shard and not Path(shard).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"data.shards={pattern!r}: shard files not found ({missing[:3] or 'none matched'})")
    # Whole shards per rank: every image is encoded by exactly one process.
    dataset = wds.WebDataset(shards[rank::world_size], shardshuffle=False, empty_check=False).decode("pil")
    for sample in dataset:
        image = sample.get("jpg", sample.get("png", sample.get("jpeg")))
        if image is None or "cls" not in sample:
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} lacks an image or a cls label")
        key = str(sample["__key__"]).replace("/", "_")
        yield key, int(sample["cls"]), image.convert("RGB")


def load_tokenizer_for_encoding(source: DictConfig) -> torch.nn.Module:
    if source.get("checkpoint"):
        from bar_lightning.lightning.tokenizer_module import TokenizerModule

        path = Path(source.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.checkpoint={path} does not exist (a checkpoint written by train.py)")
        return TokenizerModule.load_tokenizer(path, use_ema=True)
    from bar_lightning.compat.upstream import load_tokenizer

    config_path, weights = Path(source.upstream_config or ""), Path(source.upstream_weights or "")
    for key, path in (("upstream_config", config_path), ("upstream_weights", weights)):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.{key}={path} does not exist")
    return load_tokenizer(OmegaConf.to_container(OmegaConf.load(config_path)), weights)


def run_pretokenize(cfg: DictConfig) -> dict[str, Any]:
    """Encode `cfg.data` into `cfg.output_dir`; returns the metadata that is written."""
    rank, world_size = join_torchrun_process_group()
    output = Path(cfg.output_dir)
    if (output / "metadata.json").is_file() and not cfg.overwrite:
        log.info("%s/metadata.json exists: pretokenization already complete (overwrite=true to redo)", output)
        return json.loads((output / "metadata.json").read_text())
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    tokenizer = load_tokenizer_for_encoding(cfg.tokenizer).to(device).eval()
    size = tokenizer.image_size
    if cfg.data.get("shards"):
        images = iter_shards(cfg.data.shards, rank, world_size)
    elif cfg.data.get("image_folder"):
        images = iter_image_folder(Path(cfg.data.image_folder), rank, world_size)
    else:
        raise ValueError("give data.shards=<webdataset pattern> or data.image_folder=<folder of class folders>")

    written = skipped = 0
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
        class_dir = output / "train" / f"{label:05d}"
        crops = five_crops(image, size, cfg.ten_crop_scale) if cfg.ten_crop else [adm_center_crop(image, size)]
        for index, crop in enumerate(crops):
            path = class_dir / (f"{stem}_c{index}.npz" if cfg.ten_crop else f"{stem}.npz")
            if path.is_file():
                skipped += 1
                continue
            pending.append((path, to_tensor(crop)))
            if len(pending) >= cfg.batch_size:
                flush()
    flush()

    counts = torch.tensor([written, skipped], device=device)  # NCCL reduces CUDA tensors only
    distributed = world_size > 1 and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(counts)  # also makes rank 0 wait until every rank has written its files
    metadata = {
        "num_samples": int(sum(1 for _ in (output / "train").rglob("*.npz"))) if rank == 0 else None,
        "img_size": size,
        "codebook_size": 2**tokenizer.bits_per_token,
        "token_size": tokenizer.bits_per_token,
        "num_tokens": tokenizer.num_tokens,
        "levels_per_channel": 2,
        "token_dtype": "bool",
        "ten_crop": bool(cfg.ten_crop),
    }
    if rank == 0:
        write_token_metadata(output, **metadata)
        log.info("encoded %d images (%d already present) into %s", int(counts[0]), int(counts[1]), output)
    if distributed:
        torch.distributed.barrier()
    return metadata

