"""Learning-rate schedule as a pure function of the global step: linear
warm-up, then cosine decay. Resuming needs nothing but the step count."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _warmup_steps(
    steps_per_epoch: int, epochs: int, warmup_epochs: float, start_lr: float, lr: float, final_lr: float
) -> int:
    """Validate the settings and return the number of warm-up steps."""
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    _check_int("epochs", epochs, 1)
    for name, value in (("warmup_epochs", warmup_epochs), ("start_lr", start_lr), ("lr", lr), ("final_lr", final_lr)):
        _check_number(name, value)
    warmup = round(warmup_epochs * steps_per_epoch)
    if warmup >= epochs * steps_per_epoch:
        raise ValueError(
            f"warmup_epochs={warmup_epochs} gives {warmup} warm-up steps, but there are only "
            f"{epochs * steps_per_epoch} steps; the cosine phase needs at least one"
        )
    return warmup


def lr_at(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    start_lr: float,
    lr: float,
    final_lr: float,
) -> float:
    """Learning rate at global ``step`` (0-based).

    With ``W = round(warmup_epochs * steps_per_epoch)`` warm-up steps and
    ``T = epochs * steps_per_epoch`` steps in all (``W < T`` required):

    * ``step < W``: ``start_lr + (lr - start_lr) * step / W`` (step 0 gives ``start_lr``);
    * ``W <= step <= T-1``: ``final_lr + (lr - final_lr) * (1 + cos(pi * t)) / 2`` with
      ``t = (step - W) / (T - 1 - W)`` (``t = 1`` when ``T - 1 == W``), so step ``W``
      gives ``lr`` and the last step ``T-1`` gives exactly ``final_lr``;
    * ``step > T-1``: ``final_lr``.
    """
    warmup = _warmup_steps(steps_per_epoch, epochs, warmup_epochs, start_lr, lr, final_lr)
    _check_int("step", step, 0)
    last = epochs * steps_per_epoch - 1
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    if step >= last:
        return float(final_lr)
    t = (step - warmup) / (last - warmup)
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """The settings of ``lr_at``, checked once; ``lr(step)`` evaluates it and
    ``apply(optimizer, step)`` writes it into every parameter group. The peak
    is called ``peak_lr`` here (``lr`` in ``lr_at``) because ``lr`` is the method."""

    steps_per_epoch: int
    epochs: int
    warmup_epochs: float
    start_lr: float
    peak_lr: float  # reached at the end of warm-up
    final_lr: float

    def __post_init__(self) -> None:
        _warmup_steps(self.steps_per_epoch, self.epochs, self.warmup_epochs, self.start_lr, self.peak_lr, self.final_lr)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            start_lr=self.start_lr,
            lr=self.peak_lr,
            final_lr=self.final_lr,
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set ``group['lr']`` of every group of ``optimizer`` for ``step``; return it."""
        value = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = value
        return value
