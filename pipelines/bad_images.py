"""What a loader does with an image it cannot read at training time (``data.on_bad_image``).

Conversion checks every image once; this is for what goes wrong afterwards (a
file truncated or replaced on a shared file system, a damaged disk block).

- ``error`` (default): stop with ``BadImageError``, which names the file.
- ``skip``: use a replacement and count the bad file. The replacement is the
  next readable image of the bad one's *pool*, in dataset order and cyclically:
  for the unlabeled stream every image, for the support stream the labeled
  images of the same class, so a support batch stays C x K and never borrows
  the label of an image outside the labeled subset. Every skipped file is
  named in the step's ``PretrainBatch.bad_images``; the training loop prints it
  and counts it in ``metrics.csv`` and in the checkpoint.

A replacement chain gives up after ``MAX_CONSECUTIVE_FAILURES`` unreadable
images (the bad one and its next 7 pool members, or the whole pool when it is
smaller) and stops the run even with ``skip``: that is a missing mount or a
damaged dataset, not a few bad files. A replacement may repeat an image that
is already in the batch (with a support pool of exactly K images it does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from pipelines.errors import BadImageError

POLICIES = ("error", "skip")
MAX_CONSECUTIVE_FAILURES = 8

T = TypeVar("T")


@dataclass(frozen=True)
class ReplacementPools:
    """``pool[i]``: the pool of sample ``i`` (-1: never a replacement, never replaced)."""

    pool: np.ndarray

    @classmethod
    def single(cls, num_samples: int) -> "ReplacementPools":
        """Every sample in one pool (the unlabeled stream)."""
        return cls(np.zeros(num_samples, dtype=np.int64))

    @classmethod
    def by_class(cls, labels: np.ndarray, members: np.ndarray) -> "ReplacementPools":
        """Only ``members`` (dataset indices), pooled by their class (the support stream)."""
        pool = np.full(len(labels), -1, dtype=np.int64)
        pool[members] = labels[members]
        return cls(pool)

    def after(self, i: int) -> np.ndarray:
        """The other members of ``i``'s pool, starting after ``i``, cyclically."""
        if self.pool[i] < 0:
            raise ValueError(f"sample {i} belongs to no replacement pool")
        members = np.flatnonzero(self.pool == self.pool[i])
        start = int(np.searchsorted(members, i, side="right"))
        return np.concatenate([members[start:], members[:start]])[: len(members) - 1]


def read_or_replace(i: int, read: Callable[[int], T], policy: str,
                    pools: ReplacementPools) -> tuple[T, int, tuple[str, ...]]:
    """``(read(j), j, names of the bad files skipped)``: ``j == i`` when image ``i`` reads.

    ``read`` raises ``BadImageError`` for an unreadable image. With ``policy``
    'error' that error propagates; with 'skip' the pool's next images are tried.
    """
    try:
        return read(i), i, ()
    except BadImageError as exc:
        if policy != "skip":
            raise
        bad = [str(exc)]
    for j in pools.after(i)[: MAX_CONSECUTIVE_FAILURES - 1]:
        try:
            return read(int(j)), int(j), tuple(bad)
        except BadImageError as exc:
            bad.append(str(exc))
    raise BadImageError(f"{len(bad)} images in a row could not be read (data.on_bad_image=skip gives up): "
                        + "; ".join(bad))
