"""``build_loaders``: the one place that picks a backend by name.

Every backend yields the same ``PretrainBatch`` contract; evaluation loaders
(kNN monitor) are plain torchvision DataLoaders for all backends, since they
run once per epoch on small sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipelines.contract import PretrainLoader
from pipelines.datasets import DataError, ImageFolderIndex, index_image_folder, read_labeled_list, stratified_subset
from pipelines.reference_transforms import eval_transform
from pipelines.recipe import SimCLRRecipe
from pipelines.sampler import ClassBalancedSampler
from pipelines.torch_backend import TorchLoaderSettings, TorchPretrainLoader, load_rgb


@dataclass
class Loaders:
    train: PretrainLoader
    num_classes: int
    num_labeled: int
    knn_train: DataLoader | None  # labeled subset, eval transform
    knn_test: DataLoader | None  # held-out split, eval transform


class EvalDataset(Dataset):
    """(image, label) with the deterministic evaluation transform."""

    def __init__(self, index: ImageFolderIndex, recipe: SimCLRRecipe):
        self.paths = [str(index.root / p) for p in index.paths]
        self.labels = index.labels
        self.transform = eval_transform(recipe)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.paths[i])), int(self.labels[i])


def labeled_indices(cfg, index: ImageFolderIndex, converted: np.ndarray | None = None) -> np.ndarray:
    """``data.labeled_list`` if set, else the converter's subset (``converted``) if
    any, else a class-stratified draw of ``data.labeled_fraction`` with ``run.seed``."""
    d = cfg.data
    if d.labeled_list:
        return read_labeled_list(d.labeled_list, index)
    if converted is not None:
        return converted
    # At least one image per class, never more than the fraction asks for otherwise: a class
    # with fewer than K labeled images is refused by the support sampler, naming the key.
    return stratified_subset(index.labels, d.labeled_fraction, cfg.run.seed, min_per_class=1)


def build_support_sampler(cfg, labels: np.ndarray, rank: int, world_size: int) -> ClassBalancedSampler | None:
    d = cfg.data
    if cfg.loss.suncet_weight == 0 or d.support_classes == 0:
        return None
    try:
        return ClassBalancedSampler(labels, d.support_classes, d.support_images_per_class, rank=rank,
                                    world_size=world_size, unique_classes=d.unique_classes, seed=cfg.run.seed)
    except ValueError as exc:  # impossible support set for this labeled subset: a data/config problem
        raise DataError(f"support set: {exc}") from exc


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def build_loaders(cfg, rank: int, world_size: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Loaders:
    """Build the training stream for ``cfg.data.backend`` and the kNN loaders."""
    d = cfg.data
    if not d.root:
        raise DataError("data.root is not set: point it at a directory holding "
                        f"{d.train_split}/ and {d.val_split}/ (ImageFolder layout or a converted dataset)")
    root = Path(d.root)
    if not root.is_dir():
        raise DataError(f"data.root does not exist: {root}")
    if d.backend == "torch":
        index = index_image_folder(root / d.train_split)
        labeled = labeled_indices(cfg, index)
        sampler = build_support_sampler(cfg, index.labels[labeled], rank, world_size)
        settings = TorchLoaderSettings(d.unlabeled_batch_size, d.support_views, d.num_workers, d.prefetch_factor,
                                       cfg.run.seed, dtype, cfg.model.channels_last, d.on_bad_image)
        train = TorchPretrainLoader(index, labeled, sampler, cfg.augment, settings, rank, world_size, device)
    elif d.backend == "dali":
        from pipelines.dali_backend import build_dali_loader  # optional dependency

        index, labeled, train = build_dali_loader(cfg, rank, world_size, device, dtype)
    elif d.backend == "ffcv":
        from pipelines.ffcv_backend import build_ffcv_loader  # optional dependency

        index, labeled, train = build_ffcv_loader(cfg, rank, world_size, device, dtype)
    else:
        raise DataError(f"unknown data.backend {d.backend!r}")

    knn_train = knn_test = None
    val_root = root / d.val_split
    if not val_root.is_dir() and isinstance(index, ImageFolderIndex):
        val_root = index.root.parent / d.val_split  # converted data: the source tree beside the train split
    if cfg.run.knn_every_epochs > 0 and val_root.is_dir() and isinstance(index, ImageFolderIndex):
        val_index = index_image_folder(val_root)
        if val_index.classes != index.classes:
            raise DataError(f"class folders of {val_root} differ from those of {index.root}")
        rng = np.random.default_rng(cfg.run.seed)
        test_ids = np.arange(len(val_index))
        if len(test_ids) > d.knn_max_samples:
            test_ids = np.sort(rng.choice(test_ids, d.knn_max_samples, replace=False))
        workers = min(d.num_workers, 4)
        knn_train = eval_loader(Subset(EvalDataset(index, cfg.augment), labeled.tolist()), 256, workers)
        knn_test = eval_loader(Subset(EvalDataset(val_index, cfg.augment), test_ids.tolist()), 256, workers)
    return Loaders(train, len(index.classes), len(labeled), knn_train, knn_test)
