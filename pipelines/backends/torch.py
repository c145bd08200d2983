"""The torch backend: PIL decode and the planned views in DataLoader workers.

Needs nothing beyond torch and its core dependencies; it is what the demo and
every user without DALI or FFCV trains with. Each sample is decoded once and
all its planned views (every view group; ``pipelines.augment.host_views``)
are cut, flipped and coloured on uint8 in the worker; the main process only
moves each group to the device and normalises it. The views are a function
of the plan's image seeds (``pipelines.plan``), not of the worker that ran
them, so the stream does not depend on the number of workers and a resumed
run sees exactly the same views.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.augment.batched import normalize_only
from pipelines.augment.colour_kernels import normalize_on_host
from pipelines.augment.host_views import PlannedViews
from pipelines.augment.recipe import SimCLRRecipe, ViewGroup
from pipelines.bad_images import ReplacementPools, read_or_replace
from pipelines.contract import PretrainBatch
from pipelines.errors import LoaderFailure
from pipelines.image_folder import ImageFolderIndex
from pipelines.images import open_rgb
from pipelines.plan import Position, SamplePlan, SupportPlan, UnlabeledPlan
from pipelines.spec import LoaderSpec


class _ImageSource:
    """Decodes sample ``i`` under the ``data.on_bad_image`` policy (see ``pipelines.bad_images``)."""

    def __init__(self, index: ImageFolderIndex, pools: ReplacementPools, on_bad_image: str):
        self.paths = [str(index.root / p) for p in index.paths]
        self.pools, self.on_bad_image = pools, on_bad_image

    def load(self, i: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        return read_or_replace(i, lambda j: open_rgb(self.paths[j]), self.on_bad_image, self.pools)


class UnlabeledDataset(Dataset):
    """key (index, image seed) -> (one uint8 [count, r, r, 3] array per view group, index used,
    bad files skipped), every view from one decode."""

    def __init__(self, index: ImageFolderIndex, groups: tuple[ViewGroup, ...], on_bad_image: str = "error"):
        self.source = _ImageSource(index, ReplacementPools.single(len(index)), on_bad_image)
        self.views = PlannedViews(groups)

    def __len__(self) -> int:
        return len(self.source.paths)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        img, used, bad = self.source.load(i)
        return self.views(img, seed), used, bad


class SupportDataset(Dataset):
    """key (index, image seed) -> (uint8 [V, r, r, 3] views, label, bad files skipped).
    Replacements come from the labeled images (``labeled``) of the same class."""

    def __init__(self, index: ImageFolderIndex, recipe: SimCLRRecipe, views: int, labeled: np.ndarray,
                 on_bad_image: str = "error"):
        self.source = _ImageSource(index, ReplacementPools.by_class(index.labels, labeled), on_bad_image)
        self.labels = index.labels
        self.views = PlannedViews([ViewGroup(views, recipe)])

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        img, used, bad = self.source.load(i)
        return self.views(img, seed)[0], int(self.labels[used]), bad


class UnlabeledBatches:
    """The plan's unlabeled stream of one epoch, from a start step, as DataLoader batches of
    (index, image seed) keys."""

    def __init__(self, plan: UnlabeledPlan):
        self.plan = plan
        self.position = Position(plan.steps_per_epoch)

    def __len__(self) -> int:
        return self.position.steps_left

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.position.epoch
        for batch in self.plan.batches(epoch)[self.position.start_step :]:
            yield list(zip(batch.tolist(), self.plan.image_seeds(epoch, batch).tolist()))


class SupportBatches:
    """The plan's support stream for a range of global steps, as DataLoader batches of (index,
    image seed) keys (the seeds' positions: ``pipelines.plan``)."""

    def __init__(self, plan: SupportPlan):
        self.plan = plan
        self.first_step, self.num_steps = 0, 0

    def set_range(self, first_global_step: int, num_steps: int) -> None:
        self.first_step, self.num_steps = first_global_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for g, idx in enumerate(self.plan.batches(self.first_step, self.num_steps), start=self.first_step):
            yield list(zip(idx.tolist(), self.plan.image_seeds(g, idx).tolist()))


def view_major(images: list[np.ndarray]) -> torch.Tensor:
    """B arrays [count, r, r, 3] -> uint8 [count * B, r, r, 3], row ``v * B + i`` = view v of image i."""
    return torch.from_numpy(np.stack(images, axis=1)).flatten(0, 1)


def _collate_unlabeled(items):
    groups, ids, bad = zip(*items)
    return [view_major(list(g)) for g in zip(*groups)], torch.tensor(ids, dtype=torch.int64), sum(bad, ())


def _collate_support(items):
    views, labels, bad = zip(*items)
    images = torch.from_numpy(np.stack(views))  # [C*K, V, r, r, 3], class-major
    labels = torch.tensor(labels, dtype=torch.int64)
    return images.flatten(0, 1), labels.repeat_interleave(images.shape[1]), sum(bad, ())


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
        self.unlabeled = DataLoader(UnlabeledDataset(index, spec.views, spec.on_bad_image),
                                    batch_sampler=self.unlabeled_batches, collate_fn=_collate_unlabeled, **workers)
        self.support_batches = None
        self.support = None
        if plan.support is not None:
            self.support_batches = SupportBatches(plan.support)
            self.support = DataLoader(SupportDataset(index, spec.support_recipe, spec.support.views, labeled,
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

    def _to_device(self, x: torch.Tensor, recipe: SimCLRRecipe) -> torch.Tensor:
        """uint8 [n, r, r, 3] -> normalised ``spec.dtype`` [n, 3, r, r] on the device (uint8 crosses to
        a GPU; on the CPU one table lookup per value)."""
        if self.device.type == "cpu":
            x = normalize_on_host(x, recipe.mean, recipe.std).to(self.spec.dtype)
        else:
            x = normalize_only(x.to(self.device, non_blocking=True).permute(0, 3, 1, 2), recipe, self.spec.dtype)
        return x if self.spec.channels_last else x.contiguous()

    def __iter__(self) -> Iterator[PretrainBatch]:
        self._pass = self._batches()
        return self._pass

    def _batches(self) -> Iterator[PretrainBatch]:
        unlabeled = iter(self.unlabeled)
        support = iter(self.support) if self.support is not None else None
        epoch = self.position.epoch
        groups, support_recipe = self.spec.views, self.spec.support_recipe
        for step in range(self.position.start_step, len(self)):
            views, ids, bad = _next_batch(unlabeled, "unlabeled")
            if support is not None:
                s_img, s_lab, s_bad = _next_batch(support, "support")
                bad += s_bad
            else:
                r = support_recipe.resolution
                s_img, s_lab = torch.zeros((0, r, r, 3), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
            yield PretrainBatch(
                views=tuple(self._to_device(x, g.recipe) for x, g in zip(views, groups)),
                support_images=self._to_device(s_img, support_recipe),
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
