"""Decoding one image to 8-bit RGB, the same way for the converter, the loaders and evaluation.

PIL's ``convert("RGB")`` clips the integer modes instead of scaling them: a
16-bit grayscale PNG (mode ``I;16``, values up to 65535) becomes a white
image. ``to_rgb8`` scales such modes to 8 bits first (as DALI's decoder and
libpng's 16-to-8 reduction do: ``round(v / 257)``) and refuses the modes that
have no defined 8-bit scale, naming the mode, instead of storing garbage.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.errors import BadImageError

# Integer modes holding 16-bit samples (PIL opens 16-bit grayscale PNG/TIFF/PGM as one of these).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes whose pixels have no fixed range, so no 8-bit scaling can be assumed.
UNSCALABLE_MODES = frozenset({"I", "F"})
# File formats (PIL's names) that every reader decodes: PIL (the torch backend, evaluation, the
# converter) and DALI's decoder (which reads an ImageFolder tree's files as they are). PIL alone
# reads the others (GIF, ICO, ...): they are refused everywhere, so that every backend uses the
# same images of a tree.
SHARED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM"})  # MPO: a camera JPEG


def refusal(fmt: str | None, mode: str) -> tuple[str, str] | None:
    """``(reason, detail)`` when no reader uses an image of this format and mode, else None:
    the one readability rule of the converter, the loaders and evaluation."""
    if fmt not in SHARED_FORMATS:
        return ("unsupported-format", f"format {fmt or 'unknown'} is not decoded by every backend (DALI decodes "
                f"{', '.join(sorted(SHARED_FORMATS))}); convert the file to JPEG or PNG")
    if mode in UNSCALABLE_MODES:
        return ("unsupported-mode", f"mode {mode} ({'32-bit integer' if mode == 'I' else 'floating-point'} samples) "
                "has no defined 8-bit scaling; convert the file to an 8- or 16-bit image")
    return None


def _check(img: Image.Image) -> None:
    problem = refusal(img.format, img.mode)
    if problem:
        raise ValueError(problem[1])


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB with its content preserved (alpha dropped, as torchvision does).

    Raises ``ValueError`` for 32-bit integer and floating-point images."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    elif img.mode in UNSCALABLE_MODES:
        raise ValueError(f"mode {img.mode} ({'32-bit integer' if img.mode == 'I' else 'floating-point'} samples) "
                         "has no defined 8-bit scaling; convert the file to an 8- or 16-bit image")
    return img.convert("RGB")  # a loaded copy also when already RGB: the file may close after this


def open_rgb(path: str) -> Image.Image:
    """The file at ``path`` decoded as 8-bit RGB; ``BadImageError`` naming the file on any failure."""
    try:
        with Image.open(path) as img:
            _check(img)
            return to_rgb8(img)
    except Exception as exc:  # PIL raises many types; all mean "bad file"
        raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def decode_rgb(data: bytes | memoryview, name: str) -> Image.Image:
    """Encoded bytes decoded as 8-bit RGB; ``BadImageError`` naming ``name`` on any failure."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            _check(img)
            return to_rgb8(img)
    except Exception as exc:  # PIL raises many types; all mean "bad file"
        raise BadImageError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
