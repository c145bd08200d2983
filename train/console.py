"""What the training program prints: a start-up banner, and progress that suits where it goes.

On a terminal, progress is a tqdm bar redrawn in place. Anywhere else (a SLURM log, a pipe,
``nohup``) redraws become a wall of carriage returns, so progress is one plain line per log
step instead (``run.log_every_steps``), plus one at the end of each epoch.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from pipelines.augment.recipe import describe_views
from train.config import effective_suncet_weight


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
    return "\n".join(lines)


class Progress:
    """tqdm on a terminal, plain lines elsewhere (``lines=True``); nothing when disabled."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.lines = enabled and not self.stream.isatty()
        self.desc, self.total, self.count = desc, total, initial
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled or self.lines,
                         dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.count += n
        self._bar.update(n)

    def show(self, values: dict[str, str], log_step: bool) -> None:
        """The latest figures: the bar's postfix, or (at a log step) one plain line."""
        if self._bar.disable and not (self.lines and log_step):
            return
        if self.lines:
            fields = "  ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc} step {self.count}/{self.total}  {fields}", file=self.stream, flush=True)
        else:
            self._bar.set_postfix(values)

    def close(self) -> None:
        self._bar.close()
