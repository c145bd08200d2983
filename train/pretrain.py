"""SimCLR + SuNCEt pre-training: ``python -m train.pretrain --config configs/X.yaml``.

Runs alone or under ``torchrun`` (one or many nodes) or SLURM. Layout follows torchvision's
references: ``build_parser``, ``main`` (wiring only), ``train_one_epoch`` and ``evaluate_knn``,
with ``run`` the loop over epochs. What the loop trains with and saves is ``train.trainer``; what
it writes, ``train.run_logger``; what it prints, ``train.console``; how it stops when told to,
``train.preemption``.

Exit codes: 0 done (or already finished), 1 an error during the run, 2 a config, data or run
directory refused at start, 3 done but more than ``loss.max_skipped_share`` of the steps were
skipped as non-finite, 143 stopped by a signal at a checkpoint (``--resume auto`` continues).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import yaml

from pipelines.errors import DataError, LoaderFailure
from train import checkpoint as ckpt
from train.config import ConfigError, PretrainConfig, config_to_dict, load_config
from train.console import FIRST_BATCH_WORK, Progress, banner
from train.curves import RunShape
from train.distributed import DeviceError, DistContext, all_reduce_sum, init_distributed, shutdown_distributed
from train.dry_run import dry_run
from train.knn import extract_features, knn_accuracy
from train.log_window import LogWindow
from train.preemption import PREEMPTED_EXIT, Preempted, Preemption
from train.resume import config_history, resumed_config
from train.run_files import finished_summary, read_metrics
from train.run_lock import RunDirError, RunLock
from train.run_logger import RunLogger
from train.start import resolve_resume, resume_after_restart
from train.step import NonFiniteLossError, StepRecords
from train.trainer import Trainer, TrainState, build_trainer, seed_everything
from train.wiring import configure_backends

TOO_MANY_SKIPPED_EXIT = 3


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
                   help="build the data, model and step, train one step and time a second, print what a run "
                        "would do and how long it would train, and exit without writing anything")
    return p


def train_one_epoch(tr: Trainer, state: TrainState, progress: Progress, preemption: Preemption | None = None) -> None:
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
    records = StepRecords(cfg.loss.on_nonfinite == "skip", cfg.loss.max_skipped_in_a_row, state.skipped_in_a_row)
    lead = tr.kit.host_lead()
    loader = tr.loaders.train
    loader.set_epoch(state.epoch, state.step)
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
        progress.update(state.global_step)
        log_now = state.global_step % cfg.run.log_every_steps == 0 or state.step == tr.steps_per_epoch
        save_now = state.global_step % cfg.run.checkpoint_every_steps == 0 and state.step < tr.steps_per_epoch
        stop = preemption.agreed(collective_point=log_now) if preemption is not None else False
        if log_now or save_now or stop or train_step.syncs_every_step:  # a checkpoint records checked counts
            out = records.check()  # waits for the device; raises NonFiniteLossError (see loss.on_nonfinite)
            state.skipped_steps += int(out.pop("skipped"))
            state.skipped_in_a_row = records.in_a_row
            window.add(out)
        if log_now:
            means = window.means()
            progress.show({"loss": f"{means['loss']:.4f}", "lr": f"{lr:.3g}", "img/s": f"{means['images_per_s']:.1f}",
                           "data wait": f"{100 * means['data_wait_frac']:.0f}%"}, log_step=True)
            window = LogWindow()
        if log_now or save_now or stop:  # the same steps on every rank (ranks stop at log steps): collectives are safe
            state.bad_images += all_reduce_sum(bad_here, ctx.device)
            bad_here = 0
        if log_now and tr.logger is not None:
            tr.logger.log({"global_step": state.global_step, "epoch": state.epoch, "step": state.step, "lr": lr,
                           "skipped": state.skipped_steps, "bad_images": state.bad_images, **means})
        if save_now or stop:
            tr.save(state)
        if stop:
            loader.close()
            raise Preempted(f"stopped by {preemption.received or 'a signal on another rank'} at epoch {state.epoch} "
                            f"step {state.step} (global step {state.global_step}); checkpoint written in "
                            f"{cfg.run.output_dir}: continue with --resume auto")
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


def run(cfg: PretrainConfig, ctx: DistContext, resume: str = "none", allow_schedule_change: bool = False) -> dict:
    if resume == "none":
        cfg.validate(ctx.world_size)  # a resumed run is validated once its checkpoint has set the per-rank sizes
    run_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        RunLock.check(run_dir)  # a directory in use is refused before its checkpoints are read
    loaded = resolve_resume(resume, run_dir)
    cfg = resumed_config(loaded[0], cfg, ctx.world_size, allow_schedule_change) if loaded is not None else cfg
    cfg.validate(ctx.world_size)
    state = TrainState(**loaded[0]["train_state"]) if loaded else TrainState()
    if loaded and state.epoch >= cfg.optim.epochs:
        finished = finished_summary(run_dir, state.global_step, ctx.is_main)
        if finished is not None:  # nothing to train, nothing to write
            if ctx.is_main:
                print(f"note: the run in {run_dir} is finished ({state.epoch} epochs, {state.global_step} steps; "
                      "summary.json): nothing to train, nothing written")
            return finished
    rows = read_metrics(run_dir / "metrics.csv") if ctx.is_main else []  # refused before anything is written
    lock = RunLock(run_dir) if ctx.is_main else None  # one run per directory; dies with the process
    try:
        if ctx.is_main:
            stale = ckpt.remove_stale_temp_files(run_dir)  # no write of ours is in progress: we hold the lock
            if stale:
                print(f"note: removed {len(stale)} temp file(s) of writes a killed run left ({', '.join(stale[:3])})")
        return _run(cfg, ctx, loaded, state, rows)
    finally:
        if lock is not None:
            lock.release()


def start_trainer(cfg: PretrainConfig, ctx: DistContext, loaded: tuple[dict, Path] | None, state: TrainState,
                  rows: list[dict[str, str]]) -> Trainer:
    """The trainer built, its files attached (main rank: ``rows`` are metrics.csv's, read at
    start) and the checkpoint loaded, with the banner printed."""
    run_dir = Path(cfg.run.output_dir)
    seed_everything(cfg.run.seed)
    configure_backends(cfg, ctx.device)
    if ctx.is_main:
        print(f"building the {cfg.data.backend} data pipeline, the kNN sets and the model ...", flush=True)
    tr = build_trainer(cfg, ctx)
    tr.history = config_history(loaded[0] if loaded else None, cfg, state.global_step)
    if state.step > tr.steps_per_epoch:  # before the logger trims metrics.csv to the checkpoint
        tr.loaders.train.close()
        raise ConfigError(f"cannot resume: the checkpoint stopped at step {state.step} of epoch {state.epoch}, but an "
                          f"epoch now has {tr.steps_per_epoch} steps (the dataset, or run.max_steps_per_epoch, "
                          "changed since); resume with the data and settings the run started with")
    if ctx.is_main:
        shape = RunShape.of(cfg, ctx.world_size, tr.steps_per_epoch, tr.loaders.num_classes)
        tr.logger = RunLogger(run_dir, cfg, state.global_step if loaded else None, shape=shape, rows=rows)
    resumed = None
    if loaded:
        saved, path = loaded
        tr.load(saved)
        resumed = f"resumed from {path.name} at epoch {state.epoch} step {state.step}, global step {state.global_step}"
    if ctx.is_main:
        print(banner(cfg, ctx.world_size, ctx.device, tr.kit.precision.name, tr.loaders, tr.steps_per_epoch,
                     resumed), flush=True)
        if tr.loaders.knn_off:
            print(f"note: kNN monitor off (run.knn_every_epochs={cfg.run.knn_every_epochs}): {tr.loaders.knn_off}")
        tr.logger.log({"global_step": state.global_step, "epoch": state.epoch, "step": state.step}
                      | ({"resumed": 1} if loaded else {"lr": tr.schedule.lr(0)}))
    return tr


def _run(cfg: PretrainConfig, ctx: DistContext, loaded: tuple[dict, Path] | None, state: TrainState,
         rows: list[dict[str, str]]) -> dict:
    tr = start_trainer(cfg, ctx, loaded, state, rows)
    run_dir = Path(cfg.run.output_dir)
    progress = Progress(cfg.optim.epochs, tr.steps_per_epoch, state.global_step, ctx.is_main and cfg.run.progress_bar)
    try:
        with Preemption(cfg.run.preempt_signals, ctx.distributed, ctx.device, cfg.run.preempt_grace_s,
                        cfg.run.output_dir) as preemption:
            if loaded and state.step == 0 and state.epoch > 0 and knn_due(cfg, state.epoch - 1) and ctx.is_main:
                # the checkpoint is an epoch's end: its kNN point is in metrics.csv unless the run stopped
                # (preempted, killed) between that checkpoint and the evaluation; then it is evaluated now
                if tr.logger.knn_at(state.global_step) is None:
                    log_knn(tr, state, state.epoch - 1, progress, "evaluated on resume: the run stopped before it")
            if state.epoch < cfg.optim.epochs and ctx.is_main:
                print(f"waiting for the first batch: {FIRST_BATCH_WORK.get(cfg.data.backend, 'the stream starts')}",
                      flush=True)
            while state.epoch < cfg.optim.epochs:
                train_one_epoch(tr, state, progress, preemption)
                epoch = state.epoch
                state.epoch, state.step = state.epoch + 1, 0
                tr.save(state)  # before evaluating: an evaluation failure never costs the epoch
                if preemption.agreed(collective_point=True):
                    raise Preempted(f"stopped by {preemption.received or 'a signal on another rank'} at the end of "
                                    f"epoch {epoch}; checkpoint written in {run_dir}: continue with --resume auto")
                if knn_due(cfg, epoch) and ctx.is_main:
                    log_knn(tr, state, epoch, progress)
    except NonFiniteLossError as exc:
        raise type(exc)(f"{exc}. Last good checkpoint kept in {run_dir}; {exc.remedy}") from exc
    except Preempted:
        if tr.logger is not None:
            tr.logger.close()
        raise
    finally:
        progress.close()
    return finish(tr, state)


def knn_due(cfg: PretrainConfig, epoch: int) -> bool:
    """Whether the kNN monitor evaluates after ``epoch`` (0-based)."""
    return bool(cfg.run.knn_every_epochs) and (epoch + 1) % cfg.run.knn_every_epochs == 0


def log_knn(tr: Trainer, state: TrainState, epoch: int, progress: Progress, note: str = "") -> None:
    """Evaluate the kNN monitor after ``epoch``, log it at the current global step, redraw the curves."""
    knn = evaluate_knn(tr)
    if knn is not None:
        tr.logger.log({"global_step": state.global_step, "epoch": epoch, **knn})
        tr.logger.write_curves()
        progress.note(f"epoch {epoch + 1}/{tr.cfg.optim.epochs}: kNN top-1 {knn['knn_top1']:.2f}%  "
                      f"top-5 {knn['knn_top5']:.2f}%" + (f" ({note})" if note else ""))


def finish(tr: Trainer, state: TrainState) -> dict:
    """The end of a run: the encoder, the curves and summary.json (main rank); the summary."""
    cfg = tr.cfg
    share = state.skipped_steps / max(state.global_step, 1)
    summary = {"run_dir": str(Path(cfg.run.output_dir).resolve()), "epochs": state.epoch,
               "global_step": state.global_step, "skipped_steps": state.skipped_steps,
               "skipped_share": round(share, 6), "skipped_over_limit": share > cfg.loss.max_skipped_share,
               "bad_images": state.bad_images}
    if tr.ctx.is_main:
        summary |= tr.logger.last_knn()
        summary["encoder"] = str(tr.export_encoder(state.global_step).resolve())
        tr.logger.write_curves()
        tr.logger.write_summary(summary)
        tr.logger.close()
    return summary


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
    resume = resume_after_restart(args.resume, Path(cfg.run.output_dir), ctx.is_main)
    try:
        if args.dry_run:
            said = dry_run(cfg, ctx, resume)
            if ctx.is_main:
                print(said)
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
              f"encoder {summary.get('encoder')}")
        if "knn_top1" in summary:
            print(f"final kNN top-1 {summary['knn_top1']:.2f}%")
    if summary.get("skipped_over_limit"):
        if ctx.is_main:
            print(f"error: {summary['skipped_steps']} of {summary['global_step']} steps "
                  f"({summary['skipped_share']:.1%}) were non-finite and skipped (loss.on_nonfinite=skip), more than "
                  f"loss.max_skipped_share={cfg.loss.max_skipped_share:g}: the encoder is written but suspect "
                  "(summary.json says so too)",
                  file=sys.stderr)
        return TOO_MANY_SKIPPED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
