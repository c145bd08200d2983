"""Images/s per GPU: how fast each loader backend feeds, how fast this device trains, and which is the bottleneck.

    python -m tools.throughput [--backend {torch,dali,ffcv,all}] --data DIR --mode {decode,loader,compute,augment,e2e,all}
        [--config configs/X.yaml] [--set key=value ...] [--steps N] [--warmup N] [--windows N]
        [--json out.json] [--plot out.png]

Runs alone or under ``torchrun`` (each rank measures; rank 0 reports per-GPU
figures, the mean over ranks, and aggregates, the sum). ``--mode`` takes one
mode, a comma-separated list, or ``all``:

- ``decode``: the pure-decode ceiling: the training split's JPEGs decoded to
  RGB with PIL (libjpeg-turbo) by ``--decode-workers`` processes, no
  augmentation; figure = decoded images/s.
- ``loader``: the backend's ``PretrainBatch`` stream (two views + support),
  consumed as fast as possible; figures = unlabeled images/s, views/s and
  decodes/s (one decode per unlabeled and per support image).
- ``compute``: ``train.step.train_step`` (model, NT-Xent + SuNCEt, LARS, AMP,
  channels-last) on synthetic device-resident batches of the config's shape:
  the ceiling of this device. Needs no data and neither DALI nor FFCV.
- ``augment``: ``pipelines.batch_augment.BatchColorAugment`` on synthetic
  uint8 batches of all the step's views; figure = views/s.
- ``e2e``: the training step fed by the loader: unlabeled images/s and the
  fraction of step time spent waiting in ``next(loader)``.

Every figure is the median, min and max over ``--windows`` timed windows of
``--steps / --windows`` steps each, after ``--warmup`` steps; device work is
synchronised at the end of each window (the training step's ``.item()``
already syncs every step). CPU cores used = CPU seconds of this process and
its worker processes / wall seconds; peak RSS = the largest resident memory
of this process plus the unique memory (USS) of its workers, sampled at
window ends.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipelines.contract import PretrainBatch, PretrainLoader
from pipelines.errors import DataError
from pipelines.image_folder import index_image_folder
from pipelines.images import open_rgb
from train.config import BACKENDS, ConfigError, PretrainConfig, load_config
from train.data import build_loaders
from train.distributed import DistContext, init_distributed, shutdown_distributed
from train.lars import LARS
from train.precision import Precision, resolve_precision
from train.pretrain import build_model_and_optimizer
from train.step import StepSettings, train_step
from tools import throughput_report as report_lib

MODES = ("decode", "loader", "compute", "augment", "e2e")
DATA_MODES = ("decode", "loader", "e2e")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=[*BACKENDS, "all"], help="loader backend(s) to measure (default: the config's)")
    p.add_argument("--mode", default="all", help=f"one of {', '.join(MODES)}, a comma-separated list, or all")
    p.add_argument("--data", help="ImageFolder root holding the train split (data.root); needed by decode/loader/e2e")
    p.add_argument("--data-for", action="append", default=[], metavar="BACKEND=DIR",
                   help="data.root for one backend (e.g. ffcv=/data/converted), repeatable")
    p.add_argument("--config", help="YAML config (see configs/); defaults to PretrainConfig's (ResNet-50, 224 px)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--model", help="shortcut for --set model.arch=...")
    p.add_argument("--batch-size", type=int, help="shortcut for --set data.unlabeled_batch_size=...")
    p.add_argument("--resolution", type=int, help="shortcut for --set augment.resolution=...")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="shortcut for --set run.precision=...")
    p.add_argument("--workers", type=int, help="shortcut for --set data.num_workers=...")
    p.add_argument("--decode-workers", type=int,
                   help="processes for --mode decode (default: usable cores / local ranks)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's choice)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode, split into --windows windows")
    p.add_argument("--windows", type=int, default=5, help="timed windows; figures are their median, min and max")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the first window")
    p.add_argument("--json", help="write the full report (every figure and window) here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    return p


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items for the shortcut flags, after the user's own ``--set``."""
    shortcuts = {"model.arch": args.model, "data.unlabeled_batch_size": args.batch_size,
                 "augment.resolution": args.resolution, "run.precision": args.precision,
                 "data.num_workers": args.workers, "data.root": args.data}
    return list(args.set) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + ["run.knn_every_epochs=0"]


def parse_modes(text: str) -> tuple[str, ...]:
    names = MODES if text == "all" else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"--mode: unknown mode(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(MODES)} or all")
    return tuple(m for m in MODES if m in names)  # fixed order: decode first, before any worker pool exists


def parse_data_for(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        backend, sep, root = item.partition("=")
        if not sep or backend not in BACKENDS:
            raise ValueError(f"--data-for expects BACKEND=DIR with BACKEND in {BACKENDS}, got {item!r}")
        out[backend] = root
    return out


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepShape:
    """What one training step consumes, derived from the config."""

    unlabeled: int  # B images, 2 views each
    support_classes: int  # C, 0 without SuNCEt
    support_per_class: int  # K images per class
    support_views: int  # V views per support image
    resolution: int

    @property
    def support_images(self) -> int:
        return self.support_classes * self.support_per_class * self.support_views

    @property
    def views(self) -> int:
        return 2 * self.unlabeled + self.support_images

    @property
    def decodes(self) -> int:
        return self.unlabeled + self.support_classes * self.support_per_class


def step_shape(cfg: PretrainConfig) -> StepShape:
    d = cfg.data
    use_support = cfg.loss.suncet_weight > 0 and d.support_classes > 0
    return StepShape(d.unlabeled_batch_size, d.support_classes if use_support else 0,
                     d.support_images_per_class, d.support_views, cfg.augment.resolution)


@dataclass(frozen=True)
class Timing:
    warmup: int
    windows: int
    steps_per_window: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.windows < 1 or self.steps_per_window < 1:
            raise ValueError(f"need --warmup >= 0, --windows >= 1 and --steps >= --windows, got {self}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Timing:
        return cls(args.warmup, args.windows, args.steps // max(args.windows, 1))


# --------------------------------------------------------------------------- measuring


class ResourceMeter:
    """CPU cores used and peak resident memory of this process and its
    workers, between ``start`` and ``stop``. Uses psutil to see live worker
    processes; without it, ``resource.getrusage`` sees only this process and
    reaped children, and memory is their lifetime peak."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        self._psutil = psutil
        self._proc = psutil.Process() if psutil else None
        self._t0 = self._cpu0 = 0.0
        self._peak = 0

    def _processes(self) -> list:
        return [self._proc] + self._proc.children(recursive=True)

    def _cpu_seconds(self) -> float:
        if self._psutil is None:
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        total = 0.0
        for proc in self._processes():
            try:
                t = proc.cpu_times()
            except self._psutil.Error:  # exited since listed
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def _rss_bytes(self) -> int:
        if self._psutil is None:  # lifetime peaks, in KiB on Linux
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return (own.ru_maxrss + kids.ru_maxrss) * 1024
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:  # unique pages only: forked workers share most of this process's
                total += child.memory_full_info().uss
            except self._psutil.Error:
                continue
        return total

    def start(self) -> None:
        self._t0, self._cpu0, self._peak = time.perf_counter(), self._cpu_seconds(), self._rss_bytes()

    def sample(self) -> None:
        self._peak = max(self._peak, self._rss_bytes())

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        cores = (self._cpu_seconds() - self._cpu0) / wall if wall > 0 else 0.0
        self.sample()
        return {"cpu_cores_used": cores, "peak_rss_mb": self._peak / 2**20}


@dataclass
class Window:
    steps: int
    seconds: float
    wait_seconds: float


def run_windows(step: Callable[[], float | None], timing: Timing,
                sync: Callable[[], None]) -> tuple[list[Window], dict]:
    """Call ``step`` ``timing.warmup`` times, then time ``timing.windows``
    windows of ``steps_per_window`` calls. ``step`` may return the seconds it
    spent waiting for data. Returns the windows and the resources used."""
    for _ in range(timing.warmup):
        step()
    sync()
    meter = ResourceMeter()
    meter.start()
    windows = []
    for _ in range(timing.windows):
        t0, wait = time.perf_counter(), 0.0
        for _ in range(timing.steps_per_window):
            wait += step() or 0.0
        sync()
        windows.append(Window(timing.steps_per_window, time.perf_counter() - t0, wait))
        meter.sample()
    return windows, meter.stop()


def window_figures(windows: list[Window], resources: dict, per_step: dict[str, int]) -> dict:
    """Rates of ``per_step`` counts (e.g. images_per_s: B) over the windows, plus resources."""
    seconds = [w.seconds for w in windows]
    figures = {key: report_lib.rates([w.steps * n for w in windows], seconds).as_dict() for key, n in per_step.items()}
    figures.update(resources)
    cores = resources["cpu_cores_used"]
    figures["images_per_s_per_core"] = figures["images_per_s"]["median"] / cores if cores > 0 else None
    figures["steps"] = sum(w.steps for w in windows)
    return figures


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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

        windows, resources = run_windows(step, timing, lambda: None)
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
    windows, resources = run_windows(step, warm, device_sync(device))
    return window_figures(windows, resources, loader_counts(shape))


@dataclass
class StepKit:
    """What ``train_step`` needs, wired as ``train.pretrain.build_trainer`` does."""

    model: torch.nn.Module
    optimizer: LARS
    scaler: torch.amp.GradScaler
    settings: StepSettings


def build_step_kit(cfg: PretrainConfig, ctx: DistContext, precision: Precision) -> StepKit:
    loss = cfg.loss
    core, model, optimizer, scaler = build_model_and_optimizer(cfg, ctx)
    core.train()
    suncet_weight = loss.suncet_weight if loss.supervised_epochs is None or loss.supervised_epochs > 0 else 0.0
    # Random inputs can overflow: skip such a step (counted) rather than end the benchmark.
    settings = StepSettings(loss.temperature, suncet_weight, precision, skip_nonfinite=True)
    return StepKit(model, optimizer, scaler, settings)


def synthetic_batch(shape: StepShape, device: torch.device, dtype: torch.dtype, channels_last: bool) -> PretrainBatch:
    """Random normalised-looking images of the step's shape, already on the device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, shape.resolution, shape.resolution, device=device).to(dtype, memory_format=fmt)

    labels = torch.arange(shape.support_classes, device=device).repeat_interleave(
        shape.support_per_class * shape.support_views)  # class-major, as the loaders deliver them
    return PretrainBatch(images(shape.unlabeled), images(shape.unlabeled), images(shape.support_images), labels,
                         torch.arange(shape.unlabeled), epoch=0, step=0)


def _timed_train_step(kit: StepKit, skipped: list[int]) -> Callable[[PretrainBatch], None]:
    def run(batch: PretrainBatch) -> None:
        out = train_step(kit.model, batch, kit.optimizer, kit.scaler, kit.settings)  # .item() syncs
        skipped[0] += int(out["skipped"])

    return run


def measure_compute(kit: StepKit, shape: StepShape, timing: Timing, cfg: PretrainConfig, device: torch.device,
                    precision: Precision) -> dict:
    batch = synthetic_batch(shape, device, precision.input_dtype, cfg.model.channels_last)
    skipped = [0]
    run = _timed_train_step(kit, skipped)
    windows, resources = run_windows(lambda: run(batch), timing, device_sync(device))
    figures = window_figures(windows, resources, {"images_per_s": shape.unlabeled, "views_per_s": shape.views})
    figures["skipped_steps"] = skipped[0]
    return figures


def measure_e2e(kit: StepKit, batches: Iterator[PretrainBatch], shape: StepShape, timing: Timing,
                device: torch.device) -> dict:
    skipped = [0]
    run = _timed_train_step(kit, skipped)

    def step() -> float:
        t0 = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t0
        run(batch)
        return waited

    windows, resources = run_windows(step, timing, device_sync(device))
    figures = window_figures(windows, resources, loader_counts(shape))
    figures["data_wait_frac"] = report_lib.Spread.of(w.wait_seconds / w.seconds for w in windows).as_dict()
    # Over all timed steps: a loader that falls behind in some windows shows here even when the median hides it.
    figures["data_wait_frac"]["overall"] = sum(w.wait_seconds for w in windows) / sum(w.seconds for w in windows)
    figures["skipped_steps"] = skipped[0]
    return figures


def measure_augment(cfg: PretrainConfig, shape: StepShape, timing: Timing, device: torch.device,
                    precision: Precision) -> dict:
    """``BatchColorAugment`` on uint8 channels-last batches of all the step's views."""
    from pipelines.augment.batched import BatchColorAugment

    augment = BatchColorAugment(cfg.augment, dtype=precision.input_dtype)
    r = shape.resolution
    images = torch.randint(0, 256, (shape.views, r, r, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    def step() -> None:
        augment(images)

    windows, resources = run_windows(step, timing, device_sync(device))
    return window_figures(windows, resources, {"images_per_s": shape.views})


# --------------------------------------------------------------------------- rows


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def result_row(mode: str, backend: str, measure: Callable[[], dict], distributed: bool) -> dict:
    """Run one measurement; a missing module makes an ``unavailable`` row, any
    other exception an ``error`` row (traceback on stderr), so that one failing
    backend does not hide the others' figures.
    Under torchrun it is re-raised: ranks could not agree on what to run next."""
    try:
        figures = measure()
    except ImportError as exc:  # an optional module (e.g. pipelines.batch_augment) is missing
        return unavailable_row(mode, backend, exc)
    except Exception as exc:  # reported in the row and on stderr
        if distributed:
            raise
        traceback.print_exc()
        return {"mode": mode, "backend": backend, "status": "error", "reason": short_reason(exc)}
    return {"mode": mode, "backend": backend, "status": "ok", "reason": None, "figures": figures}


def unavailable_row(mode: str, backend: str, exc: BaseException) -> dict:
    return {"mode": mode, "backend": backend, "status": "unavailable", "reason": short_reason(exc)}


def with_backend(cfg: PretrainConfig, backend: str, data_for: dict[str, str]) -> PretrainConfig:
    root = data_for.get(backend, cfg.data.root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend, root=root))


def run_modes(cfg: PretrainConfig, ctx: DistContext, modes: tuple[str, ...], backends: tuple[str, ...],
              data_for: dict[str, str], timing: Timing, args: argparse.Namespace) -> list[dict]:
    """Every requested measurement on this rank, in a fixed order, as result rows."""
    precision = resolve_precision(cfg.run.precision, ctx.device)
    shape = step_shape(cfg)
    dist = ctx.distributed
    rows = []
    if "decode" in modes:
        workers = args.decode_workers or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        root = Path(cfg.data.root) / cfg.data.train_split
        rows.append(result_row("decode", "-", lambda: measure_decode(root, shape, timing, workers, cfg.run.seed), dist))
    kit = None
    if "compute" in modes or "e2e" in modes:
        kit = build_step_kit(cfg, ctx, precision)
    if "compute" in modes:
        rows.append(result_row("compute", "-", lambda: measure_compute(kit, shape, timing, cfg, ctx.device, precision),
                               dist))
    if "augment" in modes:
        rows.append(result_row("augment", "-", lambda: measure_augment(cfg, shape, timing, ctx.device, precision),
                               dist))
    fed = [m for m in ("loader", "e2e") if m in modes]
    for backend in backends if fed else ():
        try:
            loaders = build_loaders(with_backend(cfg, backend, data_for), ctx.rank, ctx.world_size, ctx.device,
                                    precision.input_dtype)
            batches = endless(loaders.train)
        except Exception as exc:  # missing module or dependency, unconverted data, no GPU for DALI, ...
            rows += [unavailable_row(m, backend, exc) for m in fed]
            continue
        if "loader" in modes:
            buffered = cfg.data.num_workers * cfg.data.prefetch_factor
            rows.append(result_row("loader", backend,
                                   lambda: measure_loader(batches, shape, timing, ctx.device, buffered), dist))
        if "e2e" in modes:
            # Alone, e2e would time the workers' prefetched batches first: drain them in the warm-up.
            e2e_timing = timing if "loader" in modes else dataclasses.replace(
                timing, warmup=timing.warmup + cfg.data.num_workers * cfg.data.prefetch_factor)
            rows.append(result_row("e2e", backend, lambda: measure_e2e(kit, batches, shape, e2e_timing, ctx.device),
                                   dist))
        batches.close()
        del loaders, batches
        gc.collect()  # stop this backend's workers before measuring the next
    return rows


def merge_ranks(rows_by_rank: list[list[dict]]) -> list[dict]:
    """One row per measurement: per-GPU figures (mean over ranks), aggregate
    (sum) and each rank's figures; the first failure when any rank failed."""
    merged = []
    for rank_rows in zip(*rows_by_rank):
        failed = next((r for r in rank_rows if r["status"] != "ok"), None)
        if failed is not None:
            merged.append(dict(failed))
            continue
        per_rank = [r["figures"] for r in rank_rows]
        figures, aggregate = report_lib.combine_ranks(per_rank)
        row = {**rank_rows[0], "figures": figures, "aggregate": aggregate}
        if len(per_rank) > 1:
            row["ranks"] = per_rank
        merged.append(row)
    return merged


# --------------------------------------------------------------------------- environment


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(ctx: DistContext) -> dict:
    cpu = {"model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores()}
    if ctx.device.type == "cuda":
        device = torch.cuda.get_device_name(ctx.device)
    else:
        device = f"{cpu['model']}, {cpu['usable_cores']} of {cpu['logical_cores']} cores"
    try:
        from PIL import features

        jpeg = features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    except Exception:  # old Pillow without version(); the figure is informative only
        jpeg = None
    versions = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda if ctx.device.type == "cuda" else None,
        "torchvision": package_version("torchvision"),
        "dali": package_version("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110", "nvidia-dali"),
        "ffcv": package_version("ffcv"), "pillow": package_version("pillow", "Pillow", "pillow-simd"),
        "libjpeg-turbo": jpeg,
    }
    return {"device": device, "device_type": ctx.device.type, "cpu": cpu, "world_size": ctx.world_size,
            "torch_threads": torch.get_num_threads(), "versions": versions}


def shape_summary(cfg: PretrainConfig, precision: Precision, args: argparse.Namespace) -> dict:
    s = step_shape(cfg)
    return {"config": args.config, "data_root": cfg.data.root or None, "arch": cfg.model.arch,
            "resolution": s.resolution, "unlabeled_batch_size": s.unlabeled, "support_classes": s.support_classes,
            "support_images_per_class": s.support_per_class, "support_views": s.support_views,
            "support_images": s.support_images, "views_per_step": s.views, "decodes_per_step": s.decodes,
            "precision": precision.name, "channels_last": cfg.model.channels_last,
            "num_workers": cfg.data.num_workers}


def build_report(rows: list[dict], cfg: PretrainConfig, ctx: DistContext, timing: Timing,
                 args: argparse.Namespace, argv: list[str]) -> dict:
    report_lib.add_ratios(rows)
    launcher = f"torchrun --nproc_per_node={ctx.world_size} -m" if ctx.distributed else "python -m"
    return {
        "schema": "tools.throughput/1",
        "command": f"{launcher} tools.throughput {shlex.join(argv)}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unit": "img/s/GPU" if ctx.device.type == "cuda" else "img/s/process",
        "environment": environment(ctx),
        "shape": shape_summary(cfg, resolve_precision(cfg.run.precision, ctx.device), args),
        "timing": {"warmup_steps": timing.warmup, "windows": timing.windows,
                   "steps_per_window": timing.steps_per_window},
        "results": rows,
        "verdicts": report_lib.verdicts(rows),
    }


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    import json

    print(report_lib.markdown_report(report), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        report_lib.save_plot(report, args.plot)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.mode)
        timing = Timing.from_args(args)
        data_for = parse_data_for(args.data_for)
        cfg = load_config(args.config, config_overrides(args))
        cfg.validate()
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if not args.data and any(m in DATA_MODES for m in modes):
        parser.error(f"--mode {','.join(m for m in modes if m in DATA_MODES)} needs --data DIR "
                     "(compute and augment need none)")
    backends = BACKENDS if args.backend == "all" else (args.backend or cfg.data.backend,)
    ctx = init_distributed(args.device)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(cfg.run.seed + ctx.rank)
        if ctx.device.type == "cuda" and not cfg.run.deterministic:
            torch.backends.cudnn.benchmark = True  # as the trainer does
        try:
            rows = run_modes(cfg, ctx, modes, backends, data_for, timing, args)
        except ValueError as exc:  # e.g. fp16 requested on CPU
            print(f"error: {exc}", file=sys.stderr)
            return 2
        rows_by_rank = [rows]
        if ctx.distributed:
            rows_by_rank = [None] * ctx.world_size
            torch.distributed.all_gather_object(rows_by_rank, rows)
        if ctx.is_main:
            write_outputs(build_report(merge_ranks(rows_by_rank), cfg, ctx, timing, args, argv), args)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave it as found when called in-process
        shutdown_distributed()
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
