"""The training program's data: the typed ``LoaderSpec`` from the config, built once,
and from it the training stream and the kNN monitor's sets.

This is the only place that reads ``cfg.data`` for the data layer; the
backends see the spec alone (``pipelines.spec``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipelines.augment.reference import eval_transform
from pipelines.build import build_train_loader
from pipelines.contract import PretrainLoader
from pipelines.eval_data import NoEvalSplit, knn_data
from pipelines.labeled import LabeledSpec
from pipelines.spec import LoaderSpec, SupportSpec
from pipelines.train_split import check_root


def support_spec(cfg) -> SupportSpec | None:
    """The support set of ``cfg``, or None when no objective reads one (SuNCEt off for the whole
    run, and not PAWS)."""
    d = cfg.data
    if not cfg.uses_support:
        return None
    return SupportSpec(d.support_classes, d.support_images_per_class, d.support_views, d.unique_classes,
                       d.support_view_group)


def labeled_spec(cfg) -> LabeledSpec:
    return LabeledSpec(cfg.data.labeled_list, cfg.data.labeled_fraction, cfg.run.seed)


def loader_spec(cfg, rank: int, world_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> LoaderSpec:
    """One rank's ``LoaderSpec`` for ``cfg`` (a ``PretrainConfig``)."""
    d = cfg.data
    return LoaderSpec(
        backend=d.backend, root=Path(d.root), train_split=d.train_split, labeled=labeled_spec(cfg),
        batch_size=d.unlabeled_batch_size, support=support_spec(cfg), views=cfg.augment.view_groups(),
        seed=cfg.run.seed, rank=rank, world_size=world_size, device=torch.device(device), dtype=dtype,
        channels_last=cfg.model.channels_last, host_workers=d.num_workers, prefetch=d.prefetch_factor,
        on_bad_image=d.on_bad_image,
    )


@dataclass
class Loaders:
    train: PretrainLoader
    num_classes: int
    num_labeled: int
    knn_train: DataLoader | None  # labeled subset, eval transform
    knn_test: DataLoader | None  # held-out split, eval transform
    knn_off: str | None = None  # why there is no kNN monitor although run.knn_every_epochs asks for one
    num_images: int = 0  # in the training split
    source: str = ""  # what the training stream reads


def build_loaders(cfg, rank: int, world_size: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Loaders:
    """The training stream of ``cfg.data.backend`` and, on rank 0 when ``run.knn_every_epochs``
    asks for it, the kNN monitor's loaders (or the reason there are none)."""
    d = cfg.data
    check_root(d.root, d.train_split, d.val_split)
    data = build_train_loader(loader_spec(cfg, rank, world_size, device, dtype))
    knn_train = knn_test = knn_off = None
    if cfg.run.knn_every_epochs > 0 and rank == 0:  # only the main rank evaluates
        try:
            knn = knn_data(d.root, d.train_split, d.val_split, data.labeled, d.knn_max_samples,
                           eval_transform(cfg.eval_recipe), cfg.run.seed, d.on_bad_image)
        except NoEvalSplit as exc:
            knn_off = str(exc)
        else:
            workers = min(d.num_workers, 4)
            knn_train = DataLoader(knn.labeled, batch_size=256, shuffle=False, num_workers=workers)
            knn_test = DataLoader(knn.val, batch_size=256, shuffle=False, num_workers=workers)
    return Loaders(data.loader, data.num_classes, len(data.labeled), knn_train, knn_test, knn_off, len(data.index),
                   data.source)
