"""Rank-0 run outputs: resolved config, metrics.csv, TensorBoard events, ``curves.png``
(``train.curves``), ``summary.json``, and optionally Weights & Biases.

metrics.csv holds one row per log step, one per kNN evaluation, one at step 0 (the learning rate
the warm-up starts from) and one where the run was resumed (``resumed`` 1). A resumed run keeps
the rows up to its checkpoint's step and says how many later rows it drops (those steps are
trained again); rows that cannot be read are refused (``train.run_files``). A figure that cannot
be drawn is a warning: the run goes on.

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
import sys
import uuid
from pathlib import Path

import yaml

from train.checkpoint import CheckpointError, write_text_atomic
from train.config import ConfigError, config_to_dict
from train.curves import RunShape, curve_data, draw
from train.run_files import METRIC_FIELDS, knn_of, link_refused, read_metrics

NOT_SCALARS = ("global_step", "epoch", "step", "resumed")  # row keys that are not curves in TensorBoard / W&B


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
    over the name (``checkpoint.write_text_atomic``), metrics.csv appended with ``O_NOFOLLOW``.
    ``rows``: metrics.csv as the run read it at start (``run_files.read_metrics``), read here
    when not given; ``shape``: what curves.png needs beyond the rows (none: no curves)."""

    def __init__(self, run_dir: Path, cfg, resume_step: int | None, tensorboard: bool = True,
                 shape: RunShape | None = None, rows: list[dict[str, str]] | None = None):
        self.run_dir, self.cfg, self.shape = Path(run_dir), cfg, shape
        self.csv_path = self.run_dir / "metrics.csv"
        rows = read_metrics(self.csv_path) if rows is None else rows  # refused before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                          "config")
        self._rows = self._keep_up_to(rows, resume_step)  # metrics.csv's rows, kept as written
        self._csv_file = open_appending(self.csv_path)
        self._csv = csv.DictWriter(self._csv_file, fieldnames=METRIC_FIELDS, extrasaction="ignore")
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

    def _keep_up_to(self, rows: list[dict[str, str]], resume_step: int | None) -> list[dict[str, str]]:
        """metrics.csv rewritten with the rows of steps <= ``resume_step`` (done before the
        checkpoint; none for a fresh run), in the current columns; says what it drops. Returns the
        rows kept."""
        kept = [] if resume_step is None else [r for r in rows if int(r["global_step"]) <= resume_step]
        if len(kept) < len(rows):
            after = "" if resume_step is None else f" after global step {resume_step}, the checkpoint's,"
            print(f"note: {self.csv_path}: {len(rows) - len(kept)} row(s){after} dropped; those steps are "
                  "trained again")
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(self.csv_path, text.getvalue(), "metrics")
        return kept

    def log(self, row: dict) -> None:
        written = {k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
                   for k, v in row.items() if k in METRIC_FIELDS}
        try:
            self._csv.writerow(written)
            self._csv_file.flush()
        except OSError as exc:  # a full or read-only disk: one line, the checkpoints so far are kept
            raise CheckpointError(f"could not append to {self.csv_path}: {exc.strerror or exc}") from exc
        self._rows.append({key: written.get(key, "") for key in METRIC_FIELDS})  # as read_metrics reads it
        scalars = {k: v for k, v in row.items() if k not in NOT_SCALARS and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}" if not key.startswith("knn") else f"eval/{key}",
                                    value, row["global_step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=row["global_step"])

    def knn_at(self, global_step: int) -> dict[str, float] | None:
        """The kNN figures metrics.csv holds for ``global_step``, if any."""
        found = [knn_of(r) for r in self._rows if int(r["global_step"]) == global_step and r["knn_top1"]]
        return found[-1] if found else None

    def last_knn(self) -> dict[str, float]:
        """The newest kNN figures of the run (empty before any evaluation)."""
        found = [knn_of(r) for r in self._rows if r["knn_top1"]]
        return found[-1] if found else {}

    def write_curves(self) -> Path | None:
        """``curves.png`` from metrics.csv; a warning, not an error, when it cannot be drawn."""
        if self.shape is None:
            return None
        path = self.run_dir / "curves.png"
        try:
            draw(curve_data(self._rows, self.shape), self.shape, path)
        except Exception as exc:  # noqa: BLE001 -- matplotlib raises anything; a figure never ends a run
            print(f"warning: {path} not drawn ({type(exc).__name__}: {exc}); training goes on", file=sys.stderr)
            return None
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
