"""What the training program prints: a start-up banner, notes before slow one-time work, and
progress that suits where it goes.

Progress covers the whole run: every line, the terminal bar's and the plain one, says the epoch
(of all), the step in the epoch and in the run, the time since this process began training (its
build done, the first batch's wait included) and the ETA of the run's remaining steps, at the rate since this process's first step
(kNN evaluations and checkpoints included; the first step, which carries one-time work, is not).
On a terminal it is a tqdm bar redrawn in place. Anywhere else (a SLURM log, a pipe, ``nohup``)
redraws become a wall of carriage returns, so it is one plain line per log step instead
(``run.log_every_steps``), plus one at the end of each epoch.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

from pipelines.augment.recipe import describe_views
from train.config import effective_suncet_weight

# what each backend does once, before its first batch, and can take minutes at it
FIRST_BATCH_WORK = {
    "torch": "the DataLoader workers start",
    "dali": "DALI's pipeline starts its threads and fills its prefetch queue",
    "ffcv": "FFCV compiles its pipeline with numba (a minute or more, once per process)",
}


def banner(cfg, world_size: int, device, precision_name: str, loaders, steps_per_epoch: int,
           resumed: str | None) -> str:
    """The run at a glance: where it computes, what it reads, how big a step is, and where it writes."""
    d, threads = cfg.data, None
    if device.type == "cpu":
        import torch
        threads = torch.get_num_threads()
    where = f"{device}" + (f" ({threads} threads)" if threads else "")
    # ranks share the step's classes (each drawing other images of them), or with unique_classes draw their own
    classes, per_class = ((d.support_classes * world_size, d.support_images_per_class) if d.unique_classes
                          else (d.support_classes, d.support_images_per_class * world_size))
    loss = cfg.loss
    step = f"{d.unlabeled_batch_size * world_size} images x {describe_views(cfg.augment.view_groups())}"
    if cfg.uses_support:
        step += f" + {classes} classes x {per_class} images x {d.support_views} view(s) support"
    if loss.suncet_weight > 0 and loss.method != "paws":
        step += (f", {loss.method} + SuNCEt weight {effective_suncet_weight(cfg):.3g} ({loss.suncet_weight:g}, "
                 f"{loss.suncet_weight_rule})")
    else:
        step += " (SimCLR alone)" if loss.method == "simclr" else f", {loss.method}"
    lines = [
        f"device {where}, precision {precision_name}, world size {world_size}",
        f"data: {d.backend} backend reading {loaders.source}: {loaders.num_images} images in "
        f"{loaders.num_classes} classes, {loaders.num_labeled} labeled",
        f"step: {step} (global); {steps_per_epoch} steps per epoch, {cfg.optim.epochs} epochs",
        f"run directory {cfg.run.output_dir}" + (f" ({resumed})" if resumed else ""),
    ]
    if loss.method == "paws" and loss.paws.me_max:
        lines.insert(3, "loss: paws + me-max, minus the entropy of the mean prediction (down to -log of the support "
                        "classes), so the total logged can be negative; metrics.csv keeps loss_paws and loss_memax")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``H:MM:SS`` (hours beyond 24 stay hours)."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The run's progress (see the module docstring); prints nothing when not ``enabled``.
    ``clock`` is ``time.monotonic`` but in tests."""

    def __init__(self, epochs: int, steps_per_epoch: int, global_step: int, enabled: bool,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.lines = enabled and not self.stream.isatty()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.total, self.global_step = epochs * steps_per_epoch, global_step
        self.clock, self.started = clock, clock()
        self._rate_from: tuple[float, int] | None = None  # (time, global step) when the first step ended
        self._values = ""
        self._bar = tqdm(total=self.total, initial=global_step, disable=not enabled or self.lines,
                         dynamic_ncols=True, file=self.stream, bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")

    def position(self) -> str:
        """``epoch 2/6 step 14/28 (run 42/168)``: the step just trained (1-based), in its epoch and the run."""
        epoch = max(self.global_step - 1, 0) // self.steps_per_epoch
        step = self.global_step - epoch * self.steps_per_epoch
        run = f"(run {self.global_step}/{self.total})"
        return f"epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch} {run}"

    def timing(self) -> str:
        """``elapsed 0:01:02  ETA 0:10:00`` (ETA ``?`` until a step after the first has ended)."""
        now, eta = self.clock(), "?"
        if self._rate_from is not None and self.global_step > self._rate_from[1] and now > self._rate_from[0]:
            rate = (self.global_step - self._rate_from[1]) / (now - self._rate_from[0])
            eta = duration((self.total - self.global_step) / rate)
        return f"elapsed {duration(now - self.started)}  ETA {eta}"

    def line(self, values: dict[str, str]) -> str:
        return "  ".join([self.position(), self.timing(), *(f"{k} {v}" for k, v in values.items())])

    def update(self, global_step: int) -> None:
        """After each step: ``global_step`` steps are done."""
        if self._rate_from is None:
            self._rate_from = (self.clock(), global_step)
        done, self.global_step = global_step - self.global_step, global_step
        if not self._bar.disable:
            self._bar.set_description_str(self.position(), refresh=False)
            self._bar.set_postfix_str(f"{self.timing()}  {self._values}".rstrip(), refresh=False)
            self._bar.update(done)

    def show(self, values: dict[str, str], log_step: bool) -> None:
        """The latest figures: kept for the bar, or (at a log step) one plain line."""
        if self.lines and log_step:
            print(self.line(values), file=self.stream, flush=True)
        self._values = "  ".join(f"{k} {v}" for k, v in values.items())

    def note(self, text: str) -> None:
        """A line of its own (a kNN result), above the bar on a terminal."""
        if self._bar.disable:
            print(text, file=self.stream, flush=True)
        else:
            self._bar.write(text, file=self.stream)

    def close(self) -> None:
        self._bar.close()
