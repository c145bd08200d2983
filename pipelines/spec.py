"""``LoaderSpec``: everything a loader backend needs, typed, built once by the caller.

The training program fills it from its config (``train.data.loader_spec``);
backends read nothing else, in particular no loss settings: whether there is
a support stream is decided before (``support`` is None for SimCLR alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.augment.recipe import SimCLRRecipe, ViewGroup
from pipelines.labeled import LabeledSpec

BACKENDS = ("torch", "dali", "ffcv")


@dataclass(frozen=True)
class SupportSpec:
    """The labeled support set of one rank and step: ``classes`` x ``images_per_class``
    images, each in ``views`` augmented views drawn from view group ``group``'s recipe
    (SuNCEt's and PAWS's support views are global views: group 0); with
    ``unique_classes`` the ranks draw disjoint classes (see ``pipelines.sampler``)."""

    classes: int
    images_per_class: int
    views: int = 1
    unique_classes: bool = False
    group: int = 0

    @property
    def images(self) -> int:
        return self.classes * self.images_per_class


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's training stream.

    ``host_workers`` is the backend's CPU parallelism, in the backend's own unit:
    DataLoader worker processes per stream (torch; 0 decodes in the training
    process), CPU threads per DALI pipeline (at least 1), numba threads per FFCV
    loader (at least 1). ``prefetch`` is batches prepared ahead per stream.
    """

    backend: str
    root: Path
    train_split: str
    labeled: LabeledSpec
    batch_size: int  # unlabeled images per rank and step
    support: SupportSpec | None
    views: tuple[ViewGroup, ...]  # the view groups of each unlabeled image (pipelines.augment.recipe)
    seed: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # of the delivered images
    channels_last: bool = True
    host_workers: int = 2
    prefetch: int = 2
    on_bad_image: str = "error"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not self.views:
            raise ValueError("a loader needs at least one view group")
        if self.support is not None and not 0 <= self.support.group < len(self.views):
            raise ValueError(f"data.support_view_group must name one of the {len(self.views)} view group(s) "
                             f"(0 .. {len(self.views) - 1}), got {self.support.group}")

    @property
    def train_root(self) -> Path:
        return Path(self.root) / self.train_split

    @property
    def support_recipe(self) -> SimCLRRecipe:
        return self.views[self.support.group if self.support is not None else 0].recipe


@dataclass(frozen=True)
class EvalSpec:
    """The kNN monitor's data: the labeled train images against ``max_samples`` of ``val_split``."""

    val_split: str
    max_samples: int
    batch_size: int = 256
    workers: int = 2
