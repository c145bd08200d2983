"""Rank-0 run outputs: resolved config, metrics.csv, TensorBoard events, and optionally Weights & Biases.

``run.logger: wandb`` also sends every metrics row to W&B (the ``wandb`` package must be
installed; it is not a dependency). The W&B run id is kept in ``<run dir>/wandb_run_id`` so that
a resumed run continues the same W&B run; ``WANDB_PROJECT`` names the project
(default ``suncet-pretrain``), and ``WANDB_MODE=offline`` works without a network.
"""
from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import yaml

from train.config import ConfigError, config_to_dict

METRIC_FIELDS = ("global_step", "epoch", "step", "lr", "loss", "loss_ntxent", "loss_suncet", "images_per_s",
                 "data_wait_frac", "skipped", "bad_images", "knn_top1", "knn_top5")


class RunLogger:
    def __init__(self, run_dir: Path, cfg, resume_step: int | None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        self.csv_path = self.run_dir / "metrics.csv"
        self._truncate_after(resume_step)
        new_file = not self.csv_path.exists()
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new_file:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is a dependency, but keep a bare torch env usable
                print(f"warning: TensorBoard logging off ({exc})")
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
        self._wandb = _start_wandb(self.run_dir, cfg) if cfg.run.logger == "wandb" else None

    def _truncate_after(self, resume_step: int | None) -> None:
        """On resume from global step S, keep rows of steps <= S (done before the
        checkpoint); later rows are trained again and rewritten."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if resume_step is None:
            resume_step = -1
            rows = []
        kept = [r for r in rows if r.get("global_step") not in (None, "") and int(r["global_step"]) <= resume_step]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def log(self, row: dict) -> None:
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("global_step", "epoch", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("knn") else f"eval/{key}",
                                        value, row["global_step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "global_step" and isinstance(v, (int, float))},
                            step=row["global_step"])

    def write_summary(self, summary: dict) -> None:
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)

    def close(self) -> None:
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, cfg):
    """A W&B run for ``run_dir``, the same one again when the run is resumed."""
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError("run.logger=wandb needs the wandb package (pip install wandb), "
                          "or set run.logger=none") from exc
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "suncet-pretrain"), name=run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config_to_dict(cfg))
