"""Evaluation images (the kNN monitor, ``train.evaluate``): deterministic transforms, any data root.

A split is read from what the run itself reads: a conversion's DALI shards,
so that the source JPEGs may be gone, or an ImageFolder tree. Evaluation runs
once per epoch on small sets, so plain PIL decoding in DataLoader workers
serves every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from pipelines.encoded_images import EncodedImages, FileImages, shard_images
from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.converted import is_converted, open_converted
from pipelines.image_folder import index_image_folder


class NoEvalSplit(DataError):
    """The data root holds no readable held-out split (not an error for training: no monitor)."""


class EvalImages(Dataset):
    """``(transform(image), label)`` for the samples ``ids`` of ``images``."""

    def __init__(self, images: EncodedImages, ids: Sequence[int], transform: Callable):
        self.images, self.ids, self.transform = images, np.asarray(ids, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        i = int(self.ids[k])
        return self.transform(self.images.decode(i)), int(self.images.labels[i])


def open_split_images(root: str | Path, split: str) -> EncodedImages:
    """The images of ``split`` under ``root``: a conversion's DALI shards, or an ImageFolder
    tree. A conversion without shards is refused, naming what would make it readable."""
    root = Path(root)
    if not is_converted(root):
        return FileImages(index_image_folder(root / split))
    converted = open_converted(root, split)
    if not layout.shard_dir(root, split).is_dir():
        raise NoEvalSplit(f"{root} holds no DALI shards for split {split!r} (evaluation reads the shards, not the "
                        f".beton): convert with --formats including dali")
    return shard_images(converted)


def capped_ids(n: int, cap: int | None, seed: int) -> np.ndarray:
    """``0..n-1``, or a seeded random draw of ``cap`` of them (ascending) when ``n > cap``."""
    ids = np.arange(n)
    if cap is not None and n > cap:
        ids = np.sort(np.random.default_rng(seed).choice(ids, cap, replace=False))
    return ids


@dataclass
class KnnData:
    """The kNN monitor's sets: the labeled train images and (a capped draw of) the val split."""

    labeled: EvalImages
    val: EvalImages
    num_classes: int


def knn_data(root: str | Path, train_split: str, val_split: str, labeled: np.ndarray, max_samples: int,
             transform: Callable, seed: int, on_bad_image: str = "error") -> KnnData:
    """The kNN monitor's data. ``NoEvalSplit`` says why there is none (no val split, a
    conversion without shards); other ``DataError``s are data problems (class folders differ,
    links to nothing in an ImageFolder tree: refused by name, or left out with ``on_bad_image``
    ``skip``, as the training loaders do)."""
    root = Path(root)
    if not is_converted(root) and not (root / val_split).is_dir():
        raise NoEvalSplit(f"there is no {val_split}/ split in {root}")
    if is_converted(root) and val_split not in layout.read_manifest(root)["splits"]:
        raise NoEvalSplit(f"the conversion {root} holds no {val_split!r} split")
    train = open_split_images(root, train_split)
    val = open_split_images(root, val_split)
    if val.index.classes != train.index.classes:
        raise DataError(f"class folders of {val.index.root} differ from those of {train.index.root}")
    readable = [_without_broken(images, ids, on_bad_image)
                for images, ids in ((train, labeled), (val, np.arange(len(val))))]
    val_ids = readable[1][capped_ids(len(readable[1]), max_samples, seed)]
    return KnnData(EvalImages(train, readable[0], transform), EvalImages(val, val_ids, transform),
                   len(train.index.classes))


def _without_broken(images: EncodedImages, ids: np.ndarray, on_bad_image: str) -> np.ndarray:
    """``ids`` without the links to nothing of an ImageFolder split, or a ``DataError`` naming them."""
    broken = set(images.index.broken)
    if not broken:
        return np.asarray(ids, dtype=np.int64)
    if on_bad_image != "skip":
        shown = ", ".join(str(images.index.root / p) for p in sorted(broken)[:3])
        raise DataError(f"{len(broken)} image(s) in {images.index.root} are symbolic links to nothing, e.g. "
                        f"{shown}; remove or fix them (or set data.on_bad_image=skip to leave them out)")
    return np.asarray([i for i in ids if images.index.paths[i] not in broken], dtype=np.int64)
