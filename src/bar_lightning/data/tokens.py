"""Token datasets for the BAR generator: pretokenized `.npz` folders (upstream layout) and synthetic bits.

Every dataset item is a dict ``{"bits": int64[N], "label": int64 scalar, "key": str}`` where ``N =
tokens * bits_per_token`` and the bits are token-major, bit-minor, values 0/1.

Upstream pretokenized layout (official BAR ``scripts/pretokenization.py``)::

    <root>/metadata.json                 # num_samples, img_size, token_size, token_dtype, storage_keys, ...
    <root>/train/<class_folder>/<stem>.npz   # keys "tokens", "tokens_flip": bool[N]

Class indices are the positions of the class folders in sorted order, as in torchvision's ``DatasetFolder``.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bar_lightning.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

TOKEN_KEY = "tokens"
FLIP_TOKEN_KEY = "tokens_flip"
STORAGE_KEYS = (TOKEN_KEY, FLIP_TOKEN_KEY)
METADATA_FILENAME = "metadata.json"
NPZ_SUFFIX = ".npz"
# Far above any model (BAR-L at 512 px: 1024 tokens x 16 bits); a file claiming more is refused unread.
MAX_BITS_PER_IMAGE = 1 << 20

# Distinct stream tags so that flip choices, prototypes and sample noise never share a random stream
# even when their integer coordinates coincide.
_FLIP_STREAM = 0x464C4950  # "FLIP"
_PROTOTYPE_STREAM = 0x50524F54  # "PROT"
_SAMPLE_STREAM = 0x53414D50  # "SAMP"

_NO_DATA_HINT = (
    "Run the pretokenization step to create it, or use the synthetic dataset (source='synthetic') "
    "for tests and tiny experiments."
)


def _derived_seed(*coordinates: int) -> int:
    """A 63-bit seed derived from integer coordinates; well mixed, so neighbouring coordinates are independent."""
    for value in coordinates:
        if value < 0:
            raise ValueError(f"seed coordinates must be non-negative integers, got {coordinates}")
    state = np.random.SeedSequence(list(coordinates)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def _uniform(*coordinates: int) -> float:
    """A float in [0, 1) that depends only on the coordinates (53 random bits)."""
    return (_derived_seed(*coordinates) >> 10) * 2.0**-53


def _as_bit_array(values: Any, name: str) -> np.ndarray:
    """Validate a 1-D array of 0/1 values and return it as numpy bool."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D bit vector, got shape {array.shape}")
    if array.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold integers or booleans with values 0/1, got dtype {array.dtype}")
    if array.dtype.kind != "b" and not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must hold only 0/1 values, found {np.unique(array)[:8].tolist()}")
    return array.astype(np.bool_)


def write_token_npz(path: str | os.PathLike[str], tokens: Any, tokens_flip: Any) -> Path:
    """Write one image's bits (and its horizontally flipped image's bits) as upstream's compressed ``.npz``.

    ``tokens``/``tokens_flip``: 1-D 0/1 arrays or tensors of equal length ``tokens * bits_per_token``,
    stored as bool like upstream does for binary quantization. Returns the written path.
    """
    path = Path(path)
    if path.suffix != NPZ_SUFFIX:
        # np.savez would silently append ".npz" to any other name; readers only look for ".npz".
        raise ValueError(f"token file name must end in {NPZ_SUFFIX!r}, got {str(path)!r}")
    bits = _as_bit_array(tokens, TOKEN_KEY)
    flip_bits = _as_bit_array(tokens_flip, FLIP_TOKEN_KEY)
    if bits.shape != flip_bits.shape:
        raise ValueError(
            f"{TOKEN_KEY} and {FLIP_TOKEN_KEY} lengths differ: {bits.shape[0]} vs {flip_bits.shape[0]}"
        )
    atomic_write(
        path, lambda file: np.savez_compressed(file, **{TOKEN_KEY: bits, FLIP_TOKEN_KEY: flip_bits})
    )
    return path


def write_token_metadata(root: str | os.PathLike[str], **fields: Any) -> Path:
    """Write ``<root>/metadata.json`` with upstream's fields (pretty-printed like upstream).

    Upstream writes num_samples, num_augmentations, img_size, format, vae_config_path, vae_path,
    levels_per_channel, token_dtype, codebook_size, token_size (bits per token) and storage_keys; pass those
    that apply. ``format`` and ``storage_keys`` default to upstream's constant values. Optional extension read
    by :class:`PretokenizedTokens`: ``num_tokens`` (tokens per image). Returns the written path.
    """
    metadata: dict[str, Any] = {"format": "npz", "storage_keys": list(STORAGE_KEYS), **fields}
    return atomic_write_json(Path(root) / METADATA_FILENAME, metadata, indent=2)


def _check_metadata(
    metadata_path: Path,
    metadata: Mapping[str, Any],
    expected_length: int | None,
    bits_per_token: int | None,
) -> None:
    """Raise ValueError when metadata.json contradicts the expected bit layout (or holds no usable values)."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{metadata_path} holds a {type(metadata).__name__}, not a JSON object of upstream's fields")
    for key in ("levels_per_channel", "token_size", "num_tokens"):
        value = metadata.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{metadata_path}: {key}={value!r} is not a positive integer; re-run pretokenization")
    storage = metadata.get("storage_keys")
    if storage is not None and not (isinstance(storage, list) and all(isinstance(key, str) for key in storage)):
        raise ValueError(f"{metadata_path}: storage_keys={storage!r} is not a list of names; re-run pretokenization")
    fix = (
        "Fix: point `root` at tokens made with the generator's tokenizer, or set tokens/bits_per_token "
        "to match the data (or re-run pretokenization)."
    )
    levels = metadata.get("levels_per_channel")
    if levels is not None and int(levels) != 2:
        raise ValueError(
            f"{metadata_path}: levels_per_channel={levels}, expected 2 (binary tokens); BAR trains on bits. {fix}"
        )
    storage_keys = metadata.get("storage_keys")
    if storage_keys is not None and not set(STORAGE_KEYS) <= set(storage_keys):
        raise ValueError(
            f"{metadata_path}: storage_keys={storage_keys}, expected to contain {list(STORAGE_KEYS)}."
        )
    token_size = metadata.get("token_size")
    if token_size is not None and bits_per_token is not None and int(token_size) != bits_per_token:
        raise ValueError(
            f"{metadata_path}: token_size (bits per token) is {token_size}, expected {bits_per_token}. {fix}"
        )
    if expected_length is None or token_size is None:
        return
    num_tokens = metadata.get("num_tokens")
    if num_tokens is not None:
        found = int(num_tokens) * int(token_size)
        if found != expected_length:
            raise ValueError(
                f"{metadata_path}: num_tokens * token_size = {num_tokens} * {token_size} = {found} bits per image, "
                f"expected {expected_length}. {fix}"
            )
    elif expected_length % int(token_size) != 0:
        raise ValueError(
            f"{metadata_path}: token_size (bits per token) is {token_size}, which does not divide the expected "
            f"{expected_length} bits per image. {fix}"
        )


def _npz_array_header(npz: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an open `.npz`, read from its `.npy` header without its data."""
    with npz.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), dtype


class PretokenizedTokens(Dataset):
    """Pretokenized images in upstream's ``.npz`` folder layout; picks the flipped tokens with a probability.

    The flip choice is a pure function of ``(seed, epoch, index)``, so it is reproducible and independent of the
    number of workers; call :meth:`set_epoch` at each epoch start to draw new choices. The epoch lives in a
    shared-memory tensor so persistent DataLoader workers see updates made in the main process.

    ``expected_length`` (tokens * bits_per_token) and ``bits_per_token`` are checked against metadata.json
    (when present) and the first file at construction, and every file's length when it is read.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        flip_probability: float = 0.5,
        expected_length: int | None = None,
        seed: int = 0,
        bits_per_token: int | None = None,
    ) -> None:
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if expected_length is not None and expected_length <= 0:
            raise ValueError(f"expected_length must be positive, got {expected_length}")
        self.root = Path(root)
        self.split = split
        self.flip_probability = float(flip_probability)
        self.seed = int(seed)
        self.split_dir = self.root / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"pretokenized root {str(self.root)!r} does not exist. {_NO_DATA_HINT}")
        if not self.split_dir.is_dir():
            raise FileNotFoundError(
                f"pretokenized split folder {str(self.split_dir)!r} does not exist (expected "
                f"<root>/{split}/<class_folder>/<stem>.npz). {_NO_DATA_HINT}"
            )

        self.metadata: dict[str, Any] | None = None
        metadata_path = self.root / METADATA_FILENAME
        if metadata_path.is_file():
            try:
                self.metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata_path} is not valid JSON: {error}") from error
            _check_metadata(metadata_path, self.metadata, expected_length, bits_per_token)

        self.classes = sorted(entry.name for entry in os.scandir(self.split_dir) if entry.is_dir())
        self.class_to_index = {name: index for index, name in enumerate(self.classes)}
        stems, labels = self._scan_files()
        if not stems:
            raise ValueError(
                f"no {NPZ_SUFFIX} files found under {str(self.split_dir)!r} "
                f"({len(self.classes)} class folders). {_NO_DATA_HINT}"
            )
        # Fixed-width numpy arrays rather than lists of str: reading list items touches their refcounts, which
        # makes forked workers copy the pages (ImageNet has 1.28M files); utf-8 bytes keep it ~30 MB.
        self._stems = np.array([stem.encode("utf-8") for stem in stems], dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)

        # The first file fixes the length when none is expected, and fails fast on a wrong one.
        first_bits = self._load_bits(0, TOKEN_KEY, expected_length)
        self.length = expected_length if expected_length is not None else int(first_bits.shape[0])
        if bits_per_token is not None and self.length % bits_per_token != 0:
            raise ValueError(
                f"{self._path(0)}: {self.length} bits per image is not a multiple of bits_per_token={bits_per_token}"
            )
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def _scan_files(self) -> tuple[list[str], list[int]]:
        """File stems relative to their class folder, and labels, in DatasetFolder order (sorted, links followed).

        Symbolic links are followed (token folders are often link farms), but every real folder and every real file
        is taken once: a link back to the split folder, to an ancestor, into another class or to a folder already
        read is skipped with a warning, so a link cycle cannot multiply the data or move it into another class.
        """
        split_real = os.path.realpath(self.split_dir)
        class_reals = {name: os.path.realpath(self.split_dir / name) for name in self.classes}
        visited_folders: set[str] = set()
        taken_files: set[str] = set()
        skipped: list[str] = []
        stems: list[str] = []
        labels: list[int] = []
        for label, class_name in enumerate(self.classes):
            class_dir = self.split_dir / class_name
            if class_reals[class_name] in visited_folders:
                skipped.append(f"{class_dir} (the same folder as another class)")
                continue
            visited_folders.add(class_reals[class_name])
            others = [real for name, real in class_reals.items() if name != class_name]
            listing: list[tuple[str, list[str]]] = []
            pending = [class_dir]
            while pending:
                folder = pending.pop()
                folder_real = os.path.realpath(folder)
                file_names = []
                with os.scandir(folder) as listed:
                    # Real entries before links, each group sorted: a link to a file here never displaces it.
                    entries = sorted(listed, key=lambda entry: (entry.is_symlink(), entry.name))
                    for entry in entries:
                        if entry.is_dir():  # follows a link to a folder
                            real = os.path.realpath(entry.path)
                            encloses_split = real == split_real or split_real.startswith(real + os.sep)
                            inside_other = any(real == other or real.startswith(other + os.sep) for other in others)
                            if real in visited_folders or encloses_split or inside_other:
                                skipped.append(f"{entry.path} -> {real}")
                                continue
                            visited_folders.add(real)
                            pending.append(Path(entry.path))
                        elif entry.name.endswith(NPZ_SUFFIX) and entry.is_file():
                            real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(
                                folder_real, entry.name)
                            if real in taken_files:
                                skipped.append(f"{entry.path} -> {real}")
                                continue
                            taken_files.add(real)
                            file_names.append(entry.name)
                listing.append((Path(folder).relative_to(class_dir).as_posix(), sorted(file_names)))
            for relative_folder, file_names in sorted(listing):
                for file_name in file_names:
                    relative = file_name if relative_folder == "." else f"{relative_folder}/{file_name}"
                    stems.append(relative[: -len(NPZ_SUFFIX)])
                    labels.append(label)
        if skipped:
            log.warning(
                "%s: %d linked folder(s) or file(s) skipped because they were already read or lead outside their class "
                "(a link cycle or a shared folder): %s", self.split_dir, len(skipped), "; ".join(skipped[:5])
            )
        return stems, labels

    def key(self, index: int) -> str:
        """``<class>/<stem>`` of item ``index``."""
        return f"{self.classes[self.labels[index]]}/{self._stems[index].decode('utf-8')}"

    def _path(self, index: int) -> Path:
        return self.split_dir / f"{self.key(index)}{NPZ_SUFFIX}"

    def _load_bits(self, index: int, storage_key: str, expected_length: int | None) -> np.ndarray:
        """Read and validate one bit array; errors name the file."""
        path = self._path(index)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if storage_key not in npz.files:
                    raise ValueError(f"{path}: missing key {storage_key!r}; found keys {sorted(npz.files)}")
                # The array's header first: its shape bounds what is decompressed (a small file can claim gigabytes).
                shape, dtype = _npz_array_header(npz, storage_key)
                length = expected_length if expected_length is not None else MAX_BITS_PER_IMAGE
                if len(shape) != 1 or shape[0] > length or dtype.kind not in "biu":
                    raise ValueError(
                        f"{path}: {storage_key!r} is {dtype} of shape {shape}; expected a 1-D bit vector of "
                        f"{expected_length if expected_length is not None else f'at most {MAX_BITS_PER_IMAGE}'} "
                        "booleans or integers (tokens * bits_per_token)"
                    )
                bits = npz[storage_key]
        except ValueError as error:
            if str(path) in str(error):
                raise
            # e.g. "Object arrays cannot be loaded when allow_pickle=False": token files never need pickles.
            raise ValueError(f"{path}: cannot read {storage_key!r}: {error}") from error
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: not a readable .npz file: {error}") from error
        if bits.ndim != 1:
            raise ValueError(f"{path}: {storage_key!r} must be a 1-D bit vector, got shape {bits.shape}")
        if expected_length is not None and bits.shape[0] != expected_length:
            raise ValueError(
                f"{path}: {storage_key!r} has {bits.shape[0]} bits, expected {expected_length} "
                "(tokens * bits_per_token). Fix: re-run pretokenization with the matching tokenizer, "
                "or set tokens/bits_per_token to match the data."
            )
        if bits.dtype.kind not in "biu":
            raise ValueError(f"{path}: {storage_key!r} has dtype {bits.dtype}, expected bool or integer bits")
        if bits.dtype.kind != "b" and not np.all((bits == 0) | (bits == 1)):
            raise ValueError(
                f"{path}: {storage_key!r} holds values other than 0/1 ({np.unique(bits)[:8].tolist()}); "
                "these are not binary tokens (levels_per_channel must be 2)."
            )
        return bits

    def set_epoch(self, epoch: int) -> None:
        """Select the flip choices of this epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def is_flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether item ``index`` uses ``tokens_flip`` in ``epoch`` (default: the current epoch)."""
        # Exact for 0 and 1 because the uniform draw lies in [0, 1).
        epoch = self.epoch if epoch is None else epoch
        return _uniform(_FLIP_STREAM, self.seed, epoch, index) < self.flip_probability

    def __len__(self) -> int:
        return len(self._stems)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        storage_key = FLIP_TOKEN_KEY if self.is_flipped(index) else TOKEN_KEY
        bits = self._load_bits(index, storage_key, self.length)
        return {
            "bits": torch.from_numpy(bits.astype(np.int64)),
            "label": torch.tensor(int(self.labels[index]), dtype=torch.int64),
            "key": self.key(index),
        }


class SyntheticBitTokens(Dataset):
    """Seeded class-conditional bit vectors: each sample is its class prototype with bits flipped w.p. ``noise``.

    Prototypes depend on ``(seed, class)``; a sample's noise on ``(sample_seed, index)`` (``sample_seed``
    defaults to ``seed``), so the same index always yields the same sample. A held-out set uses the same
    ``seed`` (same classes) with a different ``sample_seed``. ``label = index % num_classes``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        tokens: int,
        bits_per_token: int,
        seed: int = 0,
        noise: float = 0.1,
        sample_seed: int | None = None,
    ) -> None:
        for name, value in (
            ("num_samples", num_samples),
            ("num_classes", num_classes),
            ("tokens", tokens),
            ("bits_per_token", bits_per_token),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if seed < 0 or (sample_seed is not None and sample_seed < 0):
            raise ValueError(f"seeds must be non-negative, got seed={seed}, sample_seed={sample_seed}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.length = int(tokens) * int(bits_per_token)
        self.seed = int(seed)
        self.sample_seed = self.seed if sample_seed is None else int(sample_seed)
        self.noise = float(noise)
        self.prototypes = torch.stack([self._prototype(label) for label in range(self.num_classes)])

    def _prototype(self, label: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_derived_seed(_PROTOTYPE_STREAM, self.seed, label))
        return torch.randint(0, 2, (self.length,), generator=generator, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        """No-op: synthetic samples are fixed per index (kept for the same interface as PretokenizedTokens)."""

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        index = index % self.num_samples
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(_derived_seed(_SAMPLE_STREAM, self.sample_seed, index))
        flips = (torch.rand(self.length, generator=generator) < self.noise).to(torch.int64)
        return {
            "bits": self.prototypes[label] ^ flips,
            "label": torch.tensor(label, dtype=torch.int64),
            "key": f"synthetic/{index}",
        }
