"""The batch contract every loader backend yields, one per training step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass
class PretrainBatch:
    """One training step's inputs, already on the training device.

    ``view1[i]`` and ``view2[i]`` are two augmentations of unlabeled image
    ``sample_ids[i]``; images are normalised, NCHW shaped and channels-last in
    memory. ``support_images`` holds C classes x K images x V views laid out
    class-major (all images of one class are contiguous), with
    ``support_labels`` the matching class indices.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    support_images: torch.Tensor
    support_labels: torch.Tensor
    sample_ids: torch.Tensor
    epoch: int
    step: int
    bad_images: tuple[str, ...] = ()

    @property
    def unlabeled_batch_size(self) -> int:
        return self.view1.shape[0]

    def validate(self) -> None:
        """Raise if the batch breaks the contract (used by tests and debug runs)."""
        if self.view1.shape != self.view2.shape or self.view1.ndim != 4 or self.view1.shape[1] != 3:
            raise ValueError(f"views must both be [B,3,H,W], got {tuple(self.view1.shape)} and {tuple(self.view2.shape)}")
        if self.support_images.ndim != 4 or self.support_images.shape[1:] != self.view1.shape[1:]:
            raise ValueError(f"support images must be [M,3,H,W] like the views, got {tuple(self.support_images.shape)}")
        if self.support_labels.shape != (self.support_images.shape[0],):
            raise ValueError("support_labels must have one label per support image")
        if self.sample_ids.shape != (self.view1.shape[0],):
            raise ValueError("sample_ids must have one id per unlabeled image")


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
