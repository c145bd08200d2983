"""The sample plan written the old, direct way, as an independent reference for ``pipelines.plan``:
the unlabeled order straight from ``torch.utils.data.DistributedSampler``, the support
batches by iterating a ``ClassBalancedSampler`` epoch by epoch."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.sampler import ClassBalancedSampler


def reference_unlabeled(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                        epoch: int) -> list[list[int]]:
    """Rank ``rank``'s batches of ``epoch``: DistributedSampler (shuffle, seed, drop_last), cut into
    batches, the last partial batch dropped."""
    sampler = torch.utils.data.DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    steps = len(order) // batch_size
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def reference_support(sampler: ClassBalancedSampler, labeled: np.ndarray, first_global_step: int,
                      num_steps: int) -> list[list[int]]:
    """Dataset indices of global steps ``first .. first + num_steps - 1``: batch ``g mod L`` of the
    sampler's epoch ``g div L``."""
    out = []
    for g in range(first_global_step, first_global_step + num_steps):
        epoch, step = divmod(g, len(sampler))
        sampler.set_epoch(epoch, start_step=step)
        out.append([int(labeled[p]) for p in next(iter(sampler))])
    return out
