"""Class-balanced sampling of the labeled support set (C classes x K images per step).

``ClassBalancedSampler`` yields, at each step, a list of ``C * K`` dataset
indices for one rank, laid out class-major::

    [class a img 1..K, class b img 1..K, ...]   (C class blocks)

It is a plain Python iterable of ``list[int]``, so it serves both as a torch
``DataLoader(batch_sampler=...)`` and as the index source of non-torch
backends. Everything it yields is a pure function of
``(labels, C, K, rank, world_size, unique_classes, seed, epoch, step)``; the
only mutable state is ``(epoch, start_step)`` set through ``set_epoch``.

Schedule (identical on every rank; each rank keeps only its own share)
----------------------------------------------------------------------
*Slots.* A step fills ``P`` class slots: ``P = W * C`` with ``unique_classes``
(rank ``r`` gets slots ``r*C .. r*C + C - 1``, so ranks see disjoint classes),
otherwise ``P = C`` and every rank sees the same C classes.

*Classes.* Slots are filled from a class stream: the concatenation of shuffled
passes ("rounds") over all M classes, read P at a time. Every class therefore
appears exactly once per round, whatever its size: class frequency is
balanced, and small classes are revisited (reshuffled) more often than large
ones. When a step straddles two rounds, the head of the new round is
reordered so that the step's classes stay distinct (the round still holds
every class once).

*Images.* Each class has its own image stream of shuffled permutations of its
images, drawn without replacement; when a class runs out of unseen images it
is reshuffled and continues. One occurrence of a class draws ``D`` images from
its stream: ``D = K`` with ``unique_classes``, ``D = W * K`` otherwise, rank
``r`` taking the r-th block of K. Ranks draw different images of a shared
class when it has at least ``W * K`` images; otherwise ranks are packed in
groups of ``floor(N_c / K)`` that see distinct images, and groups may
overlap. As for classes, a draw straddling two permutations reorders the head
of the new one so that the images of a group stay distinct.

*Epoch length.* Class ``c`` with ``N_c`` images is fully covered once it has
occurred ``ceil(N_c / D)`` times, i.e. after ``R = max_c ceil(N_c / D)``
rounds; the epoch is the number of steps that completes R rounds::

    len = ceil(M * R / P)

so every labeled image is drawn at least once per epoch, on some rank. The
length does not depend on the epoch or the rank.

Randomness comes from numpy Generators seeded with ``(seed, epoch, stream)``
(stream 0: classes, stream 1 + j: the j-th class in sorted label order);
global RNG state is never touched.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

__all__ = ["ClassBalancedSampler"]


class _CyclicStream:
    """Endless concatenation of shuffled permutations of ``items``.

    ``take(n)`` returns the next ``n`` items, all distinct (needs
    ``n <= len(items)``): when it crosses into a fresh permutation, the items
    already taken in this call are moved out of that permutation's head.
    """

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self._items = items
        self._rng = rng
        self._perm = rng.permutation(items)
        self._pos = 0

    def take(self, n: int) -> np.ndarray:
        left = len(self._perm) - self._pos
        if n <= left:
            out = self._perm[self._pos : self._pos + n]
            self._pos += n
            return out
        tail = self._perm[self._pos :]
        fresh = self._rng.permutation(self._items)
        head = fresh[~np.isin(fresh, tail)][: n - left]
        self._perm = np.concatenate([head, fresh[~np.isin(fresh, head)]])
        self._pos = n - left
        return np.concatenate([tail, head])


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class ClassBalancedSampler:
    """Yield C classes x K images per step for one rank (see module docstring).

    Args:
        labels: class of each dataset index (list, numpy array, 1-D tensor,
            e.g. ``ImageFolder.targets``); non-negative integers.
        classes_per_batch: C, classes per step on this rank.
        images_per_class: K, images of each class per step.
        rank, world_size: this rank's global rank and the number of ranks.
        unique_classes: give the ranks disjoint classes at each step
            (needs ``world_size * C`` classes).
        seed: non-negative base seed; combined with the epoch.

    Iteration yields ``len(self) - start_step`` lists of ``C * K`` ints for
    the epoch chosen by ``set_epoch`` (like ``DistributedSampler``, call it
    every epoch; iterating twice without it repeats the same batches).
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        images_per_class: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        unique_classes: bool = False,
        seed: int = 0,
    ) -> None:
        self.classes_per_batch = C = _check_int("classes_per_batch (data.support_classes)", classes_per_batch, 1)
        self.images_per_class = K = _check_int(
            "images_per_class (data.support_images_per_class)", images_per_class, 1
        )
        self.world_size = W = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= W:
            raise ValueError(f"rank must be in [0, {W}) for world_size={W}, got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.unique_classes = bool(unique_classes)

        labels_np = np.asarray(labels)
        if labels_np.ndim != 1:
            raise ValueError(f"labels must be one-dimensional (one class per dataset index), got shape {labels_np.shape}")
        if labels_np.size == 0:
            raise ValueError("labels is empty: the labeled set has no images (check data.labeled_list / labeled_fraction)")
        if not np.issubdtype(labels_np.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels_np.dtype}")
        if labels_np.min() < 0:
            bad = int(np.flatnonzero(labels_np < 0)[0])
            raise ValueError(f"labels must be >= 0, got {int(labels_np[bad])} at index {bad}")

        self.classes = np.unique(labels_np)  # sorted class ids present in labels
        order = np.argsort(labels_np, kind="stable")
        bounds = np.searchsorted(labels_np[order], self.classes, side="left")
        self._class_images = [a.astype(np.int64) for a in np.split(order, bounds[1:])]
        M = len(self.classes)

        self._slots = W * C if self.unique_classes else C
        # Suggested remedies name only values that config validation accepts: SuNCEt needs at
        # least 2 classes per step, and at least 2 images per class unless ranks share classes.
        if self._slots > M:
            if self.unique_classes:
                options = ([f"lower data.support_classes to <= {M // W}"] if M // W >= 2 else []) + [
                    "set data.unique_classes=false", "use fewer ranks", "label more classes"]
                raise ValueError(
                    f"unique_classes needs world_size * classes_per_batch = {W} * {C} = {W * C} distinct classes "
                    f"per step, but the labels hold only {M} classes. Options: {', '.join(options)}."
                )
            options = ([f"lower data.support_classes to <= {M}"] if M >= 2 else []) + [
                "label more classes", "or set loss.suncet_weight=0 (SimCLR alone)"]
            raise ValueError(
                f"classes_per_batch (data.support_classes) = {C} but the labels hold only {M} classes. "
                f"Options: {', '.join(options)}."
            )
        min_images = 1 if (W > 1 and not self.unique_classes) else 2
        for cls, images in zip(self.classes, self._class_images):
            if len(images) < K:
                options = ([f"lower data.support_images_per_class to <= {len(images)}"]
                           if len(images) >= min_images else []) + [
                    f"drop class {int(cls)} from the labeled list", f"add labeled images of class {int(cls)}"]
                raise ValueError(
                    f"class {int(cls)} has {len(images)} labeled image(s), fewer than "
                    f"images_per_class (data.support_images_per_class) = {K}. Options: {', '.join(options)}."
                )

        # Images drawn per class occurrence (all ranks together), and epoch length.
        self._draw = K if self.unique_classes else W * K
        rounds = max(math.ceil(len(images) / self._draw) for images in self._class_images)
        self._len = math.ceil(M * rounds / self._slots)

        self._epoch = 0
        self._start_step = 0
        self._plan_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start_step(self) -> int:
        return self._start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate ``epoch`` next, starting at ``start_step`` (in ``[0, len]``)."""
        epoch = _check_int("epoch", epoch, 0)
        start_step = _check_int("start_step", start_step, 0)
        if start_step > self._len:
            raise ValueError(f"start_step must be in [0, {self._len}] (steps per epoch), got {start_step}")
        self._epoch, self._start_step = epoch, start_step

    def __len__(self) -> int:
        """Steps per epoch; identical on every rank and for every epoch."""
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.epoch_plan(self._epoch)
        for step in range(self._start_step, self._len):
            yield plan[step].tolist()

    def batch(self, epoch: int, step: int) -> list[int]:
        """This rank's indices at ``(epoch, step)``, class-major."""
        step = _check_int("step", step, 0)
        if step >= self._len:
            raise ValueError(f"step must be in [0, {self._len}), got {step}")
        return self.epoch_plan(epoch)[step].tolist()

    # ------------------------------------------------------------------ planning

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream])

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """All of this rank's batches of ``epoch``: int64 array ``[len, C*K]``.

        Computed once per epoch (cost linear in the labeled set size) and cached.
        """
        epoch = _check_int("epoch", epoch, 0)
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        C, K, W, r = self.classes_per_batch, self.images_per_class, self.world_size, self.rank
        class_stream = _CyclicStream(np.arange(len(self.classes)), self._rng(epoch, 0))
        image_streams: dict[int, _CyclicStream] = {}
        plan = np.empty((self._len, C * K), dtype=np.int64)
        for step in range(self._len):
            slots = class_stream.take(self._slots)
            for j, c in enumerate(slots.tolist()):
                stream = image_streams.get(c)
                if stream is None:
                    stream = image_streams[c] = _CyclicStream(self._class_images[c], self._rng(epoch, 1 + c))
                if self.unique_classes:
                    images = stream.take(K)  # advance the stream whichever rank owns the slot
                    if j // C == r:
                        plan[step, (j % C) * K : (j % C + 1) * K] = images
                    continue
                group = min(W, len(self._class_images[c]) // K)  # ranks that can see distinct images
                for first in range(0, W, group):
                    ranks = min(group, W - first)
                    images = stream.take(ranks * K)
                    if first <= r < first + ranks:
                        plan[step, j * K : (j + 1) * K] = images[(r - first) * K : (r - first + 1) * K]
        self._plan_cache = (epoch, plan)
        return plan
