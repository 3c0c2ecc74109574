"""The stages of pretokenize.py around the encoder: decode and crop (stage 1), write the token files (stage 3).

Stage 1 (:class:`CropBatches`) runs in DataLoader worker processes, stage 3 (:class:`BackgroundWriter`) on a few
threads of the main process; stage 2, the encoding, is :func:`bar_lightning.pretokenize.encode_inputs`. The
pipeline is described in :mod:`bar_lightning.pretokenize`.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from bar_lightning.data.tokens import NPZ_SUFFIX, write_token_npz
from bar_lightning.pretokenize_inputs import (
    CLASS_FOLDER_DIGITS,
    adm_center_crop_array,
    check_stem,
    five_crops,
    folder_sources,
    shard_sources,
)

# One logger for the whole job: the stages log as `bar_lightning.pretokenize`, where its callers listen.
log = logging.getLogger("bar_lightning.pretokenize")
WRITE_THREADS = 4  # np.savez_compressed releases the GIL while compressing; a few threads keep up with a GPU
WRITES_IN_FLIGHT = 2 * WRITE_THREADS  # batches encoded but not yet written, at most (bounds host memory)
ITEMS_PER_RECORD = 512  # a worker reports images whose files all exist in records of at most this many


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
