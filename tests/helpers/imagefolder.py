"""Tiny ImageFolder trees of real JPEGs for tests.

The images are smooth (a colour gradient plus a few soft blobs), so JPEG
re-encoding at ordinary qualities changes them little and pixel checks can
use tight PSNR bounds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def smooth_image(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """A random smooth RGB image, uint8 HWC; ``size`` is a side or ``(width, height)``."""
    width, height = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    corners = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    img = (corners[0] * ((1 - x) * (1 - y))[..., None] + corners[1] * (x * (1 - y))[..., None]
           + corners[2] * ((1 - x) * y)[..., None] + corners[3] * (x * y)[..., None])
    for _ in range(3):
        cy, cx = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.1, 0.35)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))[..., None]
        img = img * (1 - weight) + rng.uniform(0, 255, size=3).astype(np.float32) * weight
    return np.clip(img, 0, 255).round().astype(np.uint8)


def make_image_folder(
    root: str | Path,
    classes: int | Sequence[str],
    images_per_class: int | Sequence[int],
    size: int | tuple[int, int],
    seed: int = 0,
    *,
    ext: str = ".JPEG",
    quality: int = 95,
) -> list[Path]:
    """Write ``root/<class>/<class>_<i><ext>`` JPEGs and return their paths in ImageFolder order.

    ``classes`` is a list of folder names or a count (names ``n00000000``,
    ``n00000001``, ... like ImageNet wnids). ``images_per_class`` is one count
    for every class or one per class (0 makes an empty class folder). ``size``
    is a side or ``(width, height)``. The returned list is sorted the way
    torchvision's ImageFolder orders samples (class folder, then file name).
    """
    root = Path(root)
    names = [f"n{i:08d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    counts = [images_per_class] * len(names) if isinstance(images_per_class, int) else list(images_per_class)
    if len(counts) != len(names):
        raise ValueError(f"images_per_class has {len(counts)} entries for {len(names)} classes")
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for name, count in zip(names, counts):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"{name}_{i}{ext}"
            Image.fromarray(smooth_image(rng, size)).save(path, format="JPEG", quality=quality)
            written.append(path)
    return sorted(written, key=lambda p: (p.parent.name, p.name))
