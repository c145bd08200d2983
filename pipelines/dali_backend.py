"""DALI backend: decode and the two-view SimCLR recipe in a DALI graph, on the GPU when there is one.

``build_loaders(cfg, ..., backend="dali")`` calls ``build_dali_loader``, which
reads ``data.root`` either as a converted dataset (``tools.convert_imagenet``
output: ``dali/<split>/shard-*.tar`` webdataset shards with their index files)
or as an ImageFolder tree, and returns a ``DaliPretrainLoader`` yielding the
``PretrainBatch`` contract.

Design
------
- One pipeline definition, ``simclr_pipeline``: ``fn.external_source`` ->
  ``fn.decoders.image`` (``mixed`` on CUDA, ``cpu`` otherwise) -> per view
  ``dali_augment.augment_view`` (runs where the decoded images are). It is
  instantiated twice: the unlabeled stream (2 views of each image, decoded
  once) and the support stream (``data.support_views`` views).
- Which images a step holds is planned on the host, exactly as the torch
  backend plans it: the unlabeled stream uses DistributedSampler's
  permutation (seed + epoch, last partial batch dropped, so every rank has
  ``(N // world_size) // batch`` steps and the ranks' images are disjoint);
  the support stream asks the shared ``ClassBalancedSampler`` for global
  step ``epoch * len + step``. The encoded bytes are read on the host
  (memory-mapped shards or files) and fed with their per-view augmentation
  parameters, drawn by numpy from ``(seed, stream, epoch, step, rank)``.
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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipelines.bad_images import BadImageError, ReplacementPools, read_or_replace
from pipelines.contract import PretrainBatch
from pipelines.dali_augment import sample_view_params, simclr_pipeline
from pipelines.datasets import DataError, ImageFolderIndex, index_image_folder
from pipelines.encoded_images import EncodedImages, FileImages, open_converted
from pipelines.recipe import SimCLRRecipe
from pipelines.sampler import ClassBalancedSampler
from pipelines.schedules import UnlabeledSchedule

UNLABELED_STREAM, SUPPORT_STREAM = 0, 1

# ---------------------------------------------------------------------------
# Host-side plan: which images each step holds, and their view parameters
# ---------------------------------------------------------------------------


def unlabeled_plan(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                   epoch: int) -> np.ndarray:
    """int64 [steps, batch_size]: this rank's images per step, the shared unlabeled schedule."""
    schedule = UnlabeledSchedule(num_samples, batch_size, rank, world_size, seed)
    return schedule.epoch_order(epoch).reshape(-1, batch_size)


def step_rng(seed: int, stream: int, a: int, b: int, rank: int) -> np.random.Generator:
    """The generator of one step's view parameters (stream 0: (epoch, step); 1: (global step, 0))."""
    return np.random.default_rng([seed, stream, a, b, rank])


class UnlabeledPlan:
    """Step -> (this rank's unlabeled images, view-parameter generator) for ``epoch``."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        # Raises DataError when the images cannot fill one batch per rank.
        self.schedule = UnlabeledSchedule(num_samples, batch_size, rank, world_size, seed)
        self.rank, self.seed = rank, seed
        self.steps = len(self.schedule)
        self.epoch = 0
        self._cache: tuple[int, np.ndarray] | None = None

    def __call__(self, step: int) -> tuple[np.ndarray, np.random.Generator]:
        if self._cache is None or self._cache[0] != self.epoch:
            order = self.schedule.epoch_order(self.epoch).reshape(-1, self.schedule.batch_size)
            self._cache = (self.epoch, order)
        return self._cache[1][step], step_rng(self.seed, UNLABELED_STREAM, self.epoch, step, self.rank)


class SupportPlan:
    """Step -> (support images, view-parameter generator): global step ``epoch * steps + step``
    is batch ``g mod L`` of the sampler's epoch ``g div L`` (L its length), as in the torch backend."""

    def __init__(self, sampler: ClassBalancedSampler, labeled: np.ndarray, steps_per_epoch: int, rank: int,
                 seed: int):
        self.sampler, self.labeled, self.steps, self.rank, self.seed = sampler, labeled, steps_per_epoch, rank, seed
        self.epoch = 0

    def __call__(self, step: int) -> tuple[np.ndarray, np.random.Generator]:
        g = self.epoch * self.steps + step
        positions = self.sampler.batch(*divmod(g, len(self.sampler)))
        return self.labeled[np.asarray(positions)], step_rng(self.seed, SUPPORT_STREAM, g, 0, self.rank)


class StreamFeed:
    """``fn.external_source`` callback of one stream.

    ``start(steps)`` sets the steps of the coming pass; each call returns the
    next step's batch ``(encoded images, sample ids, *view parameters)`` and
    raises StopIteration after the last step, which ends DALI's epoch.
    Images that fail the host-side checks (``EncodedImages.checked``) follow
    ``on_bad_image`` (``pipelines.bad_images``); the names of those replaced
    wait in ``bad_images[step]`` until the loader yields that step.
    """

    def __init__(self, images: EncodedImages, plan: Callable[[int], tuple[np.ndarray, np.random.Generator]],
                 recipe: SimCLRRecipe, views: int, pools: ReplacementPools, on_bad_image: str = "error"):
        self.images, self.plan, self.recipe, self.views = images, plan, recipe, views
        self.pools, self.on_bad_image = pools, on_bad_image
        self.bad_images: dict[int, tuple[str, ...]] = {}
        self.used_ids: dict[int, np.ndarray] = {}  # images fed per step, until the loader yields it
        self._steps: Iterator[int] = iter(())

    def start(self, steps: Iterable[int]) -> None:
        self._steps = iter(steps)
        self.bad_images.clear()
        self.used_ids.clear()

    def __call__(self) -> tuple:
        step = next(self._steps)  # StopIteration ends DALI's epoch
        ids, rng = self.plan(step)
        read = [read_or_replace(int(i), self.images.checked, self.on_bad_image, self.pools) for i in ids]
        data = [d for (d, _), _, _ in read]
        sizes = np.stack([size for (_, size), _, _ in read])
        used = np.array([j for _, j, _ in read], dtype=np.int64)
        bad = sum((names for _, _, names in read), ())
        if bad:
            self.bad_images[step] = bad
        self.used_ids[step] = used
        params = sample_view_params(rng, sizes, self.recipe, self.views)
        return (data, used, *(a for p in params for a in p.as_tuple()))


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DaliSettings:
    unlabeled_batch_size: int
    support_views: int
    num_threads: int  # DALI CPU threads per pipeline
    prefetch: int  # batches in flight per pipeline
    seed: int
    dtype: torch.dtype
    channels_last: bool = True
    on_bad_image: str = "error"


class DaliStream:
    """One pipeline behind the PyTorch plugin's iterator, restartable at any planned step."""

    def __init__(self, feed: StreamFeed, batch_size: int, recipe: SimCLRRecipe, settings: DaliSettings,
                 device: torch.device, seed: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        cuda = device.type == "cuda"
        self.feed = feed
        self.output_map = [f"view{v}" for v in range(feed.views)] + ["ids"]
        pipe = simclr_pipeline(
            feed, feed.views, recipe, decoder_device="mixed" if cuda else "cpu",
            float16=settings.dtype in (torch.float16, torch.bfloat16), channels_last=settings.channels_last,
            batch_size=batch_size, num_threads=settings.num_threads, prefetch_queue_depth=settings.prefetch,
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


class DaliPretrainLoader:
    """Yields ``PretrainBatch`` from two DALI pipelines (unlabeled: 2 views, support: V views)."""

    def __init__(self, images: EncodedImages, labeled: np.ndarray, support_sampler: ClassBalancedSampler | None,
                 recipe: SimCLRRecipe, settings: DaliSettings, rank: int, world_size: int, device: torch.device):
        self.images, self.labeled, self.sampler = images, labeled, support_sampler
        self.settings, self.device = settings, device
        b = settings.unlabeled_batch_size
        self.unlabeled_plan = UnlabeledPlan(len(images), b, rank, world_size, settings.seed)
        self.epoch, self.start_step = 0, 0
        pipe_seed = int(np.random.SeedSequence([settings.seed, rank]).generate_state(1)[0] & 0x7FFFFFFF)
        feed = StreamFeed(images, self.unlabeled_plan, recipe, 2, ReplacementPools.single(len(images)),
                          settings.on_bad_image)
        self.unlabeled = DaliStream(feed, b, recipe, settings, device, pipe_seed)
        self.support_plan = self.support = None
        if support_sampler is not None:
            self.support_plan = SupportPlan(support_sampler, labeled, len(self), rank, settings.seed)
            m = support_sampler.classes_per_batch * support_sampler.images_per_class
            feed = StreamFeed(images, self.support_plan, recipe, settings.support_views,
                              ReplacementPools.by_class(images.labels, labeled), settings.on_bad_image)
            self.support = DaliStream(feed, m, recipe, settings, device, pipe_seed)

    def __len__(self) -> int:
        return self.unlabeled_plan.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def _batch(self, views: list[torch.Tensor]) -> torch.Tensor:
        """DALI outputs (one per view, each [n, H, W, 3], or [n, 3, H, W] without channels-last)
        as one [n * len(views), 3, H, W] batch, image-major (an image's views adjacent).
        One view in the requested dtype is DALI's buffer itself, not a copy."""
        x = views[0] if len(views) == 1 else torch.stack(views, dim=1).flatten(0, 1)
        if self.settings.channels_last:
            x = x.permute(0, 3, 1, 2)  # NHWC buffer -> NCHW shape with channels-last strides
        return x if x.dtype == self.settings.dtype else x.to(self.settings.dtype)

    def __iter__(self) -> Iterator[PretrainBatch]:
        epoch, steps = self.epoch, range(self.start_step, len(self))
        self.start_step = 0
        if not steps:
            return
        for plan in (self.unlabeled_plan, self.support_plan):
            if plan is not None:
                plan.epoch = epoch
        for stream in (self.unlabeled, self.support):
            if stream is not None:
                stream.start(steps)
        for step in steps:
            u = self.unlabeled.next()
            view1, view2 = self._batch([u["view0"]]), self._batch([u["view1"]])
            if self.support is not None:
                out = self.support.next()
                views = self.settings.support_views
                support = self._batch([out[f"view{v}"] for v in range(views)])
                ids = out["ids"].to(torch.int64)
                labels = torch.from_numpy(self.images.labels[ids.numpy()]).repeat_interleave(views)
            else:
                support = view1.new_zeros((0, *view1.shape[1:]))
                labels = torch.zeros(0, dtype=torch.int64)
            streams = [s for s in (self.unlabeled, self.support) if s is not None]
            bad = sum((s.feed.bad_images.pop(step, ()) for s in streams), ())
            for s in streams:
                s.feed.used_ids.pop(step, None)
            yield PretrainBatch(view1=view1, view2=view2, support_images=support,
                                support_labels=labels.to(self.device, non_blocking=True),
                                sample_ids=u["ids"].to(torch.int64), epoch=epoch, step=step, bad_images=bad)


# ---------------------------------------------------------------------------
# Entry point for build_loaders
# ---------------------------------------------------------------------------


def build_dali_loader(cfg, rank: int, world_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> tuple[ImageFolderIndex, np.ndarray, DaliPretrainLoader]:
    """(index, labeled sample indices, loader) for ``cfg.data.root``.

    A root holding ``dali/<train_split>/`` is read as a converted dataset
    (labeled subset: ``data.labeled_list`` if set, else the converter's
    ``labeled/<split>.txt`` if present, else a stratified draw); otherwise
    ``<root>/<train_split>`` is read as an ImageFolder tree.
    """
    from pipelines.build import build_support_sampler, labeled_indices

    d = cfg.data
    root = Path(d.root)
    if (root / "dali" / d.train_split).is_dir():
        images, converted = open_converted(root, d.train_split)
        labeled = labeled_indices(cfg, images.index, converted)
    else:
        images = FileImages(index_image_folder(root / d.train_split))
        labeled = labeled_indices(cfg, images.index)
    if len(labeled) == 0:
        raise DataError("the labeled subset is empty")
    sampler = build_support_sampler(cfg, images.labels[labeled], rank, world_size)
    settings = DaliSettings(d.unlabeled_batch_size, d.support_views, max(1, d.num_workers), max(1, d.prefetch_factor),
                            cfg.run.seed, dtype, cfg.model.channels_last, d.on_bad_image)
    loader = DaliPretrainLoader(images, labeled, sampler, cfg.augment, settings, rank, world_size, device)
    return images.index, labeled, loader
