"""Judging and decoding each source file of a conversion.

The source tree is listed by ``pipelines.image_folder`` (the index every
loader uses too); this module decides, file by file, whether to store it as
it is, re-encode it, or skip it with a recorded reason.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.images import open_rgb, refusal

# Outcome of inspecting one file.
COPY = "copy"  # a baseline/progressive RGB JPEG: stored as its original bytes
REENCODE = "reencode"  # decodable but not such a JPEG: stored re-encoded as RGB JPEG
SKIP = "skip"  # not usable: left out and recorded

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Verdict:
    """What to do with a candidate; ``reason`` is a short category, ``detail`` the error text."""

    action: str
    reason: str | None = None
    detail: str | None = None
    nbytes: int = 0  # of the source file
    size: tuple[int, int] = (0, 0)  # (width, height) of an accepted image, in pixels


def inspect_file(path: str, max_side: int | None = None) -> Verdict:
    """Read and fully decode ``path`` to decide whether to copy, re-encode or skip it.
    ``max_side`` (FFCV's ``--max-resolution``): skip an image so elongated that resizing its long
    side to it would leave its short side 0 pixels (FFCV's writer would fail on it).

    Decoding uses JPEG DCT scaling (``draft``), which still parses every
    entropy-coded byte, so truncation and corrupt data are caught at a
    fraction of the cost of a full decode.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Verdict(SKIP, "unreadable", f"{type(e).__name__}: {e.strerror or e}")
    if not data:
        return Verdict(SKIP, "empty-file", "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
            if fmt == "JPEG":
                img.draft(mode, (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
    except UnidentifiedImageError:
        return Verdict(SKIP, "not-an-image", f"no image format recognised in the first bytes {data[:8]!r}")
    except Image.DecompressionBombError as e:
        return Verdict(SKIP, "too-large", str(e))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        return Verdict(SKIP, reason, f"{type(e).__name__}: {e}")
    problem = refusal(fmt, mode)
    if problem:
        return Verdict(SKIP, *problem)
    if max_side is not None and min(width, height) * max_side < max(width, height):
        return Verdict(SKIP, "too-elongated", f"{width}x{height} pixels: the short side would be 0 pixels "
                       f"at --max-resolution {max_side}")
    if fmt != "JPEG":
        return Verdict(REENCODE, f"format:{fmt}", None, len(data), (width, height))
    if mode != "RGB":
        return Verdict(REENCODE, f"mode:{mode}", None, len(data), (width, height))
    if orientation not in (None, 1):
        # Decoders disagree on applying EXIF rotation (PIL, hence torchvision and
        # FFCV here, does not); storing rotation-free pixels keeps backends equal.
        return Verdict(REENCODE, f"exif-orientation:{orientation}", None, len(data), (width, height))
    return Verdict(COPY, None, None, len(data), (width, height))


def load_rgb(path: str) -> np.ndarray:
    """Decode as every loader does (``pipelines.images.open_rgb``): uint8 HWC RGB."""
    return np.asarray(open_rgb(path))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stored_jpeg(path: str, verdict: Verdict, quality: int) -> bytes:
    """The JPEG bytes to store for an accepted file (original bytes or a re-encode).

    Raises ``SourceChanged`` when a copied file no longer has the size it had
    when it was inspected.
    """
    if verdict.action == COPY:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != verdict.nbytes:
            raise SourceChanged(f"{path}: size changed from {verdict.nbytes} to {len(data)} bytes during conversion")
        return data
    return encode_jpeg(load_rgb(path), quality)


class SourceChanged(RuntimeError):
    """A source file changed between inspection and writing."""


def source_state(split_dir: Path, paths: list[str]) -> dict:
    """What a conversion of ``split_dir`` was made from: the number of files and a digest of
    each one's (relative path, size, mtime). A rerun compares it to tell a stale conversion."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        try:
            st = os.stat(split_dir / rel)
        except OSError:  # a link to nothing, or a file gone since listing
            st = os.lstat(split_dir / rel) if os.path.lexists(split_dir / rel) else None
        digest.update(f"{rel}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    return {"files": len(paths), "sha256": digest.hexdigest()}


def source_changes(before: list[str], after: list[str]) -> str:
    """``before`` and ``after`` (relative paths) compared in one line: added and removed files,
    or, when the names match, that some file changed in size or modification time."""
    old, new = set(before), set(after)
    added, removed = sorted(new - old), sorted(old - new)
    if not added and not removed:
        return "the same files, but some changed in size or modification time"
    parts = []
    for label, names in (("added", added), ("removed", removed)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
    return "; ".join(parts)
