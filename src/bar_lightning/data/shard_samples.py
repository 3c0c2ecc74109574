"""Pipeline stages shared by training, evaluation and pretokenization: raw samples of shards, then decoded ones.

Every problem (an unreadable or empty shard, a duplicate key, a bad image or label) goes to a
:class:`~bar_lightning.data.skip_policy.SkipPolicy`, which raises (strict) or counts, warns and skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image

from bar_lightning.data.shards import (
    CONVERT_HINT,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    ImageTooLargeError,
    OversizedMember,
    Shard,
    ShardDataError,
    ShardReadError,
    decode_image,
    parse_label,
    read_shard_samples,
)
from bar_lightning.data.skip_policy import SkipPolicy

# --------------------------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------------------------


def samples_of_shard(shard: Shard, *, policy: SkipPolicy, max_image_pixels: int) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (see :func:`read_shard_samples`), duplicates removed, problems sent to ``policy``.

    A shard that cannot be read to its end is one skip (its samples before the damage are kept); one without any
    sample is another. A strict policy raises instead.
    """
    keys_in_shard: set[str] = set()
    samples = read_shard_samples(shard, max_image_pixels=max_image_pixels)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except ShardReadError as error:
            policy.skip(reason="unreadable_shard", shard=shard.url, key=None, detail=str(error))
            return
        key = sample["__key__"]
        if key in keys_in_shard:
            # Kept: the first sample under this key; a repeat would be a second, different "same" image.
            policy.skip(reason="duplicate_key", shard=shard.url, key=key, detail="the key occurs twice in the shard")
            continue
        keys_in_shard.add(key)
        policy.accept()
        yield sample
    if not keys_in_shard:
        policy.skip(reason="empty_shard", shard=shard.url, key=None, detail="the shard holds no sample")


def _read_shards(
    shard_source: Iterable[Shard],
    *,
    policy: SkipPolicy,
    max_image_pixels: int,
    max_consecutive_empty_shards: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of each shard in turn; ``max_consecutive_empty_shards`` guards an endless (resampled) source.

    Without the guard, resampling a shard set in which no shard holds a sample would loop forever in silence.
    """
    consecutive_empty_shards = 0
    for shard in shard_source:
        shard_was_empty = True
        for sample in samples_of_shard(shard, policy=policy, max_image_pixels=max_image_pixels):
            shard_was_empty = False
            yield sample
        consecutive_empty_shards = consecutive_empty_shards + 1 if shard_was_empty else 0
        if (
            max_consecutive_empty_shards is not None
            and consecutive_empty_shards > max_consecutive_empty_shards
        ):
            raise ShardDataError(
                f"{consecutive_empty_shards} shards in a row held no usable sample (last: {shard.url}); the "
                f"training shards look empty or unreadable; check them or {CONVERT_HINT}"
            )


def _decode_and_transform(
    samples: Iterable[dict[str, Any]],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    policy: SkipPolicy,
    max_image_pixels: int,
) -> Iterator[dict[str, Any]]:
    for sample in samples:
        decoded = decode_sample(sample, policy=policy, max_image_pixels=max_image_pixels)
        if decoded is not None:
            image, label = decoded
            yield {"image": transform(image), "label": label, "key": sample["__key__"]}


def decode_sample(
    sample: dict[str, Any], *, policy: SkipPolicy, max_image_pixels: int
) -> tuple[Image.Image, int] | None:
    """``(RGB image, label)`` of a raw sample, or None after reporting why it is bad to ``policy``.

    The one place a shard sample's image and label are decoded: training, evaluation and pretokenization share it.
    """
    shard, key = sample["__url__"], sample["__key__"]

    def bad(reason: str, detail: str) -> None:
        policy.skip(reason=reason, shard=shard, key=key, already_seen=True, detail=detail)

    image_extension = next((ext for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
    if image_extension is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        bad("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry (has {present})")
        return None
    if sample.get(LABEL_EXTENSION) is None:
        bad("missing_label", "no cls entry")
        return None
    for extension in (image_extension, LABEL_EXTENSION):
        member = sample[extension]
        if isinstance(member, OversizedMember):
            reason = "bad_label" if extension == LABEL_EXTENSION else "oversized_image"
            bad(reason, f"{extension} is {member.size:,} bytes, over the {member.limit:,} read for it (not read)")
            return None
    try:
        label = parse_label(sample[LABEL_EXTENSION])
    except ValueError as error:
        bad("bad_label", str(error))
        return None
    try:
        image = decode_image(sample[image_extension], max_pixels=max_image_pixels)
    except ImageTooLargeError as error:
        bad("oversized_image", f"{image_extension} is {error}; raise data.max_image_pixels if such images are wanted")
        return None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        bad("undecodable_image", f"{image_extension} does not decode ({type(error).__name__}: {error})")
        return None
    return image, label
