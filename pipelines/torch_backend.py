"""Reference backend: torchvision ImageFolder + DataLoader workers.

Slow but simple; it is the baseline the DALI and FFCV backends must beat and
the statistics they are checked against. Every sample's augmentation is
seeded from (seed, epoch, sample index, stream), so the stream does not depend
on the number of workers and a resumed run sees exactly the same views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.bad_images import BadImageError, ReplacementPools, read_or_replace
from pipelines.contract import LoaderFailure, PretrainBatch
from pipelines.datasets import ImageFolderIndex
from pipelines.reference_transforms import simclr_transform
from pipelines.recipe import SimCLRRecipe
from pipelines.sampler import ClassBalancedSampler
from pipelines.schedules import UnlabeledSchedule

UNLABELED_STREAM, SUPPORT_STREAM = 0, 1


def sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 63-bit seed that depends only on its arguments."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, naming the file in any error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types; all mean "bad file"
        raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


class _ImageSource:
    """Decodes sample ``i`` under the ``data.on_bad_image`` policy (see ``pipelines.bad_images``)."""

    def __init__(self, index: ImageFolderIndex, pools: ReplacementPools, on_bad_image: str):
        self.paths = [str(index.root / p) for p in index.paths]
        self.pools, self.on_bad_image = pools, on_bad_image

    def load(self, i: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        return read_or_replace(i, lambda j: load_rgb(self.paths[j]), self.on_bad_image, self.pools)


class TwoViewDataset(Dataset):
    """key (index, seed) -> (view1, view2, index used, bad files skipped), both views from one decode."""

    def __init__(self, index: ImageFolderIndex, recipe: SimCLRRecipe, on_bad_image: str = "error"):
        self.source = _ImageSource(index, ReplacementPools.single(len(index)), on_bad_image)
        self.transform = simclr_transform(recipe)

    def __len__(self) -> int:
        return len(self.source.paths)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        img, used, bad = self.source.load(i)
        torch.manual_seed(seed)
        return self.transform(img), self.transform(img), used, bad


class SupportDataset(Dataset):
    """key (index, seed) -> ([V,3,H,W] views, label, bad files skipped). Replacements
    come from the labeled images (``labeled``) of the same class."""

    def __init__(self, index: ImageFolderIndex, recipe: SimCLRRecipe, views: int, labeled: np.ndarray,
                 on_bad_image: str = "error"):
        self.source = _ImageSource(index, ReplacementPools.by_class(index.labels, labeled), on_bad_image)
        self.labels = index.labels
        self.transform = simclr_transform(recipe)
        self.views = views

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        img, used, bad = self.source.load(i)
        torch.manual_seed(seed)
        return torch.stack([self.transform(img) for _ in range(self.views)]), int(self.labels[used]), bad


class UnlabeledBatches(UnlabeledSchedule):
    """The shared unlabeled schedule as DataLoader batches of (index, seed)."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order().astype(np.int64).reshape(-1, self.batch_size)
        for batch in order:
            yield [(int(i), sample_seed(self.seed, self.epoch, int(i), UNLABELED_STREAM)) for i in batch]


class SupportBatches:
    """The support stream for a range of global steps: global step g uses
    batch g mod L of the class-balanced sampler's epoch g div L (L its length),
    so the stream is a pure function of the global step and resumes exactly."""

    def __init__(self, sampler: ClassBalancedSampler, labeled: np.ndarray, seed: int):
        self.sampler, self.labeled, self.seed = sampler, labeled, seed
        self.first_step, self.num_steps = 0, 0

    def set_range(self, first_global_step: int, num_steps: int) -> None:
        self.first_step, self.num_steps = first_global_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = len(self.sampler)
        g, end = self.first_step, self.first_step + self.num_steps
        while g < end:
            epoch, step = divmod(g, per_epoch)
            self.sampler.set_epoch(epoch, start_step=step)
            for positions in self.sampler:
                idx = self.labeled[np.asarray(positions)]
                yield [(int(i), sample_seed(self.seed, g, int(i), SUPPORT_STREAM)) for i in idx]
                g += 1
                if g >= end:
                    return


def _collate_unlabeled(items):
    v1, v2, ids, bad = zip(*items)
    return torch.stack(v1), torch.stack(v2), torch.tensor(ids, dtype=torch.int64), sum(bad, ())


def _collate_support(items):
    views, labels, bad = zip(*items)
    views = torch.stack(views)  # [C*K, V, 3, H, W], class-major
    labels = torch.tensor(labels, dtype=torch.int64)
    v = views.shape[1]
    return views.flatten(0, 1), labels.repeat_interleave(v), sum(bad, ())


def _next_batch(batches: Iterator, stream: str):
    """``next(batches)``, with a worker that died while handing over a batch reported as such
    (torch names a dead worker itself when it notices first; otherwise the main process
    sees only a broken pipe to it)."""
    try:
        return next(batches)
    except (ConnectionError, EOFError) as exc:
        raise LoaderFailure(f"a DataLoader worker of the {stream} stream died while sending a batch (killed, or "
                           f"out of memory?): {type(exc).__name__}: {exc}") from exc


@dataclass
class TorchLoaderSettings:
    batch_size: int
    support_views: int
    num_workers: int
    prefetch_factor: int
    seed: int
    dtype: torch.dtype
    channels_last: bool = True
    on_bad_image: str = "error"


class TorchPretrainLoader:
    """Yields ``PretrainBatch`` from two DataLoaders (unlabeled, support)."""

    def __init__(self, index: ImageFolderIndex, labeled: np.ndarray, support_sampler: ClassBalancedSampler | None,
                 recipe: SimCLRRecipe, settings: TorchLoaderSettings, rank: int, world_size: int,
                 device: torch.device):
        self.settings, self.device = settings, device
        self.unlabeled_batches = UnlabeledBatches(len(index), settings.batch_size, rank, world_size, settings.seed)
        workers = dict(num_workers=settings.num_workers, pin_memory=device.type == "cuda",
                       persistent_workers=settings.num_workers > 0)
        if settings.num_workers > 0:
            workers["prefetch_factor"] = settings.prefetch_factor
        self.unlabeled = DataLoader(TwoViewDataset(index, recipe, settings.on_bad_image),
                                    batch_sampler=self.unlabeled_batches, collate_fn=_collate_unlabeled, **workers)
        self.support_batches = None
        self.support = None
        if support_sampler is not None:
            self.support_batches = SupportBatches(support_sampler, labeled, settings.seed)
            self.support = DataLoader(SupportDataset(index, recipe, settings.support_views, labeled,
                                                   settings.on_bad_image),
                                      batch_sampler=self.support_batches, collate_fn=_collate_support, **workers)
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return len(self.unlabeled_batches)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step
        self.unlabeled_batches.set_epoch(epoch, start_step)
        if self.support_batches is not None:
            self.support_batches.set_range(epoch * len(self) + start_step, len(self) - start_step)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        return x.to(self.device, dtype=self.settings.dtype, non_blocking=True, memory_format=fmt)

    def __iter__(self) -> Iterator[PretrainBatch]:
        unlabeled = iter(self.unlabeled)
        support = iter(self.support) if self.support is not None else None
        for step in range(self.start_step, len(self)):
            v1, v2, ids, bad = _next_batch(unlabeled, "unlabeled")
            if support is not None:
                s_img, s_lab, s_bad = _next_batch(support, "support")
                bad += s_bad
            else:
                s_img, s_lab = v1.new_zeros((0, *v1.shape[1:])), torch.zeros(0, dtype=torch.int64)
            yield PretrainBatch(
                view1=self._to_device(v1), view2=self._to_device(v2),
                support_images=self._to_device(s_img),
                support_labels=s_lab.to(self.device, non_blocking=True),
                sample_ids=ids, epoch=self.epoch, step=step, bad_images=bad,
            )
        self.start_step = 0
