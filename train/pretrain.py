"""SimCLR + SuNCEt pre-training: ``python -m train.pretrain --config configs/X.yaml``.

Runs alone or under ``torchrun`` (one or many nodes) or SLURM. Layout follows
torchvision's references: ``build_parser``, ``main`` (wiring only),
``train_one_epoch`` and ``evaluate_knn``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from pipelines.errors import DataError, LoaderFailure
from train import checkpoint as ckpt
from train import export
from train.config import ConfigError, PretrainConfig, config_to_dict, load_config
from train.console import Progress, banner
from train.data import Loaders, build_loaders
from train.distributed import DeviceError, DistContext, all_reduce_sum, init_distributed, shutdown_distributed
from train.knn import extract_features, knn_accuracy
from train.lars import LayerwiseSGD
from train.precision import resolve_precision
from train.preemption import PREEMPTED_EXIT, Preempted, Preemption
from train.resume import global_batch, resumed_config
from train.run_lock import RunDirError, RunLock
from train.run_logger import RunLogger
from train.schedule import WarmupCosineSchedule
from train.step import NonFiniteLossError, StepRecords
from train.wiring import StepKit, build_step_kit, configure_backends


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (a path, or the name of a shipped one: see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=2.4 (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when present (the rank's GPU), else the CPU")
    p.add_argument("--resume", default="none",
                   help="'auto': continue from the newest checkpoint in run.output_dir if any; "
                        "'none': start fresh (refused if the directory holds checkpoints); or a checkpoint path")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="resume although optim.epochs / warmup_epochs / start_lr / lr / final_lr differ from the "
                        "checkpoint's (refused otherwise): the new schedule applies from the resumed step on")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the file, its _base_ files and every --set) as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build the data, model and step, train one step, print what a run would do, and exit "
                        "without writing anything")
    return p


@dataclass
class TrainState:
    """Where the run is: the next step to train is ``step`` of ``epoch``."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    bad_images: int = 0  # unreadable images replaced (data.on_bad_image=skip), all ranks


@dataclass
class Trainer:
    """The objects a step needs, wired once by ``main``."""

    cfg: PretrainConfig
    ctx: DistContext
    kit: StepKit  # model, optimizer, scaler, precision and the training steps
    schedule: WarmupCosineSchedule
    loaders: Loaders
    steps_per_epoch: int
    logger: RunLogger | None  # main rank of a run; attached after the resume checks

    @property
    def model(self) -> torch.nn.Module:  # DDP-wrapped when distributed
        return self.kit.model

    @property
    def core(self) -> torch.nn.Module:  # the bare model (checkpoints, kNN, export)
        return self.kit.core

    @property
    def optimizer(self) -> LayerwiseSGD:
        return self.kit.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.kit.scaler

    def checkpoint_state(self, state: TrainState, objective: dict, rng: dict) -> dict:
        return {
            "model": self.core.state_dict(),
            "objective": objective,  # SwAV's queue; empty for the others
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": asdict(state),
            "config": config_to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "global_batch": global_batch(self.cfg, self.ctx.world_size),  # what a resumed run keeps
            "rng": rng,  # every rank's generators (ckpt.gather_rng_states)
            "loader": self.loaders.train.state_dict(),  # what the stream needs beyond (epoch, step)
        }

    def save(self, state: TrainState) -> None:
        objective = self.kit.objective_state()  # on every rank: SwAV gathers every rank's queue
        rng = ckpt.gather_rng_states(self.ctx.device)  # on every rank: each saves its own generators
        if self.ctx.is_main:
            ckpt.save_checkpoint(self.checkpoint_state(state, objective, rng), Path(self.cfg.run.output_dir),
                                 state.global_step, self.cfg.run.keep_checkpoints)
        if self.ctx.distributed:
            torch.distributed.barrier()


class LogWindow:
    """The steps since the last log row: each logged loss is their mean (steps read back one by one
    with ``compute.host_sync=step``, or together at the log step), ``images_per_s`` and
    ``data_wait_frac`` are over the window's wall time."""

    def __init__(self) -> None:
        self.start, self.images, self.waited = time.perf_counter(), 0, 0.0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, read_back: dict[str, float]) -> None:
        steps = int(read_back.pop("steps", 1))
        for key, value in read_back.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * steps
            self.counts[key] = self.counts.get(key, 0) + steps

    def means(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {key: self.sums[key] / self.counts[key] for key in self.sums}
        return out | {"images_per_s": self.images / seconds, "data_wait_frac": self.waited / seconds}


def train_one_epoch(tr: Trainer, state: TrainState, preemption: Preemption | None = None) -> None:
    """Train from ``state.step`` to the end of ``state.epoch``; checkpoints every
    ``run.checkpoint_every_steps`` global steps, and where ``preemption`` says the run stops
    (then raises ``Preempted``).

    The host reads the step results back (and acts on a non-finite loss) at
    every step with ``compute.host_sync=step``, otherwise only at log steps,
    checkpoint steps and the epoch's end. Each log row averages the losses,
    ``images_per_s`` and ``data_wait_frac`` over the steps since the previous
    row (``LogWindow``)."""
    cfg, ctx = tr.cfg, tr.ctx
    train_step = tr.kit.step_for_epoch(state.epoch)
    records = StepRecords(skip_nonfinite=cfg.loss.on_nonfinite == "skip")
    lead = tr.kit.host_lead()
    loader = tr.loaders.train
    loader.set_epoch(state.epoch, state.step)
    bar = Progress(tr.steps_per_epoch, state.step, f"epoch {state.epoch}", ctx.is_main and cfg.run.progress_bar)
    tr.model.train()
    batches = iter(loader)
    bad_here = 0  # this rank's bad images not yet added to state.bad_images
    window = LogWindow()  # what the next log row averages over
    while state.step < tr.steps_per_epoch:
        lead.wait()  # host_sync=log on CUDA: at most compute.max_host_lead_steps steps ahead of the device
        t0 = time.perf_counter()
        batch = next(batches)
        window.waited += time.perf_counter() - t0
        for name in batch.bad_images:
            print(f"warning: rank {ctx.rank} epoch {state.epoch} step {state.step}: skipped unreadable image "
                  f"(data.on_bad_image=skip): {name}", file=sys.stderr)
        bad_here += len(batch.bad_images)
        lr = tr.schedule.apply(tr.optimizer, state.global_step)
        records.add(train_step(batch, state.global_step))
        lead.record()
        window.images += batch.unlabeled_batch_size
        state.step += 1
        state.global_step += 1
        if ctx.is_main:
            bar.update(1)
        log_now = state.global_step % cfg.run.log_every_steps == 0 or state.step == tr.steps_per_epoch
        save_now = state.global_step % cfg.run.checkpoint_every_steps == 0 and state.step < tr.steps_per_epoch
        if log_now or save_now or train_step.syncs_every_step:
            out = records.check()  # waits for the device; raises NonFiniteLossError (loss.on_nonfinite=stop)
            state.skipped_steps += int(out.pop("skipped"))
            window.add(out)
        if log_now:
            means = window.means()
            if ctx.is_main:
                bar.show({"loss": f"{means['loss']:.4f}", "lr": f"{lr:.3g}", "img/s": f"{means['images_per_s']:.1f}",
                          "data wait": f"{100 * means['data_wait_frac']:.0f}%"}, log_step=True)
            window = LogWindow()
        if log_now or save_now:  # the same steps on every rank: a collective is safe here
            state.bad_images += all_reduce_sum(bad_here, ctx.device)
            bad_here = 0
        if log_now:
            row = {"global_step": state.global_step, "epoch": state.epoch, "step": state.step, "lr": lr,
                   "skipped": state.skipped_steps, "bad_images": state.bad_images, **means}
            if tr.logger is not None:
                tr.logger.log(row)
        stop = preemption.agreed(collective_point=log_now) if preemption is not None else False
        if save_now or stop:
            tr.save(state)
        if stop:
            loader.close()
            raise Preempted(f"stopped by {preemption.received or 'a signal on another rank'} at epoch {state.epoch} "
                            f"step {state.step} (global step {state.global_step}); checkpoint written in "
                            f"{cfg.run.output_dir}: continue with --resume auto")
    bar.close()
    loader.close()  # a pass cut short (max_steps_per_epoch) stops its workers


@torch.no_grad()
def evaluate_knn(tr: Trainer) -> dict[str, float] | None:
    """Weighted cosine kNN of held-out images against the labeled subset."""
    loaders = tr.loaders
    if loaders.knn_train is None or loaders.knn_test is None:
        return None
    was_training = tr.core.training
    tr.core.eval()
    cl = tr.cfg.model.channels_last
    progress = tr.cfg.run.progress_bar and sys.stdout.isatty()  # no redrawn bars in a log file
    try:
        train_f, train_y = extract_features(tr.core.features, loaders.knn_train, tr.ctx.device, cl, progress,
                                            "knn labeled")
        test_f, test_y = extract_features(tr.core.features, loaders.knn_test, tr.ctx.device, cl, progress,
                                          "knn held-out")
    except DataError as exc:  # an image unreadable since the start: the monitor stops, training goes on
        print(f"warning: kNN monitor off for the rest of the run: {exc}", file=sys.stderr)
        loaders.knn_train = loaders.knn_test = None
        return None
    finally:
        tr.core.train(was_training)
    return knn_accuracy(train_f, train_y, test_f, test_y, loaders.num_classes, k=tr.cfg.run.knn_k)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_resume(resume: str, run_dir: Path) -> tuple[dict, Path] | None:
    if resume == "none":
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}); "
                              "pass --resume auto to continue it, or choose another run.output_dir")
        return None
    path = run_dir if resume == "auto" else Path(resume)
    if resume != "auto" and not (path.is_dir() or path.is_file()):  # a pipe would block the reader
        raise ConfigError(f"--resume: no checkpoint file or run folder at {path}")
    try:
        if path.is_dir() or resume == "auto":  # a run folder: its newest readable checkpoint
            loaded = ckpt.load_latest(path)
            if loaded is None and resume != "auto":
                raise ConfigError(f"--resume {path}: the folder holds no checkpoint (ckpt-*.pt)")
        else:
            loaded = ckpt.load(path), path
        return None if loaded is None else (ckpt.require_training_state(*loaded), loaded[1])
    except ckpt.CheckpointError as exc:  # not what train.pretrain writes: named in one line
        raise ConfigError(f"--resume: {exc}") from None


def build_trainer(cfg: PretrainConfig, ctx: DistContext) -> Trainer:
    """Everything a run builds, writing nothing: the run attaches its ``RunLogger`` once it has
    checked that the checkpoint fits (``_run``)."""
    try:
        precision = resolve_precision(cfg.run.precision, ctx.device)  # once per run
    except ValueError as exc:  # fp16 without CUDA
        raise ConfigError(str(exc)) from None
    loaders = build_loaders(cfg, ctx.rank, ctx.world_size, ctx.device, precision.input_dtype)
    kit = build_step_kit(cfg, ctx, precision)
    o = cfg.optim
    steps = len(loaders.train)
    if cfg.run.max_steps_per_epoch is not None:
        steps = min(steps, cfg.run.max_steps_per_epoch)
    try:
        schedule = WarmupCosineSchedule(steps_per_epoch=steps, epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                        start_lr=o.start_lr, peak_lr=o.lr, final_lr=o.final_lr)
    except ValueError as exc:
        raise ConfigError(f"optim (epochs/warmup_epochs): {exc}") from exc
    return Trainer(cfg, ctx, kit, schedule, loaders, steps, None)


def run(cfg: PretrainConfig, ctx: DistContext, resume: str = "none", allow_schedule_change: bool = False) -> dict:
    if resume == "none":
        cfg.validate(ctx.world_size)  # a resumed run is validated once its checkpoint has set the per-rank sizes
    run_dir = Path(cfg.run.output_dir)
    lock = RunLock(run_dir) if ctx.is_main else None  # one run per directory; dies with the process
    try:
        if ctx.is_main:
            stale = ckpt.remove_stale_temp_files(run_dir)  # no write of ours is in progress: we hold the lock
            if stale:
                print(f"note: removed {len(stale)} temp file(s) of writes a killed run left ({', '.join(stale[:3])})")
        return _run(cfg, ctx, resume, run_dir, allow_schedule_change)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: PretrainConfig, ctx: DistContext, resume: str, run_dir: Path, allow_schedule_change: bool) -> dict:
    loaded = resolve_resume(resume, run_dir)
    cfg = resumed_config(loaded[0], cfg, ctx.world_size, allow_schedule_change) if loaded is not None else cfg
    cfg.validate(ctx.world_size)
    seed_everything(cfg.run.seed)
    configure_backends(cfg, ctx.device)
    state = TrainState(**loaded[0]["train_state"]) if loaded else TrainState()
    tr = build_trainer(cfg, ctx)
    if state.step > tr.steps_per_epoch:  # before the logger trims metrics.csv to the checkpoint
        tr.loaders.train.close()
        raise ConfigError(f"cannot resume: the checkpoint stopped at step {state.step} of epoch {state.epoch}, but an "
                          f"epoch now has {tr.steps_per_epoch} steps (the dataset, or run.max_steps_per_epoch, "
                          "changed since); resume with the data and settings the run started with")
    if ctx.is_main:
        tr.logger = RunLogger(run_dir, cfg, state.global_step if loaded else None)
    resumed = None
    if loaded:
        saved, path = loaded
        tr.core.load_state_dict(saved["model"])
        tr.optimizer.load_state_dict(saved["optimizer"])
        tr.scaler.load_state_dict(saved["scaler"])
        tr.kit.resume_objective(saved.get("objective") or {})
        ckpt.set_rng_state(saved["rng"], ctx.rank, ctx.device)
        if saved.get("loader") is not None:
            tr.loaders.train.load_state_dict(saved["loader"])
        resumed = f"resumed from {path.name} at epoch {state.epoch} step {state.step}, global step {state.global_step}"
    if ctx.is_main:
        print(banner(cfg, ctx.world_size, ctx.device, tr.kit.precision.name, tr.loaders, tr.steps_per_epoch,
                     resumed), flush=True)
    if tr.loaders.knn_off and ctx.is_main:
        print(f"note: kNN monitor off (run.knn_every_epochs={cfg.run.knn_every_epochs}): {tr.loaders.knn_off}")
    knn = None
    try:
        with Preemption(cfg.run.preempt_signals, ctx.distributed, ctx.device, cfg.run.preempt_grace_s,
                        cfg.run.output_dir) as preemption:
            if loaded and state.step == 0 and state.epoch > 0 and knn_due(cfg, state.epoch - 1) and ctx.is_main:
                # the checkpoint is an epoch's end: its kNN point is in metrics.csv unless the run stopped
                # (preempted, killed) between that checkpoint and the evaluation; then it is evaluated now
                knn = tr.logger.knn_at(state.global_step)
                if knn is None:
                    knn = log_knn(tr, state, state.epoch - 1, "evaluated on resume: the run stopped before it")
            if knn is None and loaded and state.epoch >= cfg.optim.epochs:
                knn = earlier_knn(run_dir)  # a finished run's
            while state.epoch < cfg.optim.epochs:
                train_one_epoch(tr, state, preemption)
                epoch = state.epoch
                state.epoch, state.step = state.epoch + 1, 0
                tr.save(state)  # before evaluating: an evaluation failure never costs the epoch
                if preemption.agreed(collective_point=True):
                    raise Preempted(f"stopped by {preemption.received or 'a signal on another rank'} at the end of "
                                    f"epoch {epoch}; checkpoint written in {run_dir}: continue with --resume auto")
                if knn_due(cfg, epoch) and ctx.is_main:
                    knn = log_knn(tr, state, epoch)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(f"{exc}. Last good checkpoint kept in {run_dir}; "
                                 "lower optim.lr or set loss.on_nonfinite=skip") from exc
    except Preempted:
        if tr.logger is not None:
            tr.logger.close()
        raise
    summary = {"run_dir": str(run_dir.resolve()), "global_step": state.global_step,
               "skipped_steps": state.skipped_steps, "bad_images": state.bad_images, **(knn or {})}
    if ctx.is_main:
        summary["encoder"] = str(export_encoder(tr, run_dir, state.global_step).resolve())
        tr.logger.write_curves()
        tr.logger.write_summary(summary)
        tr.logger.close()
    return summary


def knn_due(cfg: PretrainConfig, epoch: int) -> bool:
    """Whether the kNN monitor evaluates after ``epoch`` (0-based)."""
    return bool(cfg.run.knn_every_epochs) and (epoch + 1) % cfg.run.knn_every_epochs == 0


def log_knn(tr: Trainer, state: TrainState, epoch: int, note: str = "") -> dict[str, float] | None:
    """Evaluate the kNN monitor after ``epoch``, log it at the current global step, redraw the curves."""
    knn = evaluate_knn(tr)
    if knn is not None:
        tr.logger.log({"global_step": state.global_step, "epoch": epoch, **knn})
        tr.logger.write_curves()
        print(f"epoch {epoch}: kNN top-1 {knn['knn_top1']:.2f}%  top-5 {knn['knn_top5']:.2f}%"
              + (f" ({note})" if note else ""))
    return knn


def earlier_knn(run_dir: Path) -> dict | None:
    """The kNN figures of a finished run's ``summary.json`` (resuming it trains nothing more)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    knn = {k: v for k, v in summary.items() if k.startswith("knn_")} if isinstance(summary, dict) else {}
    return knn or None


def export_encoder(tr: Trainer, run_dir: Path, global_step: int) -> Path:
    """The encoder for other tools (``train.export``) with its ``EncoderInfo`` beside it: torchvision's
    format where the arch is a torchvision one, timm's for timm models, the encoder's own keys
    otherwise (``python -m tools.export`` writes more formats)."""
    arch = tr.cfg.model.arch
    fmt = export.default_format(arch)
    name = arch.replace("/", "-")
    path = run_dir / (f"encoder_{name}.pth" if fmt == "native" else f"encoder_{name}_{fmt}.pth")
    return export.export_encoder(tr.core, path, fmt, export.EncoderInfo.of(tr.cfg, run_dir, global_step))


def dry_run(cfg: PretrainConfig, ctx: DistContext, resume: str = "none") -> dict:
    """Build everything a run builds and train one step, writing nothing: a config that passes
    here will not fail at start (run directory, data, model, step), whatever it does later."""
    cfg.validate(ctx.world_size)
    if ctx.is_main:  # what the run itself would refuse at start
        RunLock.check(cfg.run.output_dir)
        resolve_resume(resume, Path(cfg.run.output_dir))
    seed_everything(cfg.run.seed)
    configure_backends(cfg, ctx.device)
    tr = build_trainer(cfg, ctx)
    if ctx.is_main:
        print(banner(cfg, ctx.world_size, ctx.device, tr.kit.precision.name, tr.loaders, tr.steps_per_epoch, None))
    loader = tr.loaders.train
    loader.set_epoch(0)
    batch = next(iter(loader))
    tr.model.train()
    tr.schedule.apply(tr.optimizer, 0)
    out = StepRecords(skip_nonfinite=False).add(tr.kit.step_for_epoch(0)(batch)).check()
    loader.close()
    return out


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if cfg.run.logger == "wandb" and not _importable("wandb"):  # before anything is built
        print("error: run.logger=wandb needs the wandb package (pip install wandb), or set run.logger=none",
              file=sys.stderr)
        return 2
    try:
        ctx = init_distributed(args.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    resume = args.resume
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and resume != "auto" and (resume == "none" or ckpt.list_checkpoints(Path(cfg.run.output_dir))):
        # torchrun restarted the group: continue from where it got, not from --resume's starting point
        resume = "auto"
        if ctx.is_main:
            print("note: torchrun restarted the workers; resuming from the newest checkpoint (--resume auto)")
    try:
        if args.dry_run:
            out = dry_run(cfg, ctx, resume)
            if ctx.is_main:
                print(f"dry run: one step trained, loss {out['loss']:.4f}; nothing written")
            return 0
        summary = run(cfg, ctx, resume, args.allow_schedule_change)
    except (ConfigError, DataError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoaderFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        if ctx.is_main:
            print(f"preempted: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (NonFiniteLossError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if ctx.is_main:
        print(f"done: {summary['global_step']} steps; run directory {summary['run_dir']}; "
              f"encoder {summary['encoder']}")
        if "knn_top1" in summary:
            print(f"final kNN top-1 {summary['knn_top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
