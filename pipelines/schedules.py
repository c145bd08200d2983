"""The unlabeled stream's order, shared by every backend: a pure function of
(epoch, start step), so that backends agree sample for sample and resume exactly.

``DistributedSampler`` shuffled with ``seed + epoch`` and ``drop_last=True``:
ranks are disjoint and all have ``(N // W) // B`` steps.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.datasets import DataError


class UnlabeledSchedule:
    """This rank's unlabeled samples for one epoch, in the reference backend's order."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_step = 0, 0
        if len(self) == 0:
            raise DataError(
                f"{num_samples} unlabeled images cannot fill one batch of {batch_size} per rank on {world_size} rank(s)"
            )

    def __len__(self) -> int:
        """Steps per epoch; the same on every rank."""
        return (self.num_samples // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    @property
    def num_batches(self) -> int:
        return len(self) - self.start_step

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All of this rank's samples of ``epoch`` that fill whole batches."""
        sampler = torch.utils.data.DistributedSampler(
            range(self.num_samples), num_replicas=self.world_size, rank=self.rank,
            shuffle=True, seed=self.seed, drop_last=True,
        )
        sampler.set_epoch(epoch)
        return np.fromiter(sampler, dtype=np.int64)[: len(self) * self.batch_size]

    def order(self) -> np.ndarray:
        """This epoch's samples from ``start_step`` on, flat (``num_batches * batch_size``)."""
        return self.epoch_order(self.epoch)[self.start_step * self.batch_size :]
