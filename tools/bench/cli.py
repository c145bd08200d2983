"""Images/s per GPU: how fast each loader backend feeds, how fast this device trains, and which is the bottleneck.

    python -m tools.throughput [--backend {torch,dali,ffcv,pil-reference}[,...] | all] --data DIR
        --mode {decode,loader,compute,augment,e2e,host}[,...] | all [--feed-rate IMG_S]
        [--config configs/X.yaml] [--set key=value ...] [--steps N] [--warmup N] [--windows N]
        [--step-variants eager,foreach,nosync,compile,...] [--json out.json] [--plot out.png]

Runs alone or under ``torchrun`` (each rank measures; rank 0 reports per-GPU
figures, the mean over ranks, and aggregates, the sum). ``--mode`` takes one
mode, a comma-separated list, or ``all``:

- ``decode``: the pure-decode ceiling: the training split's JPEGs decoded to
  RGB with PIL (libjpeg-turbo) by ``--decode-workers`` processes, no
  augmentation; figure = decoded images/s.
- ``loader``: the backend's ``PretrainBatch`` stream (two views + support),
  consumed as fast as possible; figures = unlabeled images/s, views/s and
  decodes/s (one decode per unlabeled and per support image).
- ``compute``: the training step (``train.step.TrainStep``: model, NT-Xent +
  SuNCEt, LARS, AMP, channels-last) on synthetic device-resident batches of
  the config's shape: the ceiling of this device. Needs no data and neither
  DALI nor FFCV. ``--step-variants`` times several versions of the step in
  turns, window by window, in one run (see ``tools.bench.variants``), and
  reports each one's images/s relative to ``eager``.
- ``augment``: ``pipelines.batch_augment.BatchColorAugment`` on synthetic
  uint8 batches of all the step's views; figure = views/s.
- ``e2e``: the config's training step fed by the loader: unlabeled images/s
  and the fraction of step time spent waiting in ``next(loader)``.
- ``host``: each backend built as on a GPU, on whatever this machine is: the
  host's CPU time per unlabeled image and the cores one GPU needs to be fed
  at ``--feed-rate`` (and, on a GPU, at the compute-only rate); what is left
  out on a CPU-only machine is in ``tools.bench.host_cost``.

Every figure is the median, min and max over ``--windows`` timed windows of
``--steps / --windows`` steps each, after ``--warmup`` steps; device work is
synchronised at the end of each window. CPU cores used = CPU seconds of this
process and its worker processes / wall seconds; peak RSS = the largest
resident memory of this process plus the unique memory (USS) of its workers,
sampled at window ends. CPU ms/img = CPU seconds of the process and its workers
per unlabeled image: the figure that a busy machine disturbs least.

The JSON report (``--json``) is written again after every measurement
(``"complete": false`` until the last), so that a run stopped by a time limit
keeps what it measured. An e2e figure above the compute-only step beyond noise
is flagged with a warning: the machine's load changed between the two.

Exit status: 0 when every requested measurement ran (a backend or module that
is not installed is reported ``unavailable``), 1 when one failed (an ``error``
row, e.g. a data root that does not exist), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

from pipelines.atomic_write import write_text_atomically
from train.config import BACKENDS, ConfigError, PretrainConfig, load_config
from train.data import build_loaders, loader_spec
from train.distributed import DeviceError, DistContext, init_distributed, shutdown_distributed
from train.precision import Precision, resolve_precision
from train.wiring import build_step_kit, configure_backends, host_lead_steps
from tools.bench import host_cost, measure, pil_reference, render
from tools.bench import report as report_lib
from tools.bench.env import environment, usable_cores
from tools.bench.variants import CONFIG, parse_variants

MODES = ("decode", "loader", "compute", "augment", "e2e", "host")
DATA_MODES = ("decode", "loader", "e2e", "host")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--backend",
                   help=f"loader backend(s) to measure: one of {', '.join([pil_reference.NAME, *BACKENDS])}, a "
                        "comma-separated list, or all (default: the config's); pil-reference is the baseline users "
                        "run today (solo-learn's torchvision-on-PIL pipeline, tools/bench/pil_reference.py); all: "
                        "the baseline and every backend")
    p.add_argument("--mode", default="all", help=f"one of {', '.join(MODES)}, a comma-separated list, or all")
    p.add_argument("--data", help="ImageFolder root holding the train split (data.root); needed by decode/loader/e2e")
    p.add_argument("--data-for", action="append", default=[], metavar="BACKEND=DIR",
                   help="data.root for one backend (e.g. ffcv=/data/converted), repeatable")
    p.add_argument("--config", help="YAML config (see configs/); defaults to PretrainConfig's (ResNet-50, 224 px)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--model", help="shortcut for --set model.arch=...")
    p.add_argument("--batch-size", type=int, help="shortcut for --set data.unlabeled_batch_size=...")
    p.add_argument("--resolution", type=int, help="shortcut for --set augment.resolution=...")
    p.add_argument("--views", metavar="GROUPS",
                   help="view groups, shortcut for --set augment.views=...: COUNTxRES[:LO-HI] per group, comma-"
                        "separated, e.g. 2x224:0.14-1,6x96:0.05-0.14 (SwAV's multi-crop); default: the config's")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="shortcut for --set run.precision=...")
    p.add_argument("--workers", type=int, help="shortcut for --set data.num_workers=...")
    p.add_argument("--step-variants", default=CONFIG,
                   help="--mode compute: comma-separated training-step variants timed in turns, e.g. "
                        "eager,foreach,nosync,compile,foreach+nosync, or other objectives' steps, @FILE and "
                        "@FILE+foreach (tools/bench/variants.py; default: config, the config's step)")
    p.add_argument("--decode-workers", type=int,
                   help="processes for --mode decode (default: usable cores / local ranks)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when present (the rank's GPU), else the CPU")
    p.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's choice)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode, split into --windows windows")
    p.add_argument("--windows", type=int, default=5, help="timed windows; figures are their median, min and max")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the first window")
    p.add_argument("--feed-rate", type=float, default=2000.0, metavar="IMG_S",
                   help="--mode host: the unlabeled images/s one GPU is to be fed at (default 2000)")
    p.add_argument("--json", help="write the full report (every figure and window) here, after every measurement")
    p.add_argument("--plot", help="write a PNG bar chart here")
    return p


NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"  # 1, 0.14, .5, 1e-3, 2.5E+1
VIEW_GROUP = re.compile(rf"(\d+)x(\d+)(?::({NUMBER})-({NUMBER}))?")


def parse_views(text: str) -> str:
    """``--views 2x224:0.14-1,6x96:0.05-0.14`` as the YAML list ``augment.views`` takes."""
    groups = []
    for item in text.split(","):
        match = VIEW_GROUP.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"--views: expected COUNTxRES[:LO-HI] per group, e.g. 2x224:0.14-1 or 6x96:1e-3-0.14, "
                             f"got {item!r}")
        count, resolution, lo, hi = match.groups()
        group = {"count": int(count), "resolution": int(resolution)}
        if lo is not None:
            group["crop_scale"] = [float(lo), float(hi)]
        groups.append("{" + ", ".join(f"{k}: {v}" for k, v in group.items()) + "}")
    return "[" + ", ".join(groups) + "]"


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items for the shortcut flags, after the user's own ``--set``."""
    shortcuts = {"model.arch": args.model, "data.unlabeled_batch_size": args.batch_size,
                 "augment.resolution": args.resolution, "run.precision": args.precision,
                 "data.num_workers": args.workers, "data.root": args.data,
                 "augment.views": parse_views(args.views) if args.views else None}
    return list(args.set) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + ["run.knn_every_epochs=0"]


def parse_modes(text: str) -> tuple[str, ...]:
    names = MODES if text == "all" else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"--mode: unknown mode(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(MODES)} or all")
    return tuple(m for m in MODES if m in names)  # fixed order: decode first, before any worker pool exists


def parse_backends(text: str | None, default: str) -> tuple[str, ...]:
    """``--backend``: one name, a comma-separated list or ``all``, in the order given."""
    known = (pil_reference.NAME, *BACKENDS)
    if text == "all":
        return known
    names = tuple(dict.fromkeys(b.strip() for b in (text or default).split(",") if b.strip()))
    unknown = [b for b in names if b not in known]
    if unknown or not names:
        raise ValueError(f"--backend: unknown backend(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(known)}, a comma-separated list, or all")
    return names


def parse_data_for(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        backend, sep, root = item.partition("=")
        if not sep or backend not in BACKENDS:
            raise ValueError(f"--data-for expects BACKEND=DIR with BACKEND in {BACKENDS}, got {item!r}")
        out[backend] = root
    return out


# --------------------------------------------------------------------------- orchestration


def result_row(mode: str, backend: str, run: Callable[[], dict], distributed: bool) -> dict:
    """Run one measurement; a missing module makes an ``unavailable`` row, any
    other exception an ``error`` row (traceback on stderr), so that one failing
    backend does not hide the others' figures.
    Under torchrun it is re-raised: ranks could not agree on what to run next."""
    progress(f"{mode} / {backend}: measuring")
    try:
        figures = run()
    except Exception as exc:
        return measure.failure_row(mode, exc, distributed, backend=backend)
    progress(f"{mode} / {backend}: {figures['images_per_s']['median']:.1f} img/s")
    return report_lib.ok_row(mode, backend, figures)


def progress(message: str) -> None:
    """One line on stderr per measurement, so that a run whose report goes to a file shows it is alive."""
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def with_backend(cfg: PretrainConfig, backend: str, data_for: dict[str, str]) -> PretrainConfig:
    root = data_for.get(backend, cfg.data.root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend, root=root))


def train_stream(cfg: PretrainConfig, backend: str, data_for: dict[str, str], ctx: DistContext, dtype: torch.dtype):
    """The stream ``backend`` feeds a step with; the PIL baseline reads the ImageFolder tree (``--data``)."""
    if backend == pil_reference.NAME:
        tree = with_backend(cfg, "torch", {"torch": data_for.get(backend, cfg.data.root)})
        return pil_reference.build_train_data(loader_spec(tree, ctx.rank, ctx.world_size, ctx.device, dtype)).loader
    return build_loaders(with_backend(cfg, backend, data_for), ctx.rank, ctx.world_size, ctx.device, dtype).train


def run_modes(cfg: PretrainConfig, ctx: DistContext, modes: tuple[str, ...], backends: tuple[str, ...],
              data_for: dict[str, str], timing: measure.Timing, args: argparse.Namespace,
              measured: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every requested measurement on this rank, in a fixed order, as result rows; ``measured``
    sees the rows so far after each measurement (the JSON report is written there)."""
    # Random inputs can overflow: skip such a step (counted) rather than end the benchmark.
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, on_nonfinite="skip"))
    precision = resolve_precision(cfg.run.precision, ctx.device)
    shape = measure.step_shape(cfg)
    dist = ctx.distributed
    rows: list[dict] = []

    def add(*new: dict) -> None:
        rows.extend(new)
        measured(rows)

    if "decode" in modes:
        workers = args.decode_workers or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        root = Path(cfg.data.root) / cfg.data.train_split
        add(result_row("decode", "-", lambda: measure.measure_decode(root, shape, timing, workers, cfg.run.seed), dist))
    if "compute" in modes:
        progress(f"compute: timing {args.step_variants}")
        add(*measure.compute_rows(cfg, ctx, timing, parse_variants(args.step_variants), config_overrides(args)))
    if "augment" in modes:
        add(result_row("augment", "-", lambda: measure.measure_augment(cfg, shape, timing, ctx.device), dist))
    buffered = cfg.data.num_workers * cfg.data.prefetch_factor  # batches the workers prepare ahead
    fed = [m for m in ("loader", "e2e") if m in modes]
    kit = None
    for backend in backends if fed else ():
        try:
            stream = train_stream(cfg, backend, data_for, ctx, precision.input_dtype)
            batches = measure.endless(stream)
        except Exception as exc:  # ImportError: backend not installed (unavailable); else an error (missing data, ...)
            add(*[measure.failure_row(m, exc, dist, backend=backend) for m in fed])
            continue
        if "loader" in modes:
            add(result_row("loader", backend,
                           lambda: measure.measure_loader(batches, shape, timing, ctx.device, buffered), dist))
        if "e2e" in modes:
            if kit is None:
                torch.manual_seed(cfg.run.seed + ctx.rank)
                kit = build_step_kit(cfg, ctx, precision)
                kit.model.train()
            kit.host_lead_steps = host_lead_steps(with_backend(cfg, backend, data_for), ctx.device)  # as training
            # Alone, e2e would time the workers' prefetched batches first: drain them in the warm-up.
            e2e_timing = timing if "loader" in modes else dataclasses.replace(timing, warmup=timing.warmup + buffered)
            add(result_row("e2e", backend,
                           lambda: measure.measure_e2e(kit, batches, shape, e2e_timing, ctx.device), dist))
        batches.close()
        del stream, batches
        gc.collect()  # stop this backend's workers before measuring the next
    for backend in backends if "host" in modes else ():
        try:
            with host_cost.built_as_on_gpu(backend, ctx.device):
                stream = train_stream(cfg, backend, data_for, ctx, precision.input_dtype)
            batches = host_cost.host_batches(stream, backend, ctx.device)
        except Exception as exc:
            add(measure.failure_row("host", exc, dist, backend=backend))
            continue
        add(result_row("host", backend,
                       lambda: measure.measure_loader(batches, shape, timing, ctx.device, buffered), dist))
        batches.close()
        del stream, batches
        gc.collect()
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


# --------------------------------------------------------------------------- report


def shape_summary(cfg: PretrainConfig, precision: Precision, args: argparse.Namespace) -> dict:
    s = measure.step_shape(cfg)
    return {"config": args.config, "data_root": cfg.data.root or None, "arch": cfg.model.arch,
            "resolution": s.resolution, "unlabeled_batch_size": s.unlabeled, "support_classes": s.support_classes,
            "support_images_per_class": s.support_per_class, "support_views": s.support_views,
            "support_images": s.support_images, "views_per_step": s.views, "decodes_per_step": s.decodes,
            "view_groups": [{"count": c, "resolution": r} for c, r in s.groups],
            "network_images_per_unlabeled": s.network_images_per_unlabeled,
            "pixels_per_unlabeled_in_global_views": s.pixels_per_unlabeled,
            "precision": precision.name, "channels_last": cfg.model.channels_last,
            "num_workers": cfg.data.num_workers}


def build_report(rows: list[dict], cfg: PretrainConfig, ctx: DistContext, timing: measure.Timing,
                 args: argparse.Namespace, argv: list[str], complete: bool = True) -> dict:
    """The report of ``rows`` (ratios, warnings, host cores and verdicts filled in); ``complete``
    False while measurements are still to come (under torchrun, rank 0's figures only until then)."""
    report_lib.add_ratios(rows)
    warnings = report_lib.e2e_above_compute(rows)
    compute = report_lib.compute_reference(rows)
    compute_rate = report_lib.median(compute) if compute is not None and ctx.device.type == "cuda" else None
    report_lib.add_host_cores(rows, args.feed_rate, compute_rate)
    launcher = f"torchrun --nproc_per_node={ctx.world_size} -m" if ctx.distributed else "python -m"
    return {
        "schema": "tools.throughput/1",
        "complete": complete,
        "command": f"{launcher} tools.throughput {shlex.join(argv)}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unit": "img/s/GPU" if ctx.device.type == "cuda" else "img/s/process",
        "environment": environment(ctx),
        "shape": shape_summary(cfg, resolve_precision(cfg.run.precision, ctx.device), args),
        "timing": {"warmup_steps": timing.warmup, "windows": timing.windows,
                   "steps_per_window": timing.steps_per_window},
        "feed_rate": args.feed_rate,
        "compute_rate": compute_rate,
        "results": rows,
        "warnings": warnings,
        "verdicts": report_lib.verdicts(rows),
    }


def write_json(report: dict, path: str) -> None:
    """Replace ``path`` whole (a run killed while writing leaves the previous version)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(path), json.dumps(report, indent=2) + "\n")


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    print(render.markdown_report(report), end="")
    if args.json:
        write_json(report, args.json)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        render.save_plot(report, args.plot)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.mode)
        parse_variants(args.step_variants)
        timing = measure.Timing.from_args(args)
        data_for = parse_data_for(args.data_for)
        cfg = load_config(args.config, config_overrides(args))
        cfg.validate()
        backends = parse_backends(args.backend, cfg.data.backend)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if args.data and not Path(args.data).is_dir():
        parser.error(f"--data {args.data} is not a directory (an ImageFolder root or a converted dataset)")
    for flag, value in (("--decode-workers", args.decode_workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not args.data and any(m in DATA_MODES for m in modes):
        parser.error(f"--mode {','.join(m for m in modes if m in DATA_MODES)} needs --data DIR "
                     "(compute and augment need none)")
    try:
        ctx = init_distributed(args.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(cfg.run.seed + ctx.rank)
        configure_backends(cfg, ctx.device)  # as the trainer does (cuDNN autotuning)
        def measured(rows: list[dict]) -> None:  # the JSON so far, so that a killed run keeps it
            if args.json and ctx.is_main:
                write_json(build_report(copy.deepcopy(rows), cfg, ctx, timing, args, argv, complete=False), args.json)

        try:
            rows = run_modes(cfg, ctx, modes, backends, data_for, timing, args, measured)
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
