"""The batch contract every loader backend yields, one per training step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch


@dataclass
class PretrainBatch:
    """One training step's inputs, already on the training device.

    View order (the one place it is defined). ``views`` holds one tensor per
    view group of the recipe (``pipelines.augment.recipe.ViewGroup``), in the
    groups' order; group ``g`` with ``count`` views at ``H x W`` pixels is
    ``[count * B, 3, H, W]``, *view-major*: row ``v * B + i`` is view ``v`` of
    unlabeled image ``sample_ids[i]`` (so ``views[g].chunk(count)`` gives one
    ``[B, 3, H, W]`` batch per view, SwAV's list of crops). SimCLR's two views
    are ``views[0]``'s two chunks (``view1``, ``view2``). ``support_images``
    holds C classes x K images x V views at its group's resolution, laid out
    class-major (all images of one class are contiguous) and image-major within
    (an image's V views adjacent), with ``support_labels`` the matching class
    indices. Images are normalised, NCHW shaped and channels-last in memory.
    """

    views: tuple[torch.Tensor, ...]
    support_images: torch.Tensor
    support_labels: torch.Tensor
    sample_ids: torch.Tensor
    epoch: int
    step: int
    bad_images: tuple[str, ...] = ()

    @property
    def unlabeled_batch_size(self) -> int:
        return self.sample_ids.shape[0]

    @property
    def view1(self) -> torch.Tensor:
        return self.views[0][: self.unlabeled_batch_size]

    @property
    def view2(self) -> torch.Tensor:
        b = self.unlabeled_batch_size
        return self.views[0][b : 2 * b]

    def validate(self, groups: Sequence[tuple[int, int]] | None = None,
                 support_resolution: int | None = None) -> None:
        """Raise if the batch breaks the contract (used by tests and debug runs). ``groups``:
        the expected (count, resolution) of each view group; ``support_resolution``: the support
        images' side (default: the first group's)."""
        b = self.unlabeled_batch_size
        if self.sample_ids.ndim != 1 or b == 0:
            raise ValueError(f"sample_ids must be one id per unlabeled image, got shape {tuple(self.sample_ids.shape)}")
        if not self.views:
            raise ValueError("a batch needs at least one view group")
        if groups is not None and len(groups) != len(self.views):
            raise ValueError(f"expected {len(groups)} view group(s), got {len(self.views)}")
        for g, x in enumerate(self.views):
            if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] % b:
                raise ValueError(f"view group {g} must be [count * {b}, 3, H, W], got {tuple(x.shape)}")
            if groups is not None and (x.shape[0] // b, x.shape[2], x.shape[3]) != (groups[g][0], groups[g][1],
                                                                                    groups[g][1]):
                raise ValueError(f"view group {g} must be [{groups[g][0]} x {b}, 3, {groups[g][1]}, {groups[g][1]}], "
                                 f"got {tuple(x.shape)}")
        if self.views[0].shape[0] < 2 * b:
            raise ValueError(f"the first view group needs at least 2 views of each image, got {tuple(self.views[0].shape)}")
        side = support_resolution or self.views[0].shape[2]
        if self.support_images.ndim != 4 or tuple(self.support_images.shape[1:]) != (3, side, side) and \
                self.support_images.shape[0] > 0:
            raise ValueError(f"support images must be [M, 3, {side}, {side}], got {tuple(self.support_images.shape)}")
        if self.support_labels.shape != (self.support_images.shape[0],):
            raise ValueError("support_labels must have one label per support image")


class PretrainLoader(Protocol):
    """What ``pipelines.build.build_train_loader`` returns: an epoch-aware iterable of batches.

    Every backend's position in its stream is (epoch, start step): the plan
    (``pipelines.plan``) makes the stream a function of it, so ``state_dict``
    holds no more than what a backend needs beyond that (all of ours: nothing).
    """

    def __len__(self) -> int:
        """Steps per epoch, equal on every rank."""
        ...

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to iterate next, optionally resuming mid-epoch."""
        ...

    def __iter__(self) -> Iterator[PretrainBatch]:
        ...

    def close(self) -> None:
        """End the current pass (a pass cut short stops its workers or threads); ``set_epoch``
        and ``iter`` start another one afterwards."""
        ...

    def state_dict(self) -> dict:
        """What resuming needs beyond (epoch, step); saved in checkpoints."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...
