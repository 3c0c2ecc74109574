"""Hostile shards against the one shard reader: code in members, bombs, compression, and cut files.

Every consumer is probed the same way: training (skips and counts), evaluation (strict), pretokenization's reader
(strict) and the shard counter of the converter's index. No crafted payload may run (its marker file stays absent),
nothing is decompressed, and a cut shard is never read as a complete, shorter one.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bar_lightning.data.convert import index_shards, write_shards
from bar_lightning.data.images import (
    BadSampleError,
    BadSampleWarning,
    ShardDataError,
    build_eval_transform,
    build_image_transform,
    make_eval_dataset,
    make_train_dataset,
)
from bar_lightning.data.shards import (
    Shard,
    ShardReadError,
    count_shard_samples,
    expand_shards,
    read_shard_samples,
)
from bar_lightning.pretokenize import iter_shards

TRANSFORM = build_image_transform(resize_shorter_edge=8, crop_size=8, random_crop=False, random_flip=False)
EVAL_TRANSFORM = build_eval_transform(crop_size=8)


class RunsCode:
    """Unpickling (or torch.load-ing) this creates `marker`: what an attacker's member would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def png(value: int = 90, size: tuple[int, int] = (10, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height zero pixels, compressed row by row (small file, huge image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def good_members(prefix: str, count: int) -> list[tuple[str, bytes]]:
    members = []
    for index in range(count):
        members += [(f"{prefix}{index:03d}.png", png(index * 9 % 256)), (f"{prefix}{index:03d}.cls", str(index % 3).encode())]
    return members


def train_items(shards, **kwargs) -> tuple[list[dict], list[str]]:
    dataset = make_train_dataset(shards=shards, transform=TRANSFORM, batch_size=2, samples_per_epoch=kwargs.pop("n", 8),
                                 num_workers=0, shuffle_buffer=0, max_skip_rate=1.0, min_samples_for_skip_rate=1,
                                 **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(dataset)
    return items, [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]


def eval_items(shards, **kwargs) -> list[dict]:
    return list(make_eval_dataset(shards=shards, transform=EVAL_TRANSFORM, **kwargs))


def pretokenize_items(shards, **kwargs) -> list[tuple]:
    return list(iter_shards(shards, 0, 1, max_image_pixels=kwargs.get("max_image_pixels", 4096 * 4096)))


# ------------------------------------------------------------------------------------------------ code in members


@pytest.mark.parametrize("extension", ["pyd", "pickle", "pkl", "pth", "pt", "npy", "json", "mp", "ten"])
def test_crafted_members_next_to_a_valid_image_are_never_decoded(tmp_path, extension):
    marker = tmp_path / "code_ran"
    if extension in ("pth", "pt"):
        buffer = io.BytesIO()
        torch.save({"x": RunsCode(marker)}, buffer)
        payload = buffer.getvalue()
    else:
        payload = pickle.dumps(RunsCode(marker))
    shard = write_tar(tmp_path / "evil-000000.tar", [
        ("s000.png", png(1)), ("s000.cls", b"1"), (f"s000.{extension}", payload),
        ("s001.png", png(2)), ("s001.cls", b"2"),
    ])
    items, skipped = train_items(str(shard), n=4)
    assert len(items) == 4 and not skipped
    assert sorted(item["key"] for item in eval_items(str(shard))) == ["s000", "s001"]
    assert [label for _, label, _ in pretokenize_items(str(shard))] == [1, 2]
    assert count_shard_samples(shard) == 2
    assert not marker.exists()


def test_a_sample_with_only_a_payload_is_a_missing_image_and_the_payload_is_not_read(tmp_path):
    marker = tmp_path / "code_ran"
    shard = write_tar(tmp_path / "evil-000000.tar", [("a.pyd", pickle.dumps(RunsCode(marker))), ("a.cls", b"0")]
                      + good_members("g", 3))
    samples = list(read_shard_samples(Shard(url=str(shard)), max_image_pixels=10**6))
    assert samples[0]["pyd"] is None and samples[0]["__ignored__"] == ["pyd"]  # recorded as present, never read
    _, skipped = train_items(str(shard), n=4)
    assert any("missing_image" in message and "'a'" in message for message in skipped)
    with pytest.raises(BadSampleError, match=r"missing_image: sample 'a'"):
        eval_items(str(shard))
    assert not marker.exists()


def test_gzip_members_are_not_expanded(tmp_path):
    # 400 MiB of zeros in a 400 KB member: reading the shard must not allocate anything near that.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    block = b"\x00" * (1 << 20)
    bomb = b"".join(compressor.compress(block) for _ in range(400)) + compressor.flush()
    assert len(bomb) < 1 << 20
    shard = write_tar(tmp_path / "gz-000000.tar", [("s.png", png()), ("s.cls", b"0"), ("s.txt.gz", bomb),
                                                     ("t.png.gz", bomb)])
    tracemalloc.start()
    try:
        samples = list(read_shard_samples(Shard(url=str(shard)), max_image_pixels=10**6))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading used {peak / 2**20:.1f} MiB"
    assert [sample["__key__"] for sample in samples] == ["s", "t"]
    assert samples[0]["txt.gz"] is None and samples[1]["png.gz"] is None  # never read, never a .png
    with pytest.raises(BadSampleError, match="missing_image: sample 't'"):
        eval_items(str(shard))


def test_a_compressed_shard_is_refused_not_decompressed(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", good_members("c", 2))
    compressed = tmp_path / "packed-000000.tar"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(BadSampleError, match=r"packed-000000\.tar is gzip-compressed.*nothing in them is decompressed"):
        eval_items(str(compressed))
    with pytest.raises(BadSampleError, match="gzip-compressed"):
        pretokenize_items(str(compressed))
    _, skipped = train_items([str(compressed), str(plain)], n=20)
    assert any("unreadable_shard" in message and "gzip-compressed" in message for message in skipped)


def test_links_devices_and_folders_inside_a_shard_are_ignored(tmp_path):
    path = tmp_path / "links-000000.tar"
    with tarfile.open(path, "w") as archive:
        for kind, name in ((tarfile.SYMTYPE, "a.png"), (tarfile.LNKTYPE, "b.png"), (tarfile.DIRTYPE, "c.png"),
                           (tarfile.FIFOTYPE, "d.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
        for name, data in good_members("g", 2):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert sorted(item["key"] for item in eval_items(str(path))) == ["g000", "g001"]


# ------------------------------------------------------------------------------------------------ bombs


def test_a_pixel_bomb_is_refused_from_its_header(tmp_path):
    bomb = png_bomb(10_000, 10_000)
    assert len(bomb) < 200_000  # a 100 M pixel image in a small file
    shard = write_tar(tmp_path / "bomb-000000.tar", [("big.png", bomb), ("big.cls", b"0")] + good_members("g", 2))
    tracemalloc.start()
    try:
        items, skipped = train_items(str(shard), n=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"training used {peak / 2**20:.1f} MiB on a 100 M pixel image"
    assert len(items) == 4 and all(item["key"] != "big" for item in items)
    assert any("oversized_image" in m and "10000x10000 = 100,000,000 pixels" in m and "max_image_pixels=16,777,216" in m
               for m in skipped)
    with pytest.raises(BadSampleError, match=r"oversized_image: sample 'big'.*10000x10000"):
        eval_items(str(shard))
    with pytest.raises(BadSampleError, match="oversized_image"):
        pretokenize_items(str(shard))
    # The budget is configurable: a small one refuses the small images too.
    with pytest.raises(BadSampleError, match=r"g000.*10x12 = 120 pixels, more than max_image_pixels=100"):
        eval_items(str(write_tar(tmp_path / "small-000000.tar", good_members("g", 1))), max_image_pixels=100)


def test_an_oversized_member_is_not_read(tmp_path):
    huge_label = b"1" + b" " * (1 << 20)  # a 1 MiB "label"
    shard = write_tar(tmp_path / "member-000000.tar", [("x.png", png()), ("x.cls", huge_label)] + good_members("g", 1))
    samples = list(read_shard_samples(Shard(url=str(shard)), max_image_pixels=10**6))
    assert samples[0]["cls"].size == len(huge_label)  # an OversizedMember placeholder, not the bytes
    with pytest.raises(BadSampleError, match=r"bad_label: sample 'x'.*cls is 1,048,577 bytes"):
        eval_items(str(shard))


def test_images_of_other_formats_are_not_decoded(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="TIFF")
    shard = write_tar(tmp_path / "formats-000000.tar", [("e.png", eps), ("e.cls", b"0"), ("t.jpg", buffer.getvalue()),
                                                          ("t.cls", b"0")] + good_members("g", 1))
    _, skipped = train_items(str(shard), n=2)
    assert sum("undecodable_image" in m and "cannot identify image file" in m for m in skipped) >= 2


@pytest.mark.parametrize("label", [b"-1", b"+3", b"3.0", b"\xef\xbc\x93", b"", b"1e3", b"12345678901"])
def test_labels_are_ascii_digits_everywhere(tmp_path, label):
    shard = write_tar(tmp_path / "labels-000000.tar", [("x.png", png()), ("x.cls", label)] + good_members("g", 1))
    with pytest.raises(BadSampleError, match=r"bad_label: sample 'x'.*not a non-negative integer"):
        eval_items(str(shard))
    with pytest.raises(BadSampleError, match="bad_label"):
        pretokenize_items(str(shard))
    _, skipped = train_items(str(shard), n=2)
    assert any("bad_label" in message for message in skipped)


# ------------------------------------------------------------------------------------------------ cut and empty shards


def member_boundaries(path: Path) -> list[int]:
    """Offsets at which each member's header starts, plus the offset of the end-of-archive block."""
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    ends = [member.offset_data + -(-member.size // 512) * 512 for member in members]
    return [member.offset for member in members] + [max(ends)]


SHARD_SAMPLES = 4


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory) -> tuple[Path, list[int]]:
    folder = tmp_path_factory.mktemp("cut")
    summary = write_shards(({"__key__": f"k{i}", "png": png(i * 40), "cls": i % 2} for i in range(SHARD_SAMPLES)),
                           out_dir=folder, prefix="whole", max_count=100)
    [shard] = summary.shards
    return shard, member_boundaries(shard)


@pytest.mark.parametrize("with_index", [False, True])
def test_a_shard_cut_at_any_member_boundary_is_detected_by_every_reader(tmp_path, small_shard, with_index):
    shard, boundaries = small_shard
    data = shard.read_bytes()
    assert len(boundaries) == 2 * SHARD_SAMPLES + 1  # two members per sample, then the end block
    for cut in boundaries[1:]:  # boundaries[0] == 0: an empty file, covered below
        folder = tmp_path / f"{with_index}-{cut}"
        folder.mkdir()
        cut_shard = folder / shard.name
        cut_shard.write_bytes(data[:cut])
        if with_index:
            (folder / "whole.index.json").write_text((shard.parent / "whole.index.json").read_text())
        expected = "is \\d+ bytes but its index" if with_index else "truncated"
        with pytest.raises(BadSampleError, match=rf"unreadable_shard: shard .*whole-000000\.tar.*{expected}"):
            eval_items(str(cut_shard))
        with pytest.raises(BadSampleError, match=expected):
            pretokenize_items(str(cut_shard))
        with pytest.raises(ShardReadError):
            count_shard_samples(cut_shard)
        # Training counts the cut shard as a skip and goes on with the others.
        good = folder / "good-000000.tar"
        good.write_bytes(data)
        items, skipped = train_items([str(cut_shard), str(good)], n=64)
        assert len(items) == 64 and any(
            "unreadable_shard" in message and str(cut_shard) in message for message in skipped
        ), cut
    # The whole shard reads completely, with or without its index.
    assert len(eval_items(str(shard))) == SHARD_SAMPLES == count_shard_samples(shard)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_shard_cut_anywhere_before_its_end_block_is_detected(small_shard, tmp_path, fraction):
    shard, boundaries = small_shard
    cut = int(fraction * boundaries[-1])  # anywhere in the members: headers, data, padding
    cut_shard = tmp_path / f"cut-{cut}.tar"
    cut_shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardReadError, match=r"cut-\d+\.tar"):
        list(read_shard_samples(Shard(url=str(cut_shard)), max_image_pixels=10**6))


def test_stale_index_counts_are_detected(tmp_path, small_shard):
    shard, _ = small_shard
    copy = tmp_path / shard.name
    copy.write_bytes(shard.read_bytes())
    index = tmp_path / "whole.index.json"
    index.write_text((shard.parent / "whole.index.json").read_text().replace(f'"nsamples": {SHARD_SAMPLES}', '"nsamples": 9'))
    [expanded] = expand_shards(str(copy))
    assert expanded.expected_samples == 9 and expanded.index == str(index)
    with pytest.raises(BadSampleError, match=rf"holds {SHARD_SAMPLES} samples but its index .* says 9"):
        eval_items(str(copy))
    # The index itself can be the shard list (no brace pattern to quote), and a malformed one is named.
    assert [shard.url for shard in expand_shards(str(index))] == [str(copy)]
    index.write_text('{"shardlist": [{"url": "x.tar"}]}')
    with pytest.raises(ShardDataError, match=r"whole\.index\.json: entry 0 must have a 'url' and integer 'nsamples'"):
        expand_shards(str(copy))


def test_empty_shards_and_empty_files(tmp_path):
    empty_tar = tmp_path / "empty-000000.tar"
    with wds.TarWriter(str(empty_tar)):
        pass
    zero_bytes = tmp_path / "zero-000000.tar"
    zero_bytes.write_bytes(b"")
    good = write_tar(tmp_path / "good-000000.tar", good_members("g", 2))
    with pytest.raises(BadSampleError, match=r"empty_shard: shard .*empty-000000\.tar: the shard holds no sample"):
        eval_items([str(good), str(empty_tar)])
    with pytest.raises(BadSampleError, match=r"unreadable_shard: shard .*zero-000000\.tar.*not a tar file"):
        eval_items(str(zero_bytes))
    with pytest.raises(BadSampleError, match="empty_shard"):
        pretokenize_items(str(empty_tar))
    with pytest.raises(ShardDataError, match="held no usable sample"):
        train_items([str(empty_tar), str(zero_bytes)], n=2)
    _, skipped = train_items([str(good), str(empty_tar)], n=8)
    assert any("empty_shard" in message for message in skipped)


def test_the_converter_index_command_counts_whole_shards_and_refuses_cut_ones(tmp_path, small_shard):
    shard, boundaries = small_shard
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a-000000.tar").write_bytes(shard.read_bytes())
    (folder / "a-000001.tar").write_bytes(shard.read_bytes()[: boundaries[3]])
    with pytest.raises(ShardReadError, match=r"a-000001\.tar is truncated"):
        index_shards(str(folder / "a-*.tar"), index_path=folder / "a.index.json")
    (folder / "a-000001.tar").unlink()
    assert index_shards(str(folder), index_path=folder / "a.index.json") == [(str(folder / "a-000000.tar"), 4)]
    [indexed] = expand_shards(str(folder / "a-000000.tar"))
    assert (indexed.expected_samples, indexed.expected_bytes) == (4, shard.stat().st_size)


def test_a_shard_index_cannot_run_commands(tmp_path):
    marker = tmp_path / "code_ran"
    index = tmp_path / "evil.index.json"
    index.write_text(json.dumps({"wids_version": 1, "shardlist": [
        {"url": f"pipe:touch {marker}; cat /dev/null", "nsamples": 1}]}))
    with pytest.raises(ShardDataError, match=r"evil\.index\.json: entry 0 is a pipe: command"):
        expand_shards(str(index))
    with pytest.raises(ShardDataError, match="pipe: command"):
        eval_items(str(index))
    assert not marker.exists()


def test_a_second_conversion_into_a_held_folder_stops(tmp_path, capsys):
    from bar_lightning.data.convert import main

    source = tmp_path / "images" / "cat"
    source.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source / "a.png")
    holder = subprocess.Popen(  # another conversion holding the folder
        [sys.executable, "-c", "import sys, time\nfrom bar_lightning.run_lock import RunLock\n"
         "RunLock(sys.argv[1], purpose='convert').acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["image-folder", "--src", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--prefix", "p"])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"is in use by convert (PID {holder.pid}" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.tar"))
    assert main(["image-folder", "--src", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--prefix", "p"]) == 0
    assert [shard.url for shard in expand_shards(str(tmp_path / "out" / "p.index.json"))] == [
        str(tmp_path / "out" / "p-000000.tar")]
