"""``--dry-run``: everything a run builds, one step trained and a second timed, nothing written."""
from __future__ import annotations

import time
from pathlib import Path

from train.config import PretrainConfig
from train.console import banner, duration
from train.distributed import DistContext
from train.run_lock import RunLock
from train.start import resolve_resume
from train.step import StepRecords
from train.trainer import build_trainer, seed_everything
from train.wiring import configure_backends


def dry_run(cfg: PretrainConfig, ctx: DistContext, resume: str = "none") -> str:
    """Build everything a run builds, train one step and time a second, writing nothing: a config
    that passes here will not fail at start (run directory, data, model, step), whatever it does
    later. Returns what it found, in one line."""
    cfg.validate(ctx.world_size)
    done = 0
    if ctx.is_main:  # what the run itself would refuse at start
        RunLock.check(cfg.run.output_dir)
        loaded = resolve_resume(resume, Path(cfg.run.output_dir))
        done = loaded[0]["train_state"]["global_step"] if loaded else 0
    seed_everything(cfg.run.seed)
    configure_backends(cfg, ctx.device)
    tr = build_trainer(cfg, ctx)
    if ctx.is_main:
        print(banner(cfg, ctx.world_size, ctx.device, tr.kit.precision.name, tr.loaders, tr.steps_per_epoch, None))
    loader, step = tr.loaders.train, tr.kit.step_for_epoch(0)
    loader.set_epoch(0)
    batches = iter(loader)
    tr.model.train()
    seconds, losses = [], []
    for i in range(min(2, tr.steps_per_epoch)):
        start = time.perf_counter()
        tr.schedule.apply(tr.optimizer, i)
        losses.append(StepRecords(skip_nonfinite=False).add(step(next(batches), i)).check()["loss"])
        seconds.append(time.perf_counter() - start)
    loader.close()
    left = tr.schedule.total_steps - done
    first = f"one step trained, loss {losses[0]:.4f} ({duration(seconds[0])} with the one-time work)"
    if len(seconds) < 2:
        return f"dry run: {first}; nothing written"
    return (f"dry run: {first}; one more, timed: {seconds[1]:.3g} s a step, so the run's {left} steps "
            f"{'left ' if done else ''}({cfg.optim.epochs} epochs x {tr.steps_per_epoch}) take about "
            f"{duration(left * seconds[1])}, kNN evaluations and checkpoints aside; nothing written")
