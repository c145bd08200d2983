"""``build_train_loader``: the one place that picks a backend by name.

The work every backend shares is done once, here, by modules the backends
also read: the split and its labeled subset (``pipelines.train_split``), and
the rank's sample plan (``pipelines.plan``). The backend only turns that plan
into tensors. DALI and FFCV are optional dependencies, imported when named.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.contract import PretrainLoader
from pipelines.encoded_images import FileImages, shard_images
from pipelines.format import layout
from pipelines.image_folder import ImageFolderIndex
from pipelines.plan import build_plan
from pipelines.spec import LoaderSpec
from pipelines.train_split import TrainSplit, open_train_split


@dataclass
class TrainData:
    """A rank's training stream and what it was built from."""

    loader: PretrainLoader
    index: ImageFolderIndex  # the training split's samples
    labeled: np.ndarray  # sample indices of the labeled subset
    source: str  # what is read, for the console: "ImageFolder tree /data/train", "FFCV .beton ..."

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)


def build_train_loader(spec: LoaderSpec, split: TrainSplit | None = None) -> TrainData:
    """The training stream of ``spec.backend`` for this rank (``split``: already opened, or None)."""
    split = split or open_train_split(spec)
    plan = build_plan(len(split.index), split.index.labels, split.labeled, spec.batch_size, spec.support,
                      spec.rank, spec.world_size, spec.seed)
    if spec.backend == "torch":
        from pipelines.backends import torch as backend

        loader = backend.build(spec, split.index, split.labeled, plan)
        source = f"ImageFolder tree {split.index.root}"
    elif spec.backend == "dali":
        from pipelines.backends import dali as backend  # optional dependency

        images = shard_images(split.converted) if split.converted is not None else FileImages(split.index)
        loader = backend.build(spec, images, split.labeled, plan)
        source = (f"DALI shards {layout.shard_dir(split.converted.root, split.converted.split)}"
                  if split.converted is not None else f"ImageFolder tree {split.index.root}")
    else:
        from pipelines.backends.ffcv import loader as backend  # optional dependency

        loader = backend.build(spec, split.converted, plan)
        source = f"FFCV .beton {layout.beton_path(split.converted.root, split.converted.split)}"
    return TrainData(loader, split.index, split.labeled, source)
