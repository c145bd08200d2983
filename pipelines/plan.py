"""The sample plan every backend follows: which images each rank gets at each step, and their seeds.

A backend turns this plan into tensors; it decides nothing about *which*
images. Everything here is a pure function of (seed, epoch or global step,
rank, world size), so backends agree image for image, a resumed run continues
exactly, and no loader state needs checkpointing.

Unlabeled stream
    Epoch ``e`` is one permutation ``P_e`` of the ``N`` unlabeled images,
    ``torch.randperm(N)`` seeded with ``seed + e`` (``DistributedSampler``'s,
    so the order is the one torchvision users know). With ``W`` ranks of ``B``
    images each (global batch ``G = W * B``) an epoch has ``N // G`` steps
    (the last partial global batch is dropped), and rank ``r`` takes
    ``P_e[(s * B + i) * W + r]`` for ``i < B`` at step ``s``. The ranks are
    disjoint, and global step ``s`` holds exactly ``P_e[s * G : (s + 1) * G]``
    whatever ``W`` is: a run resumed on another number of ranks with the same
    global batch continues the same stream, no image repeated or skipped.

Support stream
    Global step ``g = epoch * steps_per_epoch + step`` takes batch ``g mod L``
    of epoch ``g div L`` of a ``ClassBalancedSampler`` (``L`` its length;
    ``pipelines.sampler`` documents the class-balanced schedule and how ranks
    share it), so the support stream, too, is a function of the global step.

Augmentation seeds
    Each image of a step has a 64-bit *image seed* from which every backend
    draws all its views (``pipelines.augment.draws``): ``image_seed(key,
    sample index, position)``. The *key* is the step's: ``step_key(seed,
    UNLABELED_STREAM, epoch)`` for the unlabeled images (each appears once
    per epoch, at position 0), ``step_key(seed, SUPPORT_STREAM, global
    step)`` for the support images, whose position is their place in their
    class's block of the step's *global* support set (``rank * K + k`` when
    the ranks share the step's classes, ``k`` with unique classes): two ranks
    that draw one image get different views, and a W-rank run sees the views
    of one process with the same global batch. No seed depends on the rank or
    the world size otherwise, so a run resumed on another number of ranks
    sees the same views.

    ``step_key`` is the first double of MT19937 seeded with a 32-bit hash
    of (seed, stream, step), as 53 bits: FFCV's compiled pipeline can take a
    per-batch value only through numba's per-thread random state, which
    ``pipelines.backends.ffcv.orders`` seeds with that hash and the decoder
    reads back with one ``np.random.random()`` (numba's generator is NumPy's
    legacy MT19937). ``sample_seed(seed, *keys)`` derives the other
    independent seeds; the ``*_STREAM`` ids keep the streams apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.augment.draws import image_seeds
from pipelines.errors import DataError
from pipelines.sampler import ClassBalancedSampler

UNLABELED_STREAM, SUPPORT_STREAM, COLOUR_STREAM = 0, 1, 2


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on its arguments."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def step_key_seed(seed: int, stream: int, step: int) -> int:
    """The 32-bit seed of a step's key (what FFCV's pipeline thread seeds numba with)."""
    return sample_seed(seed, stream, step) & 0xFFFFFFFF


def step_key(seed: int, stream: int, step: int) -> int:
    """The key of the images of ``step`` (an epoch for the unlabeled stream, a global step for
    the support stream) in ``stream``; see the module docstring."""
    return int(np.random.RandomState(step_key_seed(seed, stream, step)).random_sample() * 2.0 ** 53)


@dataclass
class Position:
    """Where a loader's next pass starts: ``start_step`` of ``epoch`` (a resumed run's place)."""

    steps_per_epoch: int
    epoch: int = 0
    start_step: int = 0

    def set(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_left(self) -> int:
        return self.steps_per_epoch - self.start_step


class UnlabeledPlan:
    """This rank's unlabeled images, ``[steps, batch_size]`` per epoch (see the module docstring)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = num_samples // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_samples} unlabeled images cannot fill one batch of {batch_size} per rank "
                            f"on {world_size} rank(s)")
        self._cache: tuple[int, np.ndarray] | None = None

    def batches(self, epoch: int) -> np.ndarray:
        """int64 ``[steps_per_epoch, batch_size]``: this rank's images of ``epoch``, step by step."""
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=g).numpy()
            used = self.steps_per_epoch * self.batch_size * self.world_size
            self._cache = (epoch, perm[self.rank : used : self.world_size].reshape(self.steps_per_epoch, -1))
        return self._cache[1]

    def image_seeds(self, epoch: int, samples: np.ndarray) -> np.ndarray:
        """uint64 image seeds of unlabeled ``samples`` in ``epoch`` (module docstring)."""
        samples = np.asarray(samples, dtype=np.int64)
        return image_seeds(np.uint64(step_key(self.seed, UNLABELED_STREAM, epoch)), samples,
                           np.zeros(len(samples), np.int64))


class SupportPlan:
    """This rank's support images per global step: ``C * K`` dataset indices, class-major."""

    def __init__(self, sampler: ClassBalancedSampler, labeled: np.ndarray, seed: int):
        self.sampler, self.seed = sampler, seed
        self.labeled = np.asarray(labeled, dtype=np.int64)  # sampler position p -> dataset index
        self.batch_size = sampler.classes_per_batch * sampler.images_per_class
        k = sampler.images_per_class
        offset = 0 if sampler.unique_classes else sampler.rank * k
        # each image's place in its class's block of the global support set (module docstring)
        self.positions = offset + np.arange(self.batch_size, dtype=np.int64) % k

    def image_seeds(self, global_step: int, samples: np.ndarray) -> np.ndarray:
        """uint64 image seeds of the support ``samples`` of ``global_step`` (one batch, in order)."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(samples) != self.batch_size:
            raise ValueError(f"a support batch holds {self.batch_size} images, got {len(samples)}")
        return image_seeds(np.uint64(step_key(self.seed, SUPPORT_STREAM, global_step)), samples, self.positions)

    def batches(self, first_global_step: int, num_steps: int) -> np.ndarray:
        """Dataset indices ``[num_steps, C*K]`` of global steps ``first .. first + num_steps - 1``."""
        per_epoch = len(self.sampler)
        rows = [np.empty((0, self.batch_size), dtype=np.int64)]
        g, end = first_global_step, first_global_step + num_steps
        while g < end:
            epoch, step = divmod(g, per_epoch)
            take = min(per_epoch - step, end - g)
            rows.append(self.sampler.epoch_plan(epoch)[step : step + take])
            g += take
        return self.labeled[np.concatenate(rows)]

    def batch(self, global_step: int) -> np.ndarray:
        return self.batches(global_step, 1)[0]


@dataclass
class SamplePlan:
    """One rank's plan: the unlabeled stream, and the support stream when SuNCEt is on."""

    unlabeled: UnlabeledPlan
    support: SupportPlan | None

    @property
    def steps_per_epoch(self) -> int:
        return self.unlabeled.steps_per_epoch

    def global_step(self, epoch: int, step: int) -> int:
        return epoch * self.steps_per_epoch + step


def build_plan(num_samples: int, labels: np.ndarray, labeled: np.ndarray, batch_size: int, support,
               rank: int, world_size: int, seed: int) -> SamplePlan:
    """The plan of one rank. ``support`` is a ``SupportSpec`` or None; an impossible
    support set for this labeled subset (too few classes or images) is a ``DataError``."""
    unlabeled = UnlabeledPlan(num_samples, batch_size, rank, world_size, seed)
    if support is None:
        return SamplePlan(unlabeled, None)
    try:
        sampler = ClassBalancedSampler(labels[labeled], support.classes, support.images_per_class, rank=rank,
                                       world_size=world_size, unique_classes=support.unique_classes, seed=seed)
    except ValueError as exc:  # a data/config problem, named by the sampler
        raise DataError(f"support set: {exc}") from exc
    return SamplePlan(unlabeled, SupportPlan(sampler, labeled, seed))
