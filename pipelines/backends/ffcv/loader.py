"""FFCV backend: ``.beton`` files decoded and cropped on the CPU by FFCV, colour
augmentation as batched torch ops on the training device (GPU) or inside FFCV's
compiled pipeline (CPU).

Reads the output of ``tools.convert_imagenet`` (``pipelines.format``):
``ffcv/<split>.beton`` with fields ``image``, ``label``, ``index``.

Two FFCV loaders feed one ``PretrainBatch`` per step:

- *unlabeled*: two random-resized-crop decoder pipelines
  (``decode.CheckedRandomResizedCropDecoder``: FFCV's, but a JPEG that
  fails to decode raises and is named instead of becoming noise) on the one
  image field (FFCV 1.0.2 decodes once per pipeline, so each view is an
  independent crop), a CPU flip, then ``ToDevice`` and channels-last uint8;
  plus the ``index`` field, which becomes ``sample_ids``;
- *support*: ``support_views`` such pipelines plus ``label`` over the labeled
  images, ``C * K`` per step in the class-balanced order.

Both follow the rank's ``SamplePlan`` (``pipelines.plan``) through the
schedules of ``orders``, so
``set_epoch(epoch, start_step)`` resumes without decoding the skipped steps.
Where the colour stage (jitter, grayscale, blur) runs is decided once, by
``colour_on_loader(device)``:

- on a GPU, all images of a step go through one ``BatchColorAugment`` call
  on the device (jitter, grayscale, blur, normalisation, cast to ``dtype``),
  each with its own parameters;
- on the CPU, where those batched torch ops are the bottleneck, each view
  pipeline runs ``pipelines.augment.ffcv_colour.FFCVColorAugment`` after the flip
  (numba, on FFCV's worker threads, per-image parameters, uint8 out), and the
  step only normalises and casts (``normalize_only``).

Randomness: on a GPU, colour parameters come from a generator on the device
seeded with (seed, epoch, rank, step); crops and flips, and on the CPU the
colour parameters too, come from FFCV's compiled code, which draws from
numba's per-thread state, seeded per batch with (seed, rank, stream, global
step) by ``orders.FailFastEpochIterator``. Sample orders and augmentations
are therefore both reproducible, and a resumed pass repeats the batches of
an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipelines.augment.batched import BatchColorAugment, normalize_only
from pipelines.augment.ffcv_colour import FFCVColorAugment
from pipelines.augment.recipe import SimCLRRecipe
from pipelines.backends.ffcv.decode import CheckedRandomResizedCropDecoder, sample_of_decode_error
from pipelines.backends.ffcv.orders import PipelineFailure, ScheduledLoader, SupportSchedule, UnlabeledSchedule
from pipelines.contract import PretrainBatch
from pipelines.errors import BadImageError, DataError
from pipelines.format.converted import CONVERT_HINT, ConvertedSplit
from pipelines.plan import COLOUR_STREAM, SUPPORT_STREAM, UNLABELED_STREAM, SamplePlan, sample_seed
from pipelines.spec import LoaderSpec
from pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline import PipelineSpec
    from ffcv.types import CURRENT_VERSION, HeaderType
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage


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


def view_pipeline(recipe: SimCLRRecipe, device: torch.device, colour: bool) -> PipelineSpec:
    """One augmented view of the ``image`` field: random resized crop (area
    fraction ``recipe.crop_scale``, aspect ratio ``recipe.crop_ratio``) to
    ``recipe.resolution`` and a flip with ``recipe.flip_prob`` on the CPU, with
    ``colour`` also the recipe's jitter, grayscale and blur
    (``FFCVColorAugment``), then uint8 ``[B, 3, H, W]`` channels-last on ``device``."""
    size = (recipe.resolution, recipe.resolution)
    decoder = CheckedRandomResizedCropDecoder(size, scale=tuple(recipe.crop_scale), ratio=tuple(recipe.crop_ratio))
    return PipelineSpec("image", decoder=decoder, transforms=[
        RandomHorizontalFlip(recipe.flip_prob),
        *([FFCVColorAugment(recipe)] if colour else []),
        ToTensor(),
        ToDevice(device, non_blocking=True),
        ToTorchImage(channels_last=True),
    ])


def int_pipeline(field: str, device: torch.device | None) -> PipelineSpec:
    """An int64 ``[B, 1]`` field, on ``device`` or left on the CPU (None)."""
    transforms = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device is not None else [])
    return PipelineSpec(field, decoder=IntDecoder(), transforms=transforms)


def view_names(views: int) -> list[str]:
    return [f"view{v}" for v in range(views)]


# --------------------------------------------------------------------------- the PretrainLoader


class NormalizeOnly:
    """The step's colour stage when the colour ops ran inside FFCV: normalise
    and cast to ``dtype`` only (same call signature as ``BatchColorAugment``)."""

    def __init__(self, recipe: SimCLRRecipe, dtype: torch.dtype):
        self.recipe, self.dtype = recipe, dtype

    def __repr__(self) -> str:
        return f"NormalizeOnly(recipe={self.recipe!r}, dtype={self.dtype})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize_only(images, self.recipe, self.dtype)


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
        device, recipe = spec.device, spec.recipe
        self.colour_on_loader = colour = colour_on_loader(device)
        common = dict(num_workers=max(1, spec.host_workers), batches_ahead=max(1, spec.prefetch), seed=spec.seed)
        self.unlabeled_schedule = UnlabeledSchedule(plan.unlabeled)
        self.unlabeled = ScheduledLoader(str(beton), self.unlabeled_schedule,
                                         sample_seed(spec.seed, spec.rank, UNLABELED_STREAM),
                                         distributed=spec.world_size > 1,
                                         pipelines={
            "image": None, "label": None,
            **{name: view_pipeline(recipe, device, colour) for name in view_names(2)},
            "index": int_pipeline("index", None),
        }, **common)
        self.support_schedule = self.support = None
        if plan.support is not None:
            self.support_schedule = SupportSchedule(plan.support)
            self.support = ScheduledLoader(str(beton), self.support_schedule,
                                           sample_seed(spec.seed, spec.rank, SUPPORT_STREAM), pipelines={
                "image": None, "index": None,
                **{name: view_pipeline(recipe, device, colour) for name in view_names(spec.support.views)},
                "label": int_pipeline("label", device),
            }, **common)
        # flipped on the CPU; on the CPU also coloured there
        self.augment = (NormalizeOnly(recipe, spec.dtype) if colour
                        else BatchColorAugment(recipe, flip=False, dtype=spec.dtype))
        self.generator = torch.Generator(device=device)
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
        b = self.spec.batch_size
        images = [u["view0"], u["view1"]]
        if self.support is not None:
            s = dict(zip(self.support.pipeline_specs, outputs[1]))
            views = [s[name] for name in view_names(self.spec.support.views)]
            images.append(torch.stack(views, dim=1).flatten(0, 1))  # [C*K*V, ...], image-major like the reference
            support_labels = s["label"].view(-1).repeat_interleave(len(views))
        else:
            support_labels = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.generator.manual_seed(sample_seed(self.spec.seed, epoch, self.rank, COLOUR_STREAM, step))
        out = self.augment(torch.cat(images), generator=self.generator)  # one draw per image, or normalisation only
        return PretrainBatch(
            view1=out[:b], view2=out[b : 2 * b], support_images=out[2 * b :], support_labels=support_labels,
            sample_ids=u["index"].view(-1).clone(), epoch=epoch, step=step,
        )


def build(spec: LoaderSpec, split: ConvertedSplit, plan: SamplePlan) -> FFCVPretrainLoader:
    return FFCVPretrainLoader(spec, open_beton(split), plan, split.index.paths)
