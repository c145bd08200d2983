"""FFCV backend: ``.beton`` files decoded and cropped on the CPU by FFCV's threads, colour
augmentation inside FFCV's compiled pipeline (CPU) or as batched torch ops on the training device (GPU).

Reads the output of ``tools.convert_imagenet`` (``pipelines.format``):
``ffcv/<split>.beton`` with fields ``image``, ``label``, ``index``.

Two FFCV loaders feed one ``PretrainBatch`` per step:

- *unlabeled*: one ``decode.PlannedCropDecoder`` pipeline on the image field
  (one read and one JPEG decode per image; every view of every view group
  cut from it, as the plan draws them, into one packed row per image), plus
  the ``index`` field, which becomes ``sample_ids``;
- *support*: the same decoder with ``support_views`` views of the support
  group, plus ``label`` and ``index``, over the labeled images, ``C * K`` per
  step in the class-balanced order.

Both follow the rank's ``SamplePlan`` (``pipelines.plan``) through the
schedules of ``orders``, so ``set_epoch(epoch, start_step)`` resumes without
decoding the skipped steps. Where the colour stage (jitter, grayscale, blur,
solarize) runs is decided once, by ``colour_on_loader(device)``:

- on the CPU, where batched torch ops are the bottleneck, the decoder colours
  each view right after cropping it (``colour_kernels.finish_view``, numba, on
  FFCV's worker threads), and the step only normalises and casts;
- on a GPU, the decoder only crops and flips; each view group goes through one
  ``BatchColorAugment`` call on the device with the views' planned parameters,
  which the host draws from the batch's sample ids and sends in one copy
  (``BatchColorAugment.plan``).

Every random choice is the plan's (``pipelines.augment.draws``), so the
views are those of the other backends (within decode tolerance), and a
resumed pass repeats the batches of an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipelines.augment.batched import BatchColorAugment
from pipelines.augment.colour_kernels import normalize_on_host
from pipelines.augment.draws import ViewDraws, draw_views
from pipelines.augment.recipe import ViewGroup
from pipelines.backends.ffcv.decode import PackedViews, PlannedCropDecoder, sample_of_decode_error
from pipelines.backends.ffcv.orders import PipelineFailure, ScheduledLoader, SupportSchedule, UnlabeledSchedule
from pipelines.contract import PretrainBatch
from pipelines.errors import BadImageError, DataError
from pipelines.format.converted import CONVERT_HINT, ConvertedSplit
from pipelines.plan import SamplePlan
from pipelines.spec import LoaderSpec
from pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline import PipelineSpec
    from ffcv.types import CURRENT_VERSION, HeaderType
    from ffcv.transforms import ToDevice, ToTensor


# --------------------------------------------------------------------------- the converted dataset


def open_beton(split: ConvertedSplit) -> Path:
    """The split's ``.beton``, checked against the manifest and against this FFCV's format."""
    beton = split.beton()
    check_beton_header(beton, len(split.index))
    return beton


def check_beton_header(beton: Path, num_samples: int) -> None:
    """Refuse a ``.beton`` that this FFCV cannot read or that holds another dataset,
    naming it (FFCV itself fails with a bare AssertionError or garbage reads)."""
    header = np.fromfile(beton, dtype=HeaderType, count=1)
    if len(header) == 0:
        raise DataError(f"{beton} is too short to be an FFCV .beton; reconvert: {CONVERT_HINT}")
    version = int(header[0]["version"])
    if version != CURRENT_VERSION:
        raise DataError(f"{beton} has FFCV file format version {version}, but the installed ffcv reads version "
                        f"{CURRENT_VERSION}: reconvert with this environment, {CONVERT_HINT}")
    if int(header[0]["num_samples"]) != num_samples or int(header[0]["alloc_table_ptr"]) > beton.stat().st_size:
        raise DataError(f"{beton} holds {int(header[0]['num_samples'])} samples and is {beton.stat().st_size} bytes "
                        f"long; the listing has {num_samples} samples: reconvert: {CONVERT_HINT}")


# --------------------------------------------------------------------------- FFCV pipelines


def colour_on_loader(device: torch.device) -> bool:
    """Whether the colour stage runs inside FFCV's pipeline (training on the
    CPU) rather than as batched torch ops on ``device`` (GPU)."""
    return torch.device(device).type == "cpu"


def views_pipeline(decoder: PlannedCropDecoder, device: torch.device) -> PipelineSpec:
    """Every view of the ``image`` field, packed, as uint8 ``[B, row bytes]`` on ``device``."""
    return PipelineSpec("image", decoder=decoder, transforms=[ToTensor(), ToDevice(device, non_blocking=True)])


def int_pipeline(field: str, device: torch.device | None) -> PipelineSpec:
    """An int64 ``[B, 1]`` field, on ``device`` or left on the CPU (None)."""
    transforms = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device is not None else [])
    return PipelineSpec(field, decoder=IntDecoder(), transforms=transforms)


class ColourStage:
    """The step's colour stage of one view group: normalise only when the decoder coloured the
    views (CPU), else ``BatchColorAugment`` on the device with the views' planned parameters."""

    def __init__(self, group: ViewGroup, first_view: int, dtype: torch.dtype, on_loader: bool):
        self.group, self.first_view, self.dtype, self.on_loader = group, first_view, dtype, on_loader
        self.augment = None if on_loader else BatchColorAugment(group.recipe, flip=False, dtype=dtype)

    def __call__(self, images: torch.Tensor, seeds: np.ndarray, image_major: bool = False) -> torch.Tensor:
        """uint8 [count * n, r, r, 3] views of the images with plan seeds ``seeds`` -> normalised
        [count * n, 3, r, r], channels-last."""
        if self.on_loader:  # the CPU: one table lookup per value
            return normalize_on_host(images, self.group.recipe.mean, self.group.recipe.std).to(self.dtype)
        ones = np.ones((len(seeds), 2), np.int64)  # colour draws do not depend on the image's size
        draws = draw_views(seeds, self.first_view, self.group.count, ones, self.group.recipe)
        if image_major:  # draws are view-major (v * n + i); the images, image-major (i * count + v)
            rows = np.arange(len(draws)).reshape(self.group.count, -1).T.reshape(-1)
            draws = ViewDraws(*(getattr(draws, f.name)[rows] for f in fields(ViewDraws)))
        return self.augment.apply(images.permute(0, 3, 1, 2), self.augment.plan(draws, images.device))


class FFCVPretrainLoader:
    """Yields ``PretrainBatch`` from an unlabeled and an optional support FFCV loader.

    Both loaders are built once (FFCV compiles its pipelines with numba on
    first use, 10-30 s); each ``iter()`` starts one pass of each over the
    range set by ``set_epoch``.
    """

    def __init__(self, spec: LoaderSpec, beton: Path, plan: SamplePlan, sample_names: Sequence[str] | None = None):
        self.spec, self.device, self.rank = spec, spec.device, spec.rank
        self.plan = plan
        self.beton, self.sample_names = Path(beton), sample_names
        device = spec.device
        self.colour_on_loader = colour = colour_on_loader(device)
        common = dict(num_workers=max(1, spec.host_workers), batches_ahead=max(1, spec.prefetch), seed=spec.seed)
        self.unlabeled_schedule = UnlabeledSchedule(plan.unlabeled)
        self.packed = PackedViews(spec.views)
        self.unlabeled = ScheduledLoader(str(beton), self.unlabeled_schedule, distributed=spec.world_size > 1,
                                         pipelines={
            "image": views_pipeline(PlannedCropDecoder(spec.views, colour), device), "label": None,
            "index": int_pipeline("index", None),
        }, **common)
        firsts = np.cumsum([0] + [g.count for g in spec.views])
        self.stages = [ColourStage(g, int(first), spec.dtype, colour) for g, first in zip(spec.views, firsts)]
        self.support_schedule = self.support = None
        if plan.support is not None:
            support_group = ViewGroup(spec.support.views, spec.support_recipe)
            self.support_packed = PackedViews([support_group])
            self.support_stage = ColourStage(support_group, 0, spec.dtype, colour)
            self.support_schedule = SupportSchedule(plan.support)
            decoder = PlannedCropDecoder([support_group], colour, position_offset=int(plan.support.positions[0]),
                                         position_period=plan.support.sampler.images_per_class)
            self.support = ScheduledLoader(str(beton), self.support_schedule, pipelines={
                "image": views_pipeline(decoder, device), "index": int_pipeline("index", None),
                "label": int_pipeline("label", device),
            }, **common)
        self.position = self.unlabeled_schedule.position  # the loader's one (epoch, start step)
        self._passes: list = []

    def __len__(self) -> int:
        return len(self.unlabeled_schedule)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.position.set(epoch, start_step)
        if self.support_schedule is not None:
            self.support_schedule.set_range(self.plan.global_step(epoch, start_step), len(self) - start_step)

    def __iter__(self) -> Iterator[PretrainBatch]:
        epoch, first = self.position.epoch, self.position.start_step
        self.set_epoch(epoch, first)  # the support range follows a start_step reset by a previous pass
        if first >= len(self):
            self.position.start_step = 0
            return
        passes = self._passes = [iter(self.unlabeled)] + ([iter(self.support)] if self.support is not None else [])
        self.position.start_step = 0  # FFCV has read this pass's orders; a next pass starts the epoch over
        try:
            for step in range(first, len(self)):
                try:
                    outputs = [next(p) for p in passes]
                except PipelineFailure as exc:
                    sample = sample_of_decode_error(exc)
                    if sample is None:
                        raise
                    name = self.sample_names[sample] if self.sample_names is not None else "?"
                    raise BadImageError(f"{self.beton}: the JPEG of sample {sample} ({name}) cannot be decoded, the "
                                        f".beton is damaged; check it with python -m tools.verify_converted "
                                        f"{self.beton.parent.parent} and reconvert") from exc
                yield self._batch(outputs, epoch, step)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the current pass's FFCV threads (they run ahead) and wait for them."""
        passes, self._passes = self._passes, []
        for p in passes:
            p.close()
        for p in passes:
            p.join()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _batch(self, outputs: list[tuple], epoch: int, step: int) -> PretrainBatch:
        # FFCV outputs are views into its ring buffers: everything kept below is a copy.
        u = dict(zip(self.unlabeled.pipeline_specs, outputs[0]))
        ids = u["index"].view(-1).clone()
        seeds = self.plan.unlabeled.image_seeds(epoch, ids.numpy())
        views = tuple(stage(self.packed.group(u["image"], g), seeds) for g, stage in enumerate(self.stages))
        if self.support is not None:
            s = dict(zip(self.support.pipeline_specs, outputs[1]))
            support_ids = s["index"].view(-1).numpy()
            support_seeds = self.plan.support.image_seeds(self.plan.global_step(epoch, step), support_ids)
            # [C*K*V, ...], image-major like the other backends
            support = self.support_stage(self.support_packed.group(s["image"], 0, image_major=True), support_seeds,
                                         image_major=True)
            support_labels = s["label"].view(-1).repeat_interleave(self.spec.support.views)
        else:
            r = self.spec.support_recipe.resolution
            support = torch.zeros((0, 3, r, r), dtype=self.spec.dtype, device=self.device)
            support_labels = torch.zeros(0, dtype=torch.int64, device=self.device)
        return PretrainBatch(views=views, support_images=support, support_labels=support_labels, sample_ids=ids,
                             epoch=epoch, step=step)


def build(spec: LoaderSpec, split: ConvertedSplit, plan: SamplePlan) -> FFCVPretrainLoader:
    return FFCVPretrainLoader(spec, open_beton(split), plan, split.index.paths)
