"""How ``train.evaluate`` evaluates (``EvalSettings``), checked before any work is done."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath

from train.config import ConfigError

METHODS = ("knn", "snn", "linear", "finetune")
# Fine-tuning protocols of the official code: (epochs, learning rate per 256 images).
FINETUNE_PROTOCOLS = {"suncet": (30, 0.05), "paws": (50, 0.02)}
SNN_TEMPERATURE = 0.1


def check_split_name(name: str, flag: str) -> None:
    """Refuse a split name that would reach outside the data root (``../other/val``, ``/val``)."""
    parts = PurePath(name).parts
    if not name or PurePath(name).is_absolute() or ".." in parts:
        raise ConfigError(f"{flag} {name!r} must name a folder inside --data (no '..', not an absolute path)")


@dataclass
class EvalSettings:
    """How to evaluate; ``None`` fields fall back to the checkpoint's config."""

    method: str = "knn"
    train_split: str | None = None
    val_split: str | None = None
    labeled_list: str | None = None
    labeled_fraction: float | None = None
    val_max_samples: int | None = None  # random cap of the held-out set (seeded)
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_l2: float = 1e-4  # L2 penalty of the logistic regression (on the mean loss)
    linear_max_iter: int = 300
    finetune_epochs: int = 30  # FINETUNE_PROTOCOLS["suncet"]
    finetune_lr: float = 0.05  # per 256 images
    finetune_out: str | None = None  # where the fine-tuned model is saved (None: not saved)
    # epochs between held-out scores while fine-tuning (0: after the last only, as tools.reproduce wants:
    # 10,000 test images per epoch would outweigh 200 labeled ones; the CLI's default is 1)
    finetune_val_every: int = 0
    snn_temperature: float = SNN_TEMPERATURE
    finetune_batch_size: int = 64
    batch_size: int = 256  # feature extraction / scoring
    num_workers: int = 2
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.knn_k < 1 or self.finetune_epochs < 1 or self.batch_size < 1 or self.finetune_batch_size < 1:
            raise ConfigError("knn k, fine-tune epochs and batch sizes must be >= 1")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ConfigError(f"labeled fraction must be in (0, 1], got {self.labeled_fraction}")
        positive = {"--snn-temperature": self.snn_temperature, "--knn-temperature": self.knn_temperature,
                    "--lr": self.finetune_lr}
        for flag, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be finite and > 0, got {value}")
        if not (math.isfinite(self.linear_l2) and self.linear_l2 >= 0):
            raise ConfigError(f"--linear-l2 must be finite and >= 0, got {self.linear_l2}")
        if self.val_max_samples is not None and self.val_max_samples < 1:
            raise ConfigError(f"--val-max-samples must be >= 1 (or left out for the whole split), "
                              f"got {self.val_max_samples}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.finetune_val_every < 0:
            raise ConfigError(f"--finetune-val-every must be >= 0 (0: only after the last epoch), "
                              f"got {self.finetune_val_every}")
        for flag, split in (("--train-split", self.train_split), ("--val-split", self.val_split)):
            if split is not None:
                check_split_name(split, flag)
