"""Webdataset shards, readable by DALI's ``fn.readers.webdataset`` and by webdataset itself,
with their DALI index files.

Each sample is three tar members sharing the key ``%09d`` of its index:
``<key>.jpg`` (JPEG bytes), ``<key>.cls`` (label) and ``<key>.idx`` (sample
index), the last two as ASCII decimal digits, as webdataset writes ``.cls``
and reads it back with ``int()`` (``pipelines.format.layout.decode_int``
reads what DALI returns: the member's bytes, ``dtypes=UINT8``). Members are
written in USTAR format with zeroed owner and time, so a shard's bytes
depend only on its samples.

The index file is what DALI's ``wds2idx`` writes (version ``v1.2``): a header
line ``v1.2 <num_samples>``, then per sample one line listing each member as
``<ext> <data offset> <size> <member name>``, the offset pointing past the
member's 512-byte tar header.
"""
from __future__ import annotations

import io
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.format.layout import DALI_EXTENSIONS, encode_int, sample_key, shard_name
from tools.convert.source import Verdict, stored_jpeg

INDEX_VERSION = "v1.2"


def plan_shards(num_samples: int, shard_size: int, shard_multiple: int) -> list[range]:
    """Split ``0..num_samples-1`` into contiguous shards of at most ``shard_size``, sizes
    differing by at most one.

    The shard count is rounded up to a multiple of ``shard_multiple``, so that any world size
    dividing it gets the same number of shards per rank, unless that would leave shards of
    fewer than half ``shard_size`` samples (a small split: 1,000 images at 1024 and 64 would
    make 64 shards of 15). Then it is rounded up to a multiple of the largest divisor of
    ``shard_multiple`` that keeps shards that full, down to 1: no rounding.
    """
    if num_samples <= 0:
        return []
    least = math.ceil(num_samples / shard_size)
    for multiple in sorted((d for d in range(1, shard_multiple + 1) if shard_multiple % d == 0), reverse=True):
        count = math.ceil(least / multiple) * multiple
        if multiple == 1 or num_samples // count >= max(1, shard_size // 2):
            break
    bounds = [num_samples * i // count for i in range(count + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(count)]


@dataclass(frozen=True)
class ShardTask:
    directory: str
    shard: int
    first_index: int
    items: list[tuple[str, int, Verdict]]  # (absolute source path, label, verdict), in index order
    jpeg_quality: int


def write_shard(task: ShardTask) -> dict:
    """Write one tar and its index file; returns ``{"tar", "idx" (file names), "samples", "first_index"}``."""
    base = Path(task.directory) / shard_name(task.shard)
    tar_path, idx_path = base.with_suffix(".tar"), base.with_suffix(".idx")
    lines = []
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (path, label, verdict) in enumerate(task.items):
            index = task.first_index + offset
            key = sample_key(index)
            payloads = (stored_jpeg(path, verdict, task.jpeg_quality), encode_int(label), encode_int(index))
            members = []
            for ext, payload in zip(DALI_EXTENSIONS, payloads):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.addfile(info, io.BytesIO(payload))
                members.append(f"{ext} {data_offset} {len(payload)} {info.name}")
            lines.append(" ".join(members))
    idx_path.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    return {"tar": tar_path.name, "idx": idx_path.name, "samples": len(lines), "first_index": task.first_index}
