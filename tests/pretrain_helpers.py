"""Tiny configs and datasets for training-loop tests."""
from __future__ import annotations

import csv
from pathlib import Path

from tests.helpers.imagefolder import make_image_folder
from train.config import load_config


def make_split_tree(root: Path, classes: int = 4, train_per_class: int = 10, val_per_class: int = 4,
                    size: int = 24, seed: int = 0) -> Path:
    make_image_folder(root / "train", classes, train_per_class, size, seed=seed)
    make_image_folder(root / "val", classes, val_per_class, size, seed=seed + 1)
    return root


def tiny_overrides(data_root: Path, out_dir: Path, **extra) -> list[str]:
    values = {
        "data.root": str(data_root),
        "data.unlabeled_batch_size": 8,
        "data.support_classes": 4,
        "data.support_images_per_class": 2,
        "data.labeled_fraction": 0.5,
        "data.num_workers": 0,
        "augment.resolution": 16,
        "model.arch": "resnet18-small",
        "model.head_hidden_dim": 32,
        "model.head_out_dim": 16,
        "model.sync_bn": False,
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "optim.start_lr": 0.1,
        "optim.lr": 0.4,
        "optim.final_lr": 0.01,
        "run.output_dir": str(out_dir),
        "run.precision": "fp32",
        "run.log_every_steps": 1,
        "run.checkpoint_every_steps": 2,
        "run.progress_bar": False,
        "run.knn_k": 5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_root: Path, out_dir: Path, **extra):
    return load_config(None, tiny_overrides(data_root, out_dir, **extra))


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["global_step"]): float(r["loss"]) for r in read_metrics(run_dir) if r["loss"] not in ("", None)}
