"""Rank-0 run outputs: resolved config, metrics.csv, TensorBoard events, ``curves.png``, and optionally
Weights & Biases.

``curves.png`` shows the loss, the learning rate and kNN top-1 against global steps and against
images through the network (every view and support image counted); it is rewritten after every
kNN evaluation and at the end of the run, from metrics.csv.

``run.logger: wandb`` also sends every metrics row to W&B (the ``wandb`` package must be
installed; it is not a dependency). The W&B run id is kept in ``<run dir>/wandb_run_id`` so that
a resumed run continues the same W&B run; ``WANDB_PROJECT`` names the project
(default ``suncet-pretrain``), and ``WANDB_MODE=offline`` works without a network.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import uuid
from pathlib import Path

import yaml

from train.checkpoint import CheckpointError, write_atomic, write_text_atomic
from train.config import ConfigError, config_to_dict
from train.run_lock import RunDirError

METRIC_FIELDS = ("global_step", "epoch", "step", "lr", "loss", "loss_ntxent", "loss_suncet", "loss_swav", "loss_paws",
                 "loss_memax", "images_per_s", "data_wait_frac", "skipped", "bad_images", "knn_top1", "knn_top5")


def link_refused(path: Path) -> RunDirError:
    return RunDirError(f"{path} is a symbolic link; remove it (the run never writes through links)")


def open_appending(path: Path):
    """``path`` opened to append text, never through a symbolic link (refused, naming it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_refused(path) from None
        raise
    return os.fdopen(fd, "a", newline="")


class RunLogger:
    """Every file is written without following links: whole files through a temp file renamed
    over the name (``checkpoint.write_text_atomic``), metrics.csv appended with ``O_NOFOLLOW``."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None, tensorboard: bool = True):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                          "config")
        self.csv_path = self.run_dir / "metrics.csv"
        self._truncate_after(resume_step)
        new_file = not os.path.lexists(self.csv_path)
        self._csv_file = open_appending(self.csv_path)
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
                # a resumed run rewrites the steps after its checkpoint's; the checkpoint's own step stays
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
        self._wandb = _start_wandb(self.run_dir, cfg) if cfg.run.logger == "wandb" else None

    def _truncate_after(self, resume_step: int | None) -> None:
        """On resume from global step S, keep rows of steps <= S (done before the
        checkpoint); later rows are trained again and rewritten."""
        if not os.path.lexists(self.csv_path):
            return
        if self.csv_path.is_symlink():
            raise link_refused(self.csv_path)
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if resume_step is None:
            resume_step = -1
            rows = []
        kept = [r for r in rows if r.get("global_step") not in (None, "") and int(r["global_step"]) <= resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(self.csv_path, text.getvalue(), "metrics")

    def log(self, row: dict) -> None:
        try:
            self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self._csv_file.flush()
        except OSError as exc:  # a full or read-only disk: one line, the checkpoints so far are kept
            raise CheckpointError(f"could not append to {self.csv_path}: {exc.strerror or exc}") from exc
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("global_step", "epoch", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("knn") else f"eval/{key}",
                                        value, row["global_step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "global_step" and isinstance(v, (int, float))},
                            step=row["global_step"])

    def knn_at(self, global_step: int) -> dict[str, float] | None:
        """The kNN figures metrics.csv holds for ``global_step``, if any."""
        self._csv_file.flush()
        with open(self.csv_path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("global_step") == str(global_step) and row.get("knn_top1"):
                    return {key: float(row[key]) for key in ("knn_top1", "knn_top5") if row.get(key)}
        return None

    def write_curves(self) -> Path:
        """``curves.png`` from metrics.csv (see the module docstring)."""
        self._csv_file.flush()
        path = self.run_dir / "curves.png"
        plot_curves(self.csv_path, self.cfg, path)
        return path

    def write_summary(self, summary: dict) -> None:
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n", "summary")

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
    run_id = id_file.read_text().strip() if id_file.is_file() and not id_file.is_symlink() else uuid.uuid4().hex[:12]
    write_text_atomic(id_file, run_id + "\n", "W&B run id")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "suncet-pretrain"), name=run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config_to_dict(cfg))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["global_step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(metrics_csv: Path, cfg, out: Path) -> None:
    """Loss, learning rate and kNN top-1 against global steps (top row) and images through the
    network (bottom row, ``cfg.network_images_per_step`` of each row's epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["global_step"]))
    images, total, last = {}, 0, 0
    for r in rows:  # cumulative images at each logged step, each epoch at its own per-step cost
        step = int(r["global_step"])
        total += (step - last) * cfg.network_images_per_step(int(r["epoch"]))
        images[step], last = total, step
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for col, (key, label) in enumerate((("loss", "loss"), ("lr", "learning rate"), ("knn_top1", "kNN top-1 (%)"))):
        steps, values = _series(rows, key)
        for row, xs, xlabel in ((0, steps, "global step"), (1, [images[s] for s in steps], "images through the network")):
            ax = axes[row][col]
            ax.plot(xs, values, "o-" if key == "knn_top1" else "-", ms=3, lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{out.parent.name}: {cfg.loss.method}, {cfg.model.arch}", fontsize=10)
    fig.tight_layout()
    write_atomic(out, lambda f: fig.savefig(f, dpi=100, format="png"), "curves")
    plt.close(fig)
