"""Sample orders of the FFCV backend: pure functions of (epoch, start step).

FFCV's ``Loader`` asks its ``TraversalOrder`` for one flat array of dataset
indices per pass and cuts it into batches. Its own epoch counter only moves
forward, so it cannot resume mid-epoch, and its distributed orders pad the
ranks with repeated samples. Here the loader's order is a *schedule*
owned by the backend instead:

- ``UnlabeledSchedule``: the plan's unlabeled order (``pipelines.plan``) of
  one epoch, from ``start_step`` on;
- ``SupportSchedule``: the plan's support batches for a range of global steps;
- ``ScheduledOrder`` is the one ``TraversalOrder`` handed to FFCV: it returns
  the schedule's current order and ignores FFCV's epoch counter.
  ``ScheduledLoader`` is an FFCV ``Loader`` built around a schedule; it is
  the only place that registers ``ScheduledOrder`` in FFCV's ``ORDER_MAP``
  (FFCV 1.0.2 builds no order class that is not listed there);
- ``FailFastEpochIterator``: FFCV runs each pass in a thread, and an exception
  there ends the thread while the consumer waits on its queue forever; this
  iterator hands the exception to the consumer instead, and its thread can be
  joined after the consumer stops early. Before each batch it seeds numba's
  random state in that thread with the schedule's key seed of that batch
  (``pipelines.plan.step_key_seed``): the decoder
  (``pipelines.backends.ffcv.decode``) reads the step's key from it, and with
  it draws every view from the plan. The augmentations, like the order, are
  then a function of the step, and a resumed run repeats them.

The schedules hold the only mutable state, their position in the stream
(``set_epoch`` / ``set_range``); set it before calling ``iter()`` on the
loader, which reads the order at that moment.
"""
from __future__ import annotations

from queue import Full, Queue
from threading import Event
from typing import Protocol

import numpy as np
from numba import njit

from pipelines.errors import LoaderFailure
from pipelines.plan import SUPPORT_STREAM, UNLABELED_STREAM, Position, SupportPlan, UnlabeledPlan, step_key_seed
from pipelines.torch_threads import keep_torch_threads


with keep_torch_threads():  # importing FFCV sets torch's thread count to 1
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
    from ffcv.loader.loader import ORDER_MAP
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder

    from pipelines.backends.ffcv.fixes import ffcv_fixes

INDEX_DTYPE = np.uint64  # what FFCV's own orders yield; numba specialises the compiled pipeline on it


@njit
def seed_numba_random(seed: np.uint32) -> None:
    """Seed numba's random state of the calling thread (numba keeps one per thread, apart from NumPy's)."""
    np.random.seed(seed)


class Schedule(Protocol):
    batch_size: int

    @property
    def num_batches(self) -> int:
        """Batches in ``order()``."""
        ...

    def order(self) -> np.ndarray:
        """Flat dataset indices of ``num_batches`` batches."""
        ...

    def key_seed(self, batch: int) -> int:
        """The 32-bit key seed of the ``batch``-th batch of ``order()`` (``pipelines.plan``)."""
        ...


class UnlabeledSchedule:
    """This rank's unlabeled images of one epoch from ``start_step`` on, ``B`` per step."""

    def __init__(self, plan: UnlabeledPlan):
        self.plan = plan
        self.batch_size = plan.batch_size
        self.position = Position(plan.steps_per_epoch)

    def __len__(self) -> int:
        """Steps per epoch; the same on every rank."""
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.position.set(epoch, start_step)

    @property
    def num_batches(self) -> int:
        return self.position.steps_left

    def order(self) -> np.ndarray:
        return self.plan.batches(self.position.epoch)[self.position.start_step :].reshape(-1)

    def key_seed(self, batch: int) -> int:
        return step_key_seed(self.plan.seed, UNLABELED_STREAM, self.position.epoch)


class SupportSchedule:
    """This rank's support images for a range of global steps, ``C * K`` per step, class-major."""

    def __init__(self, plan: SupportPlan):
        self.plan = plan
        self.batch_size = plan.batch_size
        self.first_step, self.num_steps = 0, 0

    def set_range(self, first_global_step: int, num_steps: int) -> None:
        self.first_step, self.num_steps = first_global_step, num_steps

    @property
    def num_batches(self) -> int:
        return self.num_steps

    def order(self) -> np.ndarray:
        return self.plan.batches(self.first_step, self.num_steps).reshape(-1)

    def key_seed(self, batch: int) -> int:
        return step_key_seed(self.plan.seed, SUPPORT_STREAM, self.first_step + batch)


# --------------------------------------------------------------------------- FFCV adapter


class ScheduledOrder(TraversalOrder):
    """The order of ``loader.schedule`` at the time FFCV asks; FFCV's epoch is ignored."""

    def __init__(self, loader: "ScheduledLoader"):
        super().__init__(loader)
        self.schedule = loader.schedule

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.schedule.order().astype(INDEX_DTYPE)


class PipelineFailure(LoaderFailure):
    """An exception raised in FFCV's pipeline thread, re-raised in the consumer."""


class _StoppableQueue(Queue):
    """The pass's output queue: a blocking ``put`` gives up once ``stop`` is set.

    FFCV's thread puts its end-of-pass ``None`` with an unbounded blocking
    ``put``; when the consumer stops early with the queue full, that put would
    never return and joining the thread would hang."""

    def __init__(self, maxsize: int, stop: Event):
        super().__init__(maxsize)
        self.stop = stop

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if not (block and timeout is None):
            return super().put(item, block, timeout)
        while not self.stop.is_set():
            try:
                return super().put(item, True, 0.5)
            except Full:
                pass


class FailFastEpochIterator(EpochIterator):
    """FFCV 1.0.2's ``EpochIterator`` that neither hangs its consumer nor its joiner.

    FFCV's ``run`` lets any exception but StopIteration end its thread, after
    which ``__next__`` blocks on the output queue forever (a hung training
    run). Here the exception is queued like a batch and raised by ``__next__``
    as ``PipelineFailure`` naming the file, with the original as its cause.
    The queue is a ``_StoppableQueue``, so that ``close()`` also releases a
    thread blocked on handing over its last item.
    """

    _FAILED = object()

    def __init__(self, loader: "ScheduledLoader", order: np.ndarray, key_seeds: list[int]):
        self.key_seeds = key_seeds  # before FFCV's __init__ starts the thread
        super().__init__(loader, order)

    def start(self) -> None:  # FFCV's __init__ calls this last, after making its queue
        self.output_queue = _StoppableQueue(self.loader.batches_ahead, self.terminate_event)
        super().start()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # noqa: BLE001 - everything must reach the consumer
            self.failure = exc
            self.output_queue.put(self._FAILED)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        seed_numba_random(np.uint32(self.key_seeds[b_ix]))
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def __next__(self):
        item = self.output_queue.get()
        if item is self._FAILED:
            self.close()
            exc = self.failure
            raise PipelineFailure(f"FFCV pipeline failed reading {self.loader.reader.file_name}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if item is None:
            self.close()
            raise StopIteration()
        slot, result = item
        if IS_CUDA:  # as FFCV: the consumer's stream waits for the batch's copy
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result


class ScheduledLoader(Loader):
    """An FFCV ``Loader`` whose batches follow ``schedule`` (see the module docstring).

    Other keyword arguments go to ``Loader`` (pipelines, num_workers,
    batches_ahead, distributed, ...); ``order`` and ``batch_size`` come from
    the schedule, and ``drop_last`` is moot (orders hold whole batches). Both
    construction and ``iter()`` leave torch's thread count as they found it.
    The schedule's key seeds seed the augmentation draws of every batch (see
    ``FailFastEpochIterator``).
    """

    def __init__(self, fname: str, schedule: Schedule, **kwargs):
        self.schedule = schedule
        ORDER_MAP.setdefault(ScheduledOrder, ScheduledOrder)  # FFCV builds only the orders listed there
        with keep_torch_threads(), ffcv_fixes():
            super().__init__(fname, batch_size=schedule.batch_size, order=ScheduledOrder, drop_last=True, **kwargs)

    def __len__(self) -> int:
        """Batches in the next pass (FFCV's own ``__len__`` is frozen at construction
        and would truncate longer passes)."""
        return self.schedule.num_batches

    def __iter__(self) -> FailFastEpochIterator:
        """FFCV's ``Loader.__iter__`` with ``FailFastEpochIterator``; the order is the
        schedule's (whole batches), compiled on the first pass."""
        with keep_torch_threads():
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            keys = [self.schedule.key_seed(b) for b in range(len(self))]
            return FailFastEpochIterator(self, order[: len(self) * self.batch_size], keys)
