"""Random access to a split's encoded images (bytes and sizes) by sample index,
from an ImageFolder tree or from the converter's webdataset shards (through
their DALI index files). Needs no DALI: the DALI backend feeds these bytes to
its pipelines, and evaluation decodes them with PIL (``pipelines.images``).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from pipelines.errors import BadImageError, DataError
from pipelines.format.converted import ConvertedSplit
from pipelines.image_folder import ImageFolderIndex
from pipelines.images import decode_rgb, refusal

# The most pixels an image may have: where PIL raises DecompressionBombError (2x its warning
# threshold), so that every backend refuses the same files (DALI alone has no limit).
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

# Start-of-frame markers of baseline, extended, progressive and lossless JPEGs.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_segments(data: bytes | memoryview) -> Iterator[tuple[int, int]]:
    """(marker, offset) of a JPEG's marker segments, up to and including its first
    start-of-scan (0xDA); nothing when ``data`` does not start like a JPEG.
    Segments are skipped by their length, so an EXIF thumbnail inside APP1 is
    never mistaken for the image's own markers."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        yield marker, pos
        if marker == 0xDA:
            return
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, or None if ``data`` is no JPEG."""
    for marker, pos in _jpeg_segments(data):
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                return None
            return (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
    return None


def jpeg_is_complete(data: bytes | memoryview) -> bool:
    """Whether a JPEG's coded data reaches its end-of-image marker.

    Entropy-coded data never holds 0xFFD9 (a 0xFF there is followed by 0x00 or
    a restart marker), so the marker is searched from the first scan on: a
    truncated file has none there, and trailing bytes after it (metadata,
    padding) of any length are fine.
    """
    for marker, pos in _jpeg_segments(data):
        if marker == 0xDA:
            return bytes(data[pos:]).find(b"\xff\xd9") >= 0
    return False


def pil_header(data: bytes | memoryview) -> tuple[tuple[int, int], str | None, str]:
    """(height, width), format and mode of a non-JPEG encoded image (PNG, BMP, ...: ImageFolder
    trees may hold them), from its header as PIL reads it (PIL refuses sizes over MAX_PIXELS)."""
    with Image.open(io.BytesIO(bytes(data))) as img:
        return (img.height, img.width), img.format, img.mode


class EncodedImages:
    """Random access to a split's encoded images by sample index."""

    def __init__(self, index: ImageFolderIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels

    def read(self, i: int) -> memoryview:
        raise NotImplementedError

    def checked(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoded bytes (uint8 array) and (height, width) of image ``i``, after the
        checks that need no decode: readable, an image, and a JPEG not cut short.
        Raises ``BadImageError`` naming the image. Nothing is cached: a file
        replaced during the run is checked (and sized) as it is now."""
        data = self.read(i)
        size = jpeg_size(data)
        if size is not None and size[0] * size[1] > MAX_PIXELS:
            raise BadImageError(f"image {self.describe(i)} has {size[1]}x{size[0]} pixels, more than {MAX_PIXELS} "
                                "(PIL's decompression-bomb limit, which the torch backend applies too)")
        if size is not None and not jpeg_is_complete(data):
            raise BadImageError(f"image {self.describe(i)} is truncated or damaged "
                                "(no JPEG scan reaching an end marker)")
        if size is None:
            try:
                size, fmt, mode = pil_header(data)
            except Exception as exc:  # PIL raises many types; all mean "bad file"
                raise BadImageError(f"cannot read the size of image {self.describe(i)}: {exc}") from exc
            problem = refusal(fmt, mode)
            if problem:  # the rule every reader applies (pipelines.images)
                raise BadImageError(f"image {self.describe(i)}: {problem[1]}")
        return np.frombuffer(data, dtype=np.uint8), np.asarray(size, dtype=np.int64)

    def decode(self, i: int) -> Image.Image:
        """Image ``i`` decoded by PIL as 8-bit RGB; ``BadImageError`` naming it if it cannot be read or decoded."""
        return decode_rgb(self.read(i), self.describe(i))

    def describe(self, i: int) -> str:
        return str(self.index.root / self.index.paths[i])


class FileImages(EncodedImages):
    """An ImageFolder tree: one file per sample."""

    def read(self, i: int) -> memoryview:
        path = self.index.root / self.index.paths[i]
        try:
            return memoryview(path.read_bytes())
        except OSError as exc:
            raise BadImageError(f"cannot read image {path}: {exc}") from exc


class ShardImages(EncodedImages):
    """The converter's webdataset shards, read through their DALI index files.

    ``index.root`` is the source split folder the shards were made from (it
    may no longer exist); ``index.paths`` and ``labels`` come from
    ``samples/<split>.jsonl``. Members are read with ``os.pread`` rather than
    through memory maps: a shard truncated while the run reads it then gives a
    short read, named as a bad image, instead of a SIGBUS that kills the process.
    A shard is opened on its first read (ImageNet has thousands; an evaluation set or a
    rank may read few of them).
    """

    def __init__(self, index: ImageFolderIndex, tars: list[Path], idx_files: list[Path]):
        super().__init__(index)
        n = len(index)
        self._shard = np.full(n, -1, dtype=np.int64)
        self._offset = np.zeros(n, dtype=np.int64)
        self._length = np.zeros(n, dtype=np.int64)
        self.tars = list(tars)
        self._fds: dict[int, int] = {}  # shard -> open descriptor
        for shard, (tar, idx) in enumerate(zip(tars, idx_files)):
            data_end = 0  # where the last member listed by the index ends
            for key, offset, length in _jpeg_members(idx):
                if not 0 <= key < n or self._shard[key] >= 0:
                    raise DataError(f"{idx}: sample key {key} is out of range or repeated (dataset of {n} samples)")
                self._shard[key], self._offset[key], self._length[key] = shard, offset, length
                data_end = max(data_end, offset + length)
            size = os.stat(tar).st_size
            if data_end > size:
                raise DataError(f"shard {tar} is truncated: {size} bytes, but its index {idx.name} "
                                f"lists data up to byte {data_end}; reconvert the dataset")
        missing = np.flatnonzero(self._shard < 0)
        if len(missing):
            raise DataError(f"{len(missing)} sample(s) of {n} have no .jpg member in the shards, e.g. index "
                            f"{int(missing[0])}; reconvert the dataset")

    def read(self, i: int) -> memoryview:
        offset, length, shard = int(self._offset[i]), int(self._length[i]), int(self._shard[i])
        try:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise BadImageError(f"cannot read image {self.describe(i)}: {exc}") from exc
        if len(data) != length:
            raise BadImageError(f"cannot read image {self.describe(i)}: the shard ends before the image's "
                                f"{length} bytes at offset {offset} (truncated after the run started?)")
        return memoryview(data)

    def describe(self, i: int) -> str:
        return f"{self.index.paths[i]} (sample {i} in shard {self.tars[int(self._shard[i])]})"

    def __getstate__(self) -> dict:
        """Pickled (spawned DataLoader workers) without file descriptors; reopened by path on use."""
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _jpeg_members(idx_file: Path) -> Iterator[tuple[int, int, int]]:
    """(sample key, data offset, size) of each ``.jpg`` member listed in a DALI ``v1.2`` index file."""
    try:
        lines = idx_file.read_bytes().decode("ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{idx_file}: cannot be read as a DALI webdataset index ({exc}); reconvert the dataset") from None
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{idx_file}: not a DALI webdataset index (expected a 'v1.2 <count>' header)")
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        for ext, offset, size, name in zip(tokens[0::4], tokens[1::4], tokens[2::4], tokens[3::4]):
            if ext != "jpg":
                continue
            key = name.split(".", 1)[0]
            if not (key.isdigit() and offset.isdigit() and size.isdigit()):  # never a path: '../../evil.jpg'
                raise DataError(f"{idx_file}, line {number}: member {name!r} at {offset!r}, {size!r} bytes is not "
                                "a sample the converter writes (<9 digits>.jpg); reconvert the dataset")
            yield int(key), int(offset), int(size)


def shard_images(split: ConvertedSplit) -> ShardImages:
    """The images of a converted split, read from its DALI shards (checked against the manifest)."""
    tars, idx_files = split.shards()
    return ShardImages(split.index, tars, idx_files)
