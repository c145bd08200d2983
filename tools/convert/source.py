"""Reading the ImageFolder source: listing a split, and judging and decoding each file.

The listing follows torchvision's ``ImageFolder`` (class folders sorted by
name, files found by ``os.walk`` in sorted order, the same image extensions)
so that sample order and labels match what the torchvision backend sees.
Unlike ``ImageFolder`` it also reports what it leaves out (files of other
types, files outside class folders, empty class folders), so that nothing
present in the tree goes unaccounted for.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Outcome of inspecting one file.
COPY = "copy"  # a baseline/progressive RGB JPEG: stored as its original bytes
REENCODE = "reencode"  # decodable but not such a JPEG: stored re-encoded as RGB JPEG
SKIP = "skip"  # not usable: left out and recorded

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Candidate:
    """A file that will be inspected: ``path`` is relative to the split folder."""

    path: str
    label: int


@dataclass(frozen=True)
class Verdict:
    """What to do with a candidate; ``reason`` is a short category, ``detail`` the error text."""

    action: str
    reason: str | None = None
    detail: str | None = None
    nbytes: int = 0


@dataclass
class SplitListing:
    candidates: list[Candidate]
    ignored: list[dict]  # {"path", "reason", "detail"}: files no class folder or extension admits
    empty_classes: list[str]  # class folders holding no candidate file


def find_classes(split_dirs: list[Path]) -> list[str]:
    """Sorted union of the class folder names of the given split folders."""
    names: set[str] = set()
    for split_dir in split_dirs:
        with os.scandir(split_dir) as entries:
            names.update(e.name for e in entries if e.is_dir())
    return sorted(names)


def list_split(split_dir: Path, classes: list[str]) -> SplitListing:
    """Candidates of one split in ImageFolder order, labelled by position in ``classes``."""
    candidates: list[Candidate] = []
    ignored: list[dict] = []
    empty: list[str] = []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if not entry.is_dir():
                ignored.append({"path": entry.name, "reason": "outside-class-folder", "detail": None})
    ignored.sort(key=lambda r: r["path"])
    for label, name in enumerate(classes):
        found = 0
        for root, _, fnames in sorted(os.walk(split_dir / name, followlinks=True)):
            for fname in sorted(fnames):
                rel = os.path.relpath(os.path.join(root, fname), split_dir)
                if fname.lower().endswith(IMG_EXTENSIONS):
                    candidates.append(Candidate(rel, label))
                    found += 1
                else:
                    ignored.append({"path": rel, "reason": "not-an-image-extension", "detail": None})
        if not found:
            empty.append(name)  # an empty folder, or a class only the other splits have
    return SplitListing(candidates, ignored, empty)


def inspect_file(path: str) -> Verdict:
    """Read and fully decode ``path`` to decide whether to copy, re-encode or skip it.

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
            fmt, mode = img.format, img.mode
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
    if fmt != "JPEG":
        return Verdict(REENCODE, f"format:{fmt}", None, len(data))
    if mode != "RGB":
        return Verdict(REENCODE, f"mode:{mode}", None, len(data))
    if orientation not in (None, 1):
        # Decoders disagree on applying EXIF rotation (PIL, hence torchvision and
        # FFCV here, does not); storing rotation-free pixels keeps backends equal.
        return Verdict(REENCODE, f"exif-orientation:{orientation}", None, len(data))
    return Verdict(COPY, None, None, len(data))


def load_rgb(path: str) -> np.ndarray:
    """Decode like torchvision's ``pil_loader``: uint8 HWC RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return np.asarray(img.convert("RGB"))


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
