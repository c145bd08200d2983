"""Write scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10
classes) as JPEG files in ImageFolder layout: the no-download dataset behind
``make demo``.

    python -m tools.make_demo_data --out data/digits --size 32
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write ``out/{train,val}/<digit>/<n>.jpg``; returns image counts per split.
    Existing complete output is reused."""
    from sklearn.datasets import load_digits  # ships the data; no download

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(images)) < val_fraction
    marker = out / ".complete"
    counts = {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    if marker.exists() and marker.read_text() == f"{size} {val_fraction} {seed}":
        return counts
    for i, (img, label) in enumerate(zip(images, digits.target)):
        split = "val" if is_val[i] else "train"
        folder = out / split / f"{label}"
        folder.mkdir(parents=True, exist_ok=True)
        # White digit on black, upsampled smoothly, as a 3-channel JPEG.
        pil = Image.fromarray(img, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        pil.save(folder / f"{i:04d}.jpg", quality=95)
    marker.write_text(f"{size} {val_fraction} {seed}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_demo_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/digits", help="ImageFolder root to write (train/ and val/)")
    p.add_argument("--size", type=int, default=32, help="side of the written JPEGs, in pixels")
    args = p.parse_args(argv)
    counts = write_digits(Path(args.out), args.size)
    print(f"wrote {counts['train']} train / {counts['val']} val digit images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
