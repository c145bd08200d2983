"""Reference backend: torchvision ImageFolder + DataLoader workers.

Slow but simple; it is the baseline the DALI and FFCV backends must beat and
the statistics they are checked against. Every sample's augmentation is
seeded from (seed, epoch, sample index, stream), so the stream does not depend
on the number of workers and a resumed run sees exactly the same views.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.augment.recipe import SimCLRRecipe
from pipelines.augment.reference import simclr_transform
from pipelines.bad_images import ReplacementPools, read_or_replace
from pipelines.contract import PretrainBatch
from pipelines.errors import LoaderFailure
from pipelines.image_folder import ImageFolderIndex
from pipelines.images import open_rgb
from pipelines.plan import (SUPPORT_STREAM, UNLABELED_STREAM, Position, SamplePlan, SupportPlan, UnlabeledPlan,
                            sample_seed)
from pipelines.spec import LoaderSpec


class _ImageSource:
    """Decodes sample ``i`` under the ``data.on_bad_image`` policy (see ``pipelines.bad_images``)."""

    def __init__(self, index: ImageFolderIndex, pools: ReplacementPools, on_bad_image: str):
        self.paths = [str(index.root / p) for p in index.paths]
        self.pools, self.on_bad_image = pools, on_bad_image

    def load(self, i: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        return read_or_replace(i, lambda j: open_rgb(self.paths[j]), self.on_bad_image, self.pools)


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


class UnlabeledBatches:
    """The plan's unlabeled stream of one epoch, from a start step, as DataLoader
    batches of (index, seed) keys; each sample's views are seeded by (seed, epoch, index)."""

    def __init__(self, plan: UnlabeledPlan):
        self.plan = plan
        self.position = Position(plan.steps_per_epoch)

    def __len__(self) -> int:
        return self.position.steps_left

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.position.epoch
        for batch in self.plan.batches(epoch)[self.position.start_step :]:
            yield [(int(i), sample_seed(self.plan.seed, epoch, int(i), UNLABELED_STREAM)) for i in batch]


class SupportBatches:
    """The plan's support stream for a range of global steps, as DataLoader batches of (index,
    seed) keys. Each image's views are seeded by (seed, global step, index, position), where
    position is the image's place in its class's block of the step's *global* support set:
    ``rank * K + k`` when the ranks share the step's classes (each rank takes its K of the class's
    ``world size x K``), ``k`` with ``unique_classes``. When a class has fewer than world size x K
    labeled images two ranks get the same image, and the position keeps their views apart
    (identical rows in the gathered SuNCEt batch would be free positives); on one rank with
    ``world size x K`` images per class the positions, hence the views, are the same."""

    def __init__(self, plan: SupportPlan, seed: int, rank: int, shared_classes: bool):
        self.plan, self.seed = plan, seed
        k = plan.sampler.images_per_class
        offset = rank * k if shared_classes else 0
        self.positions = [offset + e % k for e in range(plan.batch_size)]  # class-major: K per class
        self.first_step, self.num_steps = 0, 0

    def set_range(self, first_global_step: int, num_steps: int) -> None:
        self.first_step, self.num_steps = first_global_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for g, idx in enumerate(self.plan.batches(self.first_step, self.num_steps), start=self.first_step):
            yield [(int(i), sample_seed(self.seed, g, int(i), pos, SUPPORT_STREAM))
                   for i, pos in zip(idx, self.positions)]


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


class TorchPretrainLoader:
    """Yields ``PretrainBatch`` from two DataLoaders (unlabeled, support) that follow ``plan``."""

    def __init__(self, spec: LoaderSpec, index: ImageFolderIndex, labeled: np.ndarray, plan: SamplePlan):
        self.spec, self.device = spec, spec.device
        self.plan = plan
        self.unlabeled_batches = UnlabeledBatches(plan.unlabeled)
        workers = dict(num_workers=spec.host_workers, pin_memory=spec.device.type == "cuda",
                       persistent_workers=spec.host_workers > 0)
        if spec.host_workers > 0:
            workers["prefetch_factor"] = spec.prefetch
        self.unlabeled = DataLoader(TwoViewDataset(index, spec.recipe, spec.on_bad_image),
                                    batch_sampler=self.unlabeled_batches, collate_fn=_collate_unlabeled, **workers)
        self.support_batches = None
        self.support = None
        if plan.support is not None:
            self.support_batches = SupportBatches(plan.support, spec.seed, spec.rank, not spec.support.unique_classes)
            self.support = DataLoader(SupportDataset(index, spec.recipe, spec.support.views, labeled,
                                                     spec.on_bad_image),
                                      batch_sampler=self.support_batches, collate_fn=_collate_support, **workers)
        self.position = self.unlabeled_batches.position  # the loader's one (epoch, start step)
        self._pass: Iterator[PretrainBatch] | None = None

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.position.set(epoch, start_step)
        if self.support_batches is not None:
            self.support_batches.set_range(self.plan.global_step(epoch, start_step), len(self) - start_step)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        return x.to(self.device, dtype=self.spec.dtype, non_blocking=True, memory_format=fmt)

    def __iter__(self) -> Iterator[PretrainBatch]:
        self._pass = self._batches()
        return self._pass

    def _batches(self) -> Iterator[PretrainBatch]:
        unlabeled = iter(self.unlabeled)
        support = iter(self.support) if self.support is not None else None
        epoch = self.position.epoch
        for step in range(self.position.start_step, len(self)):
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
                sample_ids=ids, epoch=epoch, step=step, bad_images=bad,
            )
        self.position.start_step = 0

    def close(self) -> None:
        """End a pass cut short (its DataLoader iterators shut their workers down)."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build(spec: LoaderSpec, index: ImageFolderIndex, labeled: np.ndarray, plan: SamplePlan) -> TorchPretrainLoader:
    return TorchPretrainLoader(spec, index, labeled, plan)
