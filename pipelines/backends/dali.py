"""DALI backend: decode once and cut every planned view in a DALI graph, on the GPU when there is one.

``pipelines.build`` hands ``build`` the split's encoded images (the
converter's webdataset shards, or the files of an ImageFolder tree: see
``pipelines.encoded_images``) and the rank's ``SamplePlan``; the returned
``DaliPretrainLoader`` yields the ``PretrainBatch`` contract.

Design
------
- One pipeline definition, ``simclr_pipeline``: ``fn.external_source`` ->
  ``fn.decoders.image`` (``mixed`` on CUDA, ``cpu`` otherwise), once per
  image -> per view ``pipelines.augment.dali.augment_view`` (runs where the
  decoded images are; each view group at its own resolution). It is
  instantiated twice: the unlabeled stream (every view of every group) and
  the support stream (``data.support_views`` views of the support group).
- Which images a step holds, and every view's crop, flip and colour, are the
  shared plan's (``pipelines.plan``, ``pipelines.augment.draws``), as for
  every backend. The encoded bytes are read on the host (shards or files)
  and fed with their per-view parameters, drawn from the images' seeds.
- Hence the whole stream is a pure function of (seed, rank, world size,
  epoch, step): ``set_epoch(epoch, start_step)`` resumes it exactly, and no
  DALI state needs checkpointing (the loader has no ``state_dict``).

Why not ``readers.webdataset`` / ``readers.file`` with ``shard_id``: their
``random_shuffle`` draws from a buffer of ``initial_fill`` consecutive
samples, and the converter stores samples in class order, so batches would
hold one or two classes (bad negatives for NT-Xent); shuffling the file list
ourselves gives a global permutation, the torch backend's exact sample order,
and resume without reader checkpoints. The price is that the host reads
samples in random order (cheap from page cache or local disk).
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipelines.augment.dali import group_view_params, simclr_pipeline, view_recipes
from pipelines.augment.recipe import ViewGroup
from pipelines.bad_images import ReplacementPools, read_or_replace
from pipelines.contract import PretrainBatch
from pipelines.encoded_images import EncodedImages
from pipelines.errors import BadImageError, DataError
from pipelines.plan import Position, SamplePlan
from pipelines.prefetch import Prefetcher
from pipelines.spec import LoaderSpec

# ---------------------------------------------------------------------------
# Host side: the plan's images of each step, and their seeds
# ---------------------------------------------------------------------------


class UnlabeledSteps:
    """Step -> (this rank's unlabeled images, their image seeds) for ``epoch``."""

    def __init__(self, plan: SamplePlan):
        self.plan = plan.unlabeled
        self.epoch = 0

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.plan.batches(self.epoch)[step]
        return ids, self.plan.image_seeds(self.epoch, ids)


class SupportSteps:
    """Step -> (this rank's support images, their image seeds) at global step ``epoch * steps + step``."""

    def __init__(self, plan: SamplePlan):
        self.plan = plan
        self.epoch = 0

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.plan.global_step(self.epoch, step)
        ids = self.plan.support.batch(g)
        return ids, self.plan.support.image_seeds(g, ids)


class StreamFeed:
    """``fn.external_source`` callback of one stream.

    ``start(steps)`` sets the steps of the coming pass; each call returns the
    next step's batch ``(encoded images, sample ids, *view parameters)`` and
    raises StopIteration after the last step, which ends DALI's epoch. The
    batches (reads, checks, draws: ``batch``) are made in a thread of their
    own, ``depth`` steps ahead (``pipelines.prefetch``), not in the training
    thread that DALI calls back from; they are the same batches in the same order.
    Images that fail the host-side checks (``EncodedImages.checked``) follow
    ``on_bad_image`` (``pipelines.bad_images``); the names of those replaced
    wait in ``bad_images[step]`` until the loader yields that step. A
    replacement keeps the planned image's seed (its views are drawn on its own size).
    """

    def __init__(self, images: EncodedImages, plan: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 groups: Sequence[ViewGroup], pools: ReplacementPools, on_bad_image: str = "error", depth: int = 2):
        self.images, self.plan, self.groups, self.depth = images, plan, tuple(groups), depth
        self.views = sum(g.count for g in self.groups)
        self.pools, self.on_bad_image = pools, on_bad_image
        self.bad_images: dict[int, tuple[str, ...]] = {}
        self.used_ids: dict[int, np.ndarray] = {}  # images fed per step, until the loader yields it
        self._batches = Prefetcher(self.batch, (), 1)

    def start(self, steps: Iterable[int]) -> None:
        self.stop()
        self.bad_images.clear()
        self.used_ids.clear()
        self._batches = Prefetcher(self.batch, steps, self.depth, name="dali-feed")

    def stop(self) -> None:
        """Abandon the pass's batches not yet made."""
        self._batches.stop()

    def __call__(self) -> tuple:
        return self._batches.next()  # StopIteration ends DALI's epoch

    def batch(self, step: int) -> tuple:
        """The external source's outputs for ``step``; records its bad and used images."""
        ids, seeds = self.plan(step)
        read = [read_or_replace(int(i), self.images.checked, self.on_bad_image, self.pools) for i in ids]
        data = [d for (d, _), _, _ in read]
        sizes = np.stack([size for (_, size), _, _ in read])
        used = np.array([j for _, j, _ in read], dtype=np.int64)
        bad = sum((names for _, _, names in read), ())
        if bad:
            self.bad_images[step] = bad
        self.used_ids[step] = used
        params = group_view_params(seeds, sizes, self.groups)
        return (data, used, *(a for p, recipe in zip(params, view_recipes(self.groups)) for a in p.as_tuple(recipe)))


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------


class DaliStream:
    """One pipeline behind the PyTorch plugin's iterator, restartable at any planned step."""

    def __init__(self, feed: StreamFeed, batch_size: int, spec: LoaderSpec, seed: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        device = spec.device
        cuda = device.type == "cuda"
        self.feed = feed
        self.output_map = [f"view{v}" for v in range(feed.views)] + ["ids"]
        pipe = simclr_pipeline(
            feed, view_recipes(feed.groups), decoder_device="mixed" if cuda else "cpu",
            float16=spec.dtype in (torch.float16, torch.bfloat16), channels_last=spec.channels_last,
            batch_size=batch_size, num_threads=max(1, spec.host_workers), prefetch_queue_depth=max(1, spec.prefetch),
            device_id=(device.index if device.index is not None else torch.cuda.current_device()) if cuda else None,
            seed=seed,
        )
        self.iterator = DALIGenericIterator(pipe, self.output_map, auto_reset=False, prepare_first_batch=False)
        self._started = False
        self._pending: Iterator[int] = iter(())

    def start(self, steps: range) -> None:
        """Plan ``steps`` as the next pass. Batches still in flight from an abandoned pass are
        run out and dropped (at most ``prefetch``), then the pipeline restarts on the new plan."""
        if self._started:
            self.feed.start(())
            while True:
                try:
                    next(self.iterator)
                except StopIteration:
                    break
            self.feed.start(steps)
            self.iterator.reset()  # schedules the new pass's first batches
        else:
            self.feed.start(steps)  # the first next() schedules them
            self._started = True
        self._pending = iter(steps)  # the step of each batch to come out, in order

    def next(self) -> dict[str, torch.Tensor]:
        step = next(self._pending)
        try:
            return next(self.iterator)[0]
        except RuntimeError as exc:  # a failed DALI operator (our feed's own errors keep their type)
            raise self._explain(step, exc) from exc

    def _explain(self, step: int, exc: Exception) -> Exception:
        """A failure in the graph (most often a decode error) as an error naming the step's
        images that PIL cannot decode either, or the step's images if it decodes them all."""
        ids = self.feed.used_ids.get(step)
        if ids is None:
            ids, _ = self.feed.plan(step)
        bad = []
        for i in ids:
            try:
                self.feed.images.decode(int(i))
            except BadImageError as decode_error:  # undecodable, or gone since it was fed
                bad.append(str(decode_error))
        cause = " / ".join(dict.fromkeys(line.strip() for line in str(exc).splitlines()
                                         if "Error in" in line or "failure" in line)) or str(exc)
        if bad:
            return BadImageError(f"DALI failed at step {step} on undecodable image(s): {', '.join(bad)} ({cause})")
        return DataError(f"DALI failed at step {step} (images {', '.join(map(str, ids.tolist()))}): {exc}")


class OutputsInUse:
    """The DALI outputs of the batches handed out that the device may still be reading.

    The PyTorch plugin hands out DALI's own buffers (zero-copy with DALI's dynamic executor);
    dropping the last reference gives a buffer back to DALI, which may fill it again while a step
    queued ahead of the device (``compute.host_sync: log``) still reads it. So each batch's
    outputs stay referenced here until a CUDA event, recorded when the consumer asks for the
    next batch (its work on this one is queued by then), has completed; ``drain`` waits for
    them at the end of a pass. Off CUDA the consumer's work is done when it asks again."""

    def __init__(self, device: torch.device):
        self.enabled = torch.device(device).type == "cuda"
        self._current = None  # the outputs of the batch out now
        self._queued: collections.deque = collections.deque()  # (event, outputs) of earlier batches

    def handed_out(self, outputs) -> None:
        """``outputs`` go out in the next batch: the previous batch's are queued behind an event."""
        self._queue_current()
        self._current = outputs
        while self._queued and self._queued[0][0].query():
            self._queued.popleft()

    def drain(self) -> None:
        """Wait until the device has finished with every batch handed out, then let DALI have them."""
        self._queue_current()
        while self._queued:
            self._queued.popleft()[0].synchronize()

    def _queue_current(self) -> None:
        if self._current is not None and self.enabled:
            event = torch.cuda.Event()
            event.record()
            self._queued.append((event, self._current))
        self._current = None


class DaliPretrainLoader:
    """Yields ``PretrainBatch`` from two DALI pipelines (unlabeled: every view group, support: V
    views) that follow ``plan``."""

    def __init__(self, spec: LoaderSpec, images: EncodedImages, labeled: np.ndarray, plan: SamplePlan):
        self.spec, self.device, self.images, self.plan = spec, spec.device, images, plan
        self.position = Position(plan.steps_per_epoch)
        pipe_seed = int(np.random.SeedSequence([spec.seed, spec.rank]).generate_state(1)[0] & 0x7FFFFFFF)
        self.unlabeled_steps = UnlabeledSteps(plan)
        depth = max(1, spec.prefetch)
        feed = StreamFeed(images, self.unlabeled_steps, spec.views, ReplacementPools.single(len(images)),
                          spec.on_bad_image, depth)
        self.unlabeled = DaliStream(feed, spec.batch_size, spec, pipe_seed)
        self.support_steps = self.support = None
        if plan.support is not None:
            self.support_steps = SupportSteps(plan)
            feed = StreamFeed(images, self.support_steps, [ViewGroup(spec.support.views, spec.support_recipe)],
                              ReplacementPools.by_class(images.labels, labeled), spec.on_bad_image, depth)
            self.support = DaliStream(feed, plan.support.batch_size, spec, pipe_seed)

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.position.set(epoch, start_step)

    def close(self) -> None:
        """Stop making the feeds' batches; a new pass runs out what an abandoned one left in DALI."""
        for stream in (self.unlabeled, self.support):
            if stream is not None:
                stream.feed.stop()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _batch(self, views: list[torch.Tensor], image_major: bool = False) -> torch.Tensor:
        """DALI outputs (one per view, each [n, H, W, 3], or [n, 3, H, W] without channels-last)
        as one [n * len(views), 3, H, W] batch, view-major (the contract's view groups), or
        image-major (an image's views adjacent: the support set). One view in the requested
        dtype is DALI's buffer itself, not a copy."""
        if len(views) == 1:
            x = views[0]
        else:
            x = torch.stack(views, dim=1).flatten(0, 1) if image_major else torch.cat(views)
        if self.spec.channels_last:
            x = x.permute(0, 3, 1, 2)  # NHWC buffer -> NCHW shape with channels-last strides
        return x if x.dtype == self.spec.dtype else x.to(self.spec.dtype)

    def __iter__(self) -> Iterator[PretrainBatch]:
        epoch, steps = self.position.epoch, range(self.position.start_step, len(self))
        self.position.start_step = 0
        if not steps:
            return
        for steps_of in (self.unlabeled_steps, self.support_steps):
            if steps_of is not None:
                steps_of.epoch = epoch
        for stream in (self.unlabeled, self.support):
            if stream is not None:
                stream.start(steps)
        firsts = np.cumsum([0] + [g.count for g in self.spec.views])
        in_use = OutputsInUse(self.device)
        try:
            yield from self._batches(epoch, steps, firsts, in_use)
        finally:
            in_use.drain()

    def _batches(self, epoch: int, steps: range, firsts: np.ndarray, in_use: OutputsInUse) -> Iterator[PretrainBatch]:
        for step in steps:
            u = self.unlabeled.next()
            groups = tuple(self._batch([u[f"view{v}"] for v in range(a, b)]) for a, b in zip(firsts[:-1], firsts[1:]))
            if self.support is not None:
                out = self.support.next()
                views = self.spec.support.views
                support = self._batch([out[f"view{v}"] for v in range(views)], image_major=True)
                ids = out["ids"].to(torch.int64)
                labels = torch.from_numpy(self.images.labels[ids.numpy()]).repeat_interleave(views)
            else:
                r = self.spec.support_recipe.resolution
                support = groups[0].new_zeros((0, 3, r, r))
                labels = torch.zeros(0, dtype=torch.int64)
            in_use.handed_out((u, out) if self.support is not None else u)
            streams = [s for s in (self.unlabeled, self.support) if s is not None]
            bad = sum((s.feed.bad_images.pop(step, ()) for s in streams), ())
            for s in streams:
                s.feed.used_ids.pop(step, None)
            yield PretrainBatch(views=groups, support_images=support,
                                support_labels=labels.to(self.device, non_blocking=True),
                                sample_ids=u["ids"].to(torch.int64), epoch=epoch, step=step, bad_images=bad)


def build(spec: LoaderSpec, images: EncodedImages, labeled: np.ndarray, plan: SamplePlan) -> DaliPretrainLoader:
    return DaliPretrainLoader(spec, images, labeled, plan)
