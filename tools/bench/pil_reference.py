"""The loader SimCLR users run today, as the baseline of ``tools.throughput`` (``--backend pil-reference``).

solo-learn's pipeline (lightly's, and the SimCLR and SuNCEt reference code's,
differ only in order and interpolation), applied by torchvision to PIL images,
one view at a time, in DataLoader workers: ``RandomResizedCrop`` (bilinear,
torchvision's default and lightly's; solo-learn's bicubic costs more, so the
baseline takes the faster one),
``RandomApply([ColorJitter], p)``, ``RandomGrayscale``, ``RandomApply([PIL
GaussianBlur])`` (``ImageFilter.GaussianBlur(radius=sigma)``), PIL solarize when
the recipe has it, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``. It
serves the same step as the backends, from the same plan (the same images and
support set; every view group), on ``data.num_workers`` workers per stream as
the torch backend does, so that only the way a view is made differs.

It is a benchmark baseline, not a backend: its draws come from each worker's
torch and Python generators (not the plan's seeds), so it neither resumes
exactly nor matches the other backends' views.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from PIL import ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipelines.augment.recipe import SimCLRRecipe, ViewGroup
from pipelines.backends.torch import SupportBatches, UnlabeledBatches
from pipelines.build import TrainData
from pipelines.contract import PretrainBatch
from pipelines.image_folder import ImageFolderIndex
from pipelines.images import open_rgb
from pipelines.plan import Position, SamplePlan, build_plan
from pipelines.spec import LoaderSpec
from pipelines.train_split import open_train_split

NAME = "pil-reference"


class PILGaussianBlur:
    """solo-learn's blur: PIL's Gaussian filter with a radius (sigma) uniform in ``sigma``."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """PIL's solarize at a threshold uniform in ``threshold`` (on [0, 1] values)."""

    def __init__(self, threshold: tuple[float, float]):
        self.threshold = threshold

    def __call__(self, img):
        return ImageOps.solarize(img, round(255 * random.uniform(*self.threshold)))


def solo_learn_transform(recipe: SimCLRRecipe) -> T.Compose:
    """One view of ``recipe`` as solo-learn builds it (bilinear crops): PIL image -> normalised float32 [3, r, r]."""
    r = recipe
    ops = [
        T.RandomResizedCrop(r.resolution, scale=r.crop_scale, ratio=r.crop_ratio),  # bilinear (see above)
        T.RandomApply([T.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue)], p=r.jitter_prob),
        T.RandomGrayscale(r.grayscale_prob),
        T.RandomApply([PILGaussianBlur(r.blur_sigma)], p=r.blur_prob),
    ]
    if r.solarize_prob > 0:
        ops.append(T.RandomApply([PILSolarize(r.solarize_threshold)], p=r.solarize_prob))
    return T.Compose(ops + [T.RandomHorizontalFlip(r.flip_prob), T.ToTensor(), T.Normalize(r.mean, r.std)])


class GroupViews(Dataset):
    """key (index, seed; the seed unused) -> (one float32 [count, 3, r, r] tensor per group, label)."""

    def __init__(self, index: ImageFolderIndex, groups: tuple[ViewGroup, ...]):
        self.paths = [str(index.root / p) for p in index.paths]
        self.labels = index.labels
        self.groups = [(g.count, solo_learn_transform(g.recipe)) for g in groups]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        i, _ = key
        img = open_rgb(self.paths[i])
        return [torch.stack([transform(img) for _ in range(count)]) for count, transform in self.groups], \
            int(self.labels[i]), i


def _collate(items):
    groups, labels, ids = zip(*items)
    views = [torch.stack(g, dim=1).flatten(0, 1) for g in zip(*groups)]  # [count * B, ...], view-major
    return views, torch.tensor(labels, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64)


class PILReferenceLoader:
    """``PretrainBatch``es of the plan's images (see the module docstring)."""

    def __init__(self, spec: LoaderSpec, index: ImageFolderIndex, plan: SamplePlan):
        self.spec, self.plan = spec, plan
        workers = dict(num_workers=spec.host_workers, persistent_workers=spec.host_workers > 0,
                       pin_memory=spec.device.type == "cuda", collate_fn=_collate)
        if spec.host_workers > 0:
            workers["prefetch_factor"] = spec.prefetch
        self.unlabeled_batches = UnlabeledBatches(plan.unlabeled)
        self.unlabeled = DataLoader(GroupViews(index, spec.views), batch_sampler=self.unlabeled_batches, **workers)
        self.support_batches = self.support = None
        if plan.support is not None:
            self.support_batches = SupportBatches(plan.support)
            support = GroupViews(index, (ViewGroup(spec.support.views, spec.support_recipe),))
            self.support = DataLoader(support, batch_sampler=self.support_batches, **workers)
        self.position: Position = self.unlabeled_batches.position

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.position.set(epoch, start_step)
        if self.support_batches is not None:
            self.support_batches.set_range(self.plan.global_step(epoch, start_step), len(self) - start_step)

    def _device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.spec.device, dtype=self.spec.dtype, non_blocking=True, memory_format=torch.channels_last)

    def __iter__(self) -> Iterator[PretrainBatch]:
        epoch, first = self.position.epoch, self.position.start_step
        support = iter(self.support) if self.support is not None else None
        for step, (views, _, ids) in zip(range(first, len(self)), self.unlabeled):
            if support is not None:
                (s_img,), s_lab, _ = next(support)
                v = self.spec.support.views
                s_img = s_img.view(v, -1, *s_img.shape[1:]).transpose(0, 1).flatten(0, 1)  # image-major, as the backends
                s_lab = s_lab.repeat_interleave(v)
            else:
                r = self.spec.support_recipe.resolution
                s_img, s_lab = torch.zeros((0, 3, r, r)), torch.zeros(0, dtype=torch.int64)
            yield PretrainBatch(views=tuple(self._device(x) for x in views), support_images=self._device(s_img),
                                support_labels=s_lab.to(self.spec.device), sample_ids=ids, epoch=epoch, step=step)
        self.position.start_step = 0

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_train_data(spec: LoaderSpec) -> TrainData:
    """The baseline's stream for ``spec`` (an ImageFolder tree, as solo-learn reads it)."""
    split = open_train_split(spec)
    plan = build_plan(len(split.index), split.index.labels, split.labeled, spec.batch_size, spec.support,
                      spec.rank, spec.world_size, spec.seed)
    return TrainData(PILReferenceLoader(spec, split.index, plan), split.index, split.labeled,
                     f"ImageFolder tree {split.index.root} (PIL baseline)")
