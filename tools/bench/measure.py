"""The timed measurements of ``tools.throughput``: decode, loader, compute (with step variants), augment, e2e.

Each measurement calls a step function ``--warmup`` times, then times
``--windows`` windows of ``--steps / --windows`` calls; device work is
synchronised at the end of each window. Several step functions (the compute
variants) are timed in turns, window by window, so that they share the
machine's ups and downs and their ratios can be read window by window.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pipelines.contract import PretrainBatch, PretrainLoader
from pipelines.errors import DataError
from pipelines.image_folder import index_image_folder
from pipelines.images import open_rgb
from train.config import ConfigError, PretrainConfig
from train.distributed import DistContext
from train.precision import resolve_precision
from train.step import StepRecords, TrainStep
from train.wiring import StepKit, build_step_kit
from tools.bench import report as report_lib
from tools.bench import variants as variants_lib
from tools.bench.meter import ResourceMeter

# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepShape:
    """What one training step consumes, derived from the config."""

    unlabeled: int  # B images, ``views_per_image`` views each
    support_classes: int  # C, 0 without SuNCEt
    support_per_class: int  # K images per class
    support_views: int  # V views per support image
    groups: tuple[tuple[int, int], ...]  # (count, resolution) of each view group
    support_resolution: int

    @property
    def resolution(self) -> int:
        """The first (global) group's side."""
        return self.groups[0][1]

    @property
    def views_per_image(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def support_images(self) -> int:
        return self.support_classes * self.support_per_class * self.support_views

    @property
    def views(self) -> int:
        return self.views_per_image * self.unlabeled + self.support_images

    @property
    def network_images_per_unlabeled(self) -> float:
        """Images through the network per unlabeled image: every view and the step's share of support images."""
        return self.views / self.unlabeled

    @property
    def pixels_per_unlabeled(self) -> float:
        """Pixels through the network per unlabeled image, in units of one global view."""
        pixels = sum(c * r * r for c, r in self.groups) * self.unlabeled + self.support_images * self.support_resolution ** 2
        return pixels / self.unlabeled / self.resolution ** 2

    @property
    def decodes(self) -> int:
        return self.unlabeled + self.support_classes * self.support_per_class


def step_shape(cfg: PretrainConfig) -> StepShape:
    """The shape of the run's first steps (SuNCEt as in epoch 0)."""
    d = cfg.data
    use_support = cfg.support_active(0)
    groups = cfg.augment.view_groups()
    return StepShape(d.unlabeled_batch_size, d.support_classes if use_support else 0,
                     d.support_images_per_class, d.support_views, tuple((g.count, g.resolution) for g in groups),
                     groups[d.support_view_group].resolution)


@dataclass(frozen=True)
class Timing:
    warmup: int
    windows: int
    steps_per_window: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.windows < 1 or self.steps_per_window < 1:
            raise ValueError(f"need --warmup >= 0, --windows >= 1 and --steps >= --windows, got --warmup "
                             f"{self.warmup}, --windows {self.windows} and {self.steps_per_window} step(s) per window")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Timing:
        return cls(args.warmup, args.windows, args.steps // max(args.windows, 1))


# --------------------------------------------------------------------------- timing


@dataclass
class Window:
    steps: int
    seconds: float
    wait_seconds: float
    cpu_seconds: float  # of this process and its workers


@dataclass
class Timed:
    """One thing to time: ``step`` may return the seconds it waited for data;
    ``end_window`` runs inside each window's timing, before the device sync."""

    step: Callable[[], float | None]
    end_window: Callable[[], None] = lambda: None


def run_windows(timed: Sequence[Timed], timing: Timing, sync: Callable[[], None]) -> list[tuple[list[Window], dict]]:
    """Warm each of ``timed`` up, then time ``timing.windows`` windows of each,
    in turns (window w starts with item w mod n, so that no item always runs
    first or after the same neighbour). Returns, per item, its windows and the
    resources it used (CPU cores over its own windows; the process's peak
    memory, shared by all) plus ``warmup_seconds`` (its warm-up, compilation
    included)."""
    warmups = []
    for item in timed:
        t0 = time.perf_counter()
        for _ in range(timing.warmup):
            item.step()
        item.end_window()
        sync()
        warmups.append(time.perf_counter() - t0)
    meter = ResourceMeter()
    meter.start()
    windows: list[list[Window]] = [[] for _ in timed]
    cpu, wall = [0.0] * len(timed), [0.0] * len(timed)
    n = len(timed)
    for w in range(timing.windows):
        for i in [(w + k) % n for k in range(n)]:
            item = timed[i]
            cpu0, t0, wait = meter.cpu_seconds(), time.perf_counter(), 0.0
            for _ in range(timing.steps_per_window):
                wait += item.step() or 0.0
            item.end_window()
            sync()
            seconds, cpu_used = time.perf_counter() - t0, meter.cpu_seconds() - cpu0
            cpu[i] += cpu_used
            wall[i] += seconds
            windows[i].append(Window(timing.steps_per_window, seconds, wait, cpu_used))
            meter.sample()
    peak = meter.stop()["peak_rss_mb"]
    return [(w, {"cpu_cores_used": c / s if s > 0 else 0.0, "peak_rss_mb": peak, "warmup_seconds": t})
            for w, c, s, t in zip(windows, cpu, wall, warmups)]


def window_figures(windows: list[Window], resources: dict, per_step: dict[str, int]) -> dict:
    """Rates of ``per_step`` counts (e.g. images_per_s: B) over the windows, plus resources and
    ``cpu_ms_per_image``: CPU time (this process and its workers) per ``images_per_s`` item, the
    figure that a busy machine disturbs least."""
    seconds = [w.seconds for w in windows]
    figures = {key: report_lib.rates([w.steps * n for w in windows], seconds).as_dict() for key, n in per_step.items()}
    images = per_step["images_per_s"]
    figures["cpu_ms_per_image"] = report_lib.Spread.of(1000 * w.cpu_seconds / (w.steps * images)
                                                       for w in windows).as_dict()
    figures.update(resources)
    cores = resources["cpu_cores_used"]
    figures["images_per_s_per_core"] = figures["images_per_s"]["median"] / cores if cores > 0 else None
    figures["steps"] = sum(w.steps for w in windows)
    return figures


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --------------------------------------------------------------------------- decode, loader, augment


def _decode_files(paths: list[str]) -> int:
    """Worker: decode each file to RGB pixels (PIL / libjpeg-turbo) and drop them."""
    for path in paths:
        open_rgb(path)
    return len(paths)


def measure_decode(root: Path, shape: StepShape, timing: Timing, workers: int, seed: int) -> dict:
    """Decoded images/s of ``root``'s JPEGs, ``shape.decodes`` images per step
    (the decodes of one training step), split across ``workers`` processes."""
    index = index_image_folder(root)
    paths = [str(index.root / p) for p in index.paths]
    np.random.default_rng(seed).shuffle(paths)
    cursor = 0

    def next_files(n: int) -> list[str]:
        nonlocal cursor
        out = [paths[(cursor + i) % len(paths)] for i in range(n)]
        cursor += n
        return out

    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        def step() -> None:
            files = next_files(shape.decodes)
            pool.map(_decode_files, [files[i::workers] for i in range(workers)])

        ((windows, resources),) = run_windows([Timed(step)], timing, lambda: None)
    figures = window_figures(windows, resources, {"images_per_s": shape.decodes})
    figures["decodes_per_s"] = figures["images_per_s"]
    figures["workers"] = workers
    return figures


def endless(loader: PretrainLoader) -> Iterator[PretrainBatch]:
    """Batches across epoch boundaries, as a multi-epoch run sees them."""
    if len(loader) == 0:
        raise DataError("the loader has no full batch for one epoch")
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_counts(shape: StepShape) -> dict[str, int]:
    return {"images_per_s": shape.unlabeled, "views_per_s": shape.views, "decodes_per_s": shape.decodes}


def measure_loader(batches: Iterator[PretrainBatch], shape: StepShape, timing: Timing, device: torch.device,
                   buffered_steps: int) -> dict:
    """Steady-state loader rate: the warm-up first drains the ``buffered_steps``
    batches that workers prefetch, which would otherwise be timed as free."""
    def step() -> None:
        next(batches)

    warm = dataclasses.replace(timing, warmup=timing.warmup + buffered_steps)
    ((windows, resources),) = run_windows([Timed(step)], warm, device_sync(device))
    return window_figures(windows, resources, loader_counts(shape))


def measure_augment(cfg: PretrainConfig, shape: StepShape, timing: Timing, device: torch.device) -> dict:
    """``BatchColorAugment`` on uint8 channels-last batches of all the step's views, one call per
    view group (the support images with their group's)."""
    from pipelines.augment.batched import BatchColorAugment

    dtype = resolve_precision(cfg.run.precision, device).input_dtype
    groups = cfg.augment.view_groups()
    counts = [g.count * shape.unlabeled for g in groups]
    counts[cfg.data.support_view_group] += shape.support_images
    work = [(BatchColorAugment(g.recipe, dtype=dtype),
             torch.randint(0, 256, (n, g.resolution, g.resolution, 3), dtype=torch.uint8,
                           device=device).permute(0, 3, 1, 2)) for g, n in zip(groups, counts)]

    def step() -> None:
        for augment, images in work:
            augment(images)

    ((windows, resources),) = run_windows([Timed(step)], timing, device_sync(device))
    return window_figures(windows, resources, {"images_per_s": shape.views})


# --------------------------------------------------------------------------- the training step


class StepDriver:
    """Runs a ``TrainStep`` as ``train.pretrain.train_one_epoch`` does: the host
    lead bound before taking a batch, the results read back every step when
    the step syncs per step, otherwise once per window (a log step)."""

    def __init__(self, kit: StepKit, next_batch: Callable[[], PretrainBatch]):
        self.train_step: TrainStep = kit.step_for_epoch(0)
        self.next_batch = next_batch
        self.lead = kit.host_lead()
        self.records = StepRecords(skip_nonfinite=kit.cfg.loss.on_nonfinite == "skip")
        self.skipped = 0

    def step(self) -> float:
        self.lead.wait()
        t0 = time.perf_counter()
        batch = self.next_batch()
        waited = time.perf_counter() - t0
        self.records.add(self.train_step(batch))
        self.lead.record()
        if self.train_step.syncs_every_step:
            self.read_back()
        return waited

    def read_back(self) -> None:
        self.skipped += int(self.records.check()["skipped"])


def synthetic_batch(shape: StepShape, device: torch.device, dtype: torch.dtype, channels_last: bool) -> PretrainBatch:
    """Random normalised-looking images of the step's shape, already on the device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def images(n: int, side: int) -> torch.Tensor:
        return torch.randn(n, 3, side, side, device=device).to(dtype, memory_format=fmt)

    labels = torch.arange(shape.support_classes, device=device).repeat_interleave(
        shape.support_per_class * shape.support_views)  # class-major, as the loaders deliver them
    views = tuple(images(count * shape.unlabeled, side) for count, side in shape.groups)
    return PretrainBatch(views, images(shape.support_images, shape.support_resolution), labels,
                         torch.arange(shape.unlabeled), epoch=0, step=0)


def compute_rows(cfg: PretrainConfig, ctx: DistContext, timing: Timing, variants: Sequence[str],
                 overrides: Sequence[str] = ()) -> list[dict]:
    """One ``compute`` row per step variant, timed in turns on synthetic
    device-resident batches; every variant starts from the same weights. A
    variant that cannot be built or fails in its warm-up gets its own
    ``unavailable``/``error`` row; the others are still timed. ``overrides``
    (the command line's ``--set``) apply over an ``@FILE`` variant's overlay too."""
    prepared: list[tuple[str, dict, StepDriver]] = []
    rows: dict[str, dict] = {}
    for name in variants:
        try:
            vcfg = variants_lib.variant_config(cfg, name, tuple(overrides))
            precision = resolve_precision(vcfg.run.precision, ctx.device)
            torch.manual_seed(cfg.run.seed + ctx.rank)
            kit = build_step_kit(vcfg, ctx, precision)
            kit.model.train()
            vshape = step_shape(vcfg)  # an @overlay variant may have another shape
            batch = synthetic_batch(vshape, ctx.device, precision.input_dtype, vcfg.model.channels_last)
            settings = {**variants_lib.describe(vcfg, precision.name),
                        "network_images_per_unlabeled": round(vshape.network_images_per_unlabeled, 3)}
            prepared.append((name, settings, StepDriver(kit, lambda b=batch: b), vshape))
        except Exception as exc:  # e.g. cudagraphs or fp16 requested on a CPU
            rows[name] = failure_row("compute", exc, ctx.distributed, variant=name)
    timed = []
    for name, settings, driver, _ in prepared:
        timed.append(Timed(driver.step, driver.read_back))
    try:
        results = run_windows(timed, timing, device_sync(ctx.device))
    except Exception as exc:  # a failure while timing (compilation included) ends every variant's measurement
        if ctx.distributed:
            raise
        traceback.print_exc()
        results = None
        for name, _, _, _ in prepared:
            rows[name] = report_lib.failure_row("compute", "-", exc, variant=name)
    for i, (name, settings, driver, vshape) in enumerate(prepared if results else ()):
        windows, resources = results[i]
        figures = window_figures(windows, resources, {"images_per_s": vshape.unlabeled, "views_per_s": vshape.views})
        figures["skipped_steps"] = driver.skipped
        rows[name] = report_lib.ok_row("compute", "-", figures, variant=name, settings=settings)
    for name in variants:
        rows[name]["reference"] = variants_lib.reference_of(name, variants)
    return [rows[name] for name in variants]


def failure_row(mode: str, exc: BaseException, distributed: bool, backend: str = "-", **extra) -> dict:
    """The row of a measurement that raised (traceback on stderr); re-raised under torchrun."""
    if distributed:
        raise exc
    if isinstance(exc, ConfigError):  # a refusal that names its reason
        print(f"error: {exc}", file=sys.stderr)
    elif not isinstance(exc, ImportError):
        traceback.print_exception(exc)
    return report_lib.failure_row(mode, backend, exc, **extra)


def measure_e2e(kit: StepKit, batches: Iterator[PretrainBatch], shape: StepShape, timing: Timing,
                device: torch.device) -> dict:
    """The config's training step fed by the loader."""
    driver = StepDriver(kit, lambda: next(batches))
    ((windows, resources),) = run_windows([Timed(driver.step, driver.read_back)], timing, device_sync(device))
    figures = window_figures(windows, resources, loader_counts(shape))
    figures["data_wait_frac"] = report_lib.Spread.of(w.wait_seconds / w.seconds for w in windows).as_dict()
    # Over all timed steps: a loader that falls behind in some windows shows here even when the median hides it.
    figures["data_wait_frac"]["overall"] = sum(w.wait_seconds for w in windows) / sum(w.seconds for w in windows)
    figures["skipped_steps"] = driver.skipped
    return figures
