"""Small-scale reproduction of the paper's claim: ``python -m tools.reproduce``.

Pre-trains SimCLR (``loss.suncet_weight=0``) and SimCLR+SuNCEt with the same
config, data, seeds and schedule, reads the epoch-end kNN rows each run
writes to ``metrics.csv`` (both arms evaluated by the same monitor), and
writes to ``--out``:

- ``curves.csv``: ``seed, arm, epoch, knn_top1, knn_top5`` (epoch counts
  completed epochs, 1-based), plus ``seed=mean`` rows averaged over seeds;
- ``curves.png``: kNN top-1 vs epochs for both arms (Figures 1-2 in miniature);
- ``compute_saved.json`` / ``compute_saved.png``: the epoch at which SimCLR
  reaches its best (mean) accuracy, the first epoch at which SimCLR+SuNCEt
  reaches it, their ratio (the fraction of SimCLR's epochs needed) and
  ``1 - ratio`` (compute saved), as in the paper's CIFAR-10 panel (d);
- ``final_eval.csv``: optional linear / fine-tune evaluation of each arm's
  last checkpoint (``--final-eval``).

A run directory that already holds ``summary.json`` is reused, and one
holding checkpoints is resumed, so an interrupted reproduction continues and
``--arms`` lets the two arms run as separate processes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import DataError
from pipelines.image_folder import index_image_folder
from pipelines.labeled import stratified
from train.config import ConfigError, load_config

ARMS = {"simclr": "SimCLR", "suncet": "SimCLR+SuNCEt"}
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "repro_cifar10.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root holding <train-split>/ and <val-split>/")
    p.add_argument("--labeled-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: the config's augment.resolution")
    p.add_argument("--model", default=None, help="encoder arch, e.g. resnet18-small (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base pre-training config for both arms")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to both arms (repeatable)")
    p.add_argument("--suncet-weight", type=float, default=1.0, help="SuNCEt weight of the second arm")
    p.add_argument("--train-split", default=None, help="default: the config's data.train_split")
    p.add_argument("--val-split", default=None, help="default: the config's data.val_split")
    p.add_argument("--train-subset", type=int, default=None,
                   help="pre-train on a class-balanced subset of this many train images (symlinked under --out)")
    p.add_argument("--eval-every", type=int, default=1, help="kNN evaluation every this many epochs")
    p.add_argument("--final-eval", nargs="*", default=["linear"], choices=["knn", "linear", "finetune"],
                   help="evaluations of each arm's last checkpoint (default: linear)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="arms to train in this process (the report uses every arm found under --out)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write curves and figures from whatever the runs under --out logged so far")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--no-progress", action="store_true")
    return p


# --------------------------------------------------------------------------- data


def subset_root(data: Path, train_split: str, val_split: str, n: int, seed: int, out: Path) -> Path:
    """A class-balanced ``n``-image subset of ``data/train_split`` as an
    ImageFolder of symlinks under ``out``; ``val_split`` is linked whole.
    The same (n, seed) always gives the same images."""
    index = index_image_folder(data / train_split)
    if not 0 < n <= len(index):
        raise DataError(f"--train-subset must be in [1, {len(index)}], got {n}")
    chosen = stratified(index.labels, n / len(index), seed)
    root = out / f"data-subset{n}-seed{seed}"
    split = root / train_split
    for i in chosen:
        link = split / index.paths[i]
        link.parent.mkdir(parents=True, exist_ok=True)
        _symlink(index.root / index.paths[i], link)
    _symlink(data / val_split, root / val_split)
    return root


def _symlink(target: Path, link: Path) -> None:
    """Create ``link`` -> ``target`` unless it exists (several arm processes may race here)."""
    try:
        os.symlink(target.resolve(), link, target_is_directory=target.is_dir())
    except FileExistsError:
        pass


# --------------------------------------------------------------------------- runs


def arm_overrides(args, data_root: Path, arm: str, seed: int, run_dir: Path) -> list[str]:
    """The only differences between arms: loss.suncet_weight (and the output dir)."""
    sets = [f"data.root={data_root}", f"data.labeled_fraction={args.labeled_fraction}",
            f"optim.epochs={args.epochs}", f"run.seed={seed}", f"run.output_dir={run_dir}",
            f"run.knn_every_epochs={args.eval_every}",
            f"loss.suncet_weight={args.suncet_weight if arm == 'suncet' else 0.0}"]
    if args.resolution is not None:
        sets.append(f"augment.resolution={args.resolution}")
    if args.model is not None:
        sets.append(f"model.arch={args.model}")
    if args.train_split is not None:
        sets.append(f"data.train_split={args.train_split}")
    if args.val_split is not None:
        sets.append(f"data.val_split={args.val_split}")
    if args.no_progress:
        sets.append("run.progress_bar=false")
    return [*args.set, *sets]


def run_arm(cfg, run_dir: Path) -> None:
    from train import checkpoint as ckpt
    from train.distributed import DistContext
    from train.pretrain import run

    if (run_dir / "summary.json").is_file():
        print(f"{run_dir}: finished earlier, reusing its metrics")
        return
    resume = "auto" if ckpt.list_checkpoints(run_dir) else "none"
    run(cfg, DistContext(0, 1, 0, torch.device("cpu")), resume)


def read_knn_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(completed epochs, top-1, top-5) from the kNN rows of a run's metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("knn_top1")]
    return [(int(r["epoch"]) + 1, float(r["knn_top1"]), float(r["knn_top5"])) for r in rows]


# --------------------------------------------------------------------------- report


def mean_curves(curves: dict[tuple[int, str], list]) -> dict[str, list[tuple[int, float, float]]]:
    """Per arm, the seed-mean curve over the epochs every seed has reached."""
    out = {}
    for arm in ARMS:
        runs = [c for (s, a), c in curves.items() if a == arm and c]
        if not runs:
            continue
        epochs = sorted(set.intersection(*(set(e for e, _, _ in c) for c in runs)))
        by_epoch = [{e: (t1, t5) for e, t1, t5 in c} for c in runs]
        out[arm] = [(e, float(np.mean([b[e][0] for b in by_epoch])), float(np.mean([b[e][1] for b in by_epoch])))
                    for e in epochs]
    return out


def compute_saved(simclr: list[tuple[int, float, float]], suncet: list[tuple[int, float, float]]) -> dict:
    """Epochs SimCLR+SuNCEt needs to first reach SimCLR's best top-1, as a
    fraction of the epochs SimCLR needed for it."""
    best_epoch, best = max(((e, t1) for e, t1, _ in simclr), key=lambda x: (x[1], -x[0]))
    reach = next((e for e, t1, _ in suncet if t1 >= best), None)
    result = {"simclr_best_top1": best, "simclr_best_epoch": best_epoch, "simclr_epochs": simclr[-1][0],
              "suncet_best_top1": max(t1 for _, t1, _ in suncet), "suncet_epoch_to_match": reach,
              "fraction_of_simclr_epochs": None, "compute_saved": None}
    if reach is not None:
        result["fraction_of_simclr_epochs"] = reach / best_epoch
        result["compute_saved"] = 1.0 - reach / best_epoch
    return result


def write_curves_csv(path: Path, curves: dict, means: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "arm", "epoch", "knn_top1", "knn_top5"])
        for (seed, arm), curve in sorted(curves.items()):
            for e, t1, t5 in curve:
                w.writerow([seed, arm, e, f"{t1:.2f}", f"{t5:.2f}"])
        for arm, curve in means.items():
            for e, t1, t5 in curve:
                w.writerow(["mean", arm, e, f"{t1:.2f}", f"{t5:.2f}"])


def plot(out: Path, curves: dict, means: dict, saved: dict | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"simclr": "tab:blue", "suncet": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for (seed, arm), curve in sorted(curves.items()):
        if curve and len({s for s, _ in curves}) > 1:
            ax.plot([e for e, _, _ in curve], [t for _, t, _ in curve], color=colors[arm], alpha=0.25, lw=1)
    for arm, curve in means.items():
        ax.plot([e for e, _, _ in curve], [t for _, t, _ in curve], "o-", color=colors[arm], label=ARMS[arm], ms=3)
    if saved is not None:
        ax.axhline(saved["simclr_best_top1"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("pre-training epochs")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    if saved is None:
        return
    fig, ax = plt.subplots(figsize=(4, 4))
    frac = saved["fraction_of_simclr_epochs"]
    heights = [1.0, frac if frac is not None else 0.0]
    bars = ax.bar([ARMS["simclr"], ARMS["suncet"]], heights, color=[colors["simclr"], colors["suncet"]])
    label = "not reached" if frac is None else f"{frac:.2f} ({100 * saved['compute_saved']:.0f}% saved)"
    ax.text(bars[1].get_x() + bars[1].get_width() / 2, heights[1] + 0.02, label, ha="center")
    ax.text(bars[0].get_x() + bars[0].get_width() / 2, 1.02, f"{saved['simclr_best_epoch']} ep", ha="center")
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("fraction of SimCLR's epochs")
    ax.set_title(f"epochs to reach SimCLR's best kNN ({saved['simclr_best_top1']:.1f}%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "compute_saved.png", dpi=120)
    plt.close(fig)


def final_evaluation(args, run_dirs: dict[tuple[int, str], Path], out: Path, num_workers: int) -> None:
    from train.evaluate import EvalSettings, evaluate_checkpoint

    rows = []
    for (seed, arm), run_dir in sorted(run_dirs.items()):
        if not (run_dir / "summary.json").is_file():
            continue
        for method in args.final_eval:
            settings = EvalSettings(method=method, val_split=args.val_split, train_split=args.train_split,
                                    num_workers=num_workers, progress=not args.no_progress, seed=seed)
            res = evaluate_checkpoint(run_dir, None, settings)
            print(f"seed {seed} {ARMS[arm]} {method}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
            rows.append({"seed": seed, "arm": arm, "method": method, "top1": f"{res['top1']:.2f}",
                         "top5": f"{res['top5']:.2f}"})
    if rows:
        with open(out / "final_eval.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        base = load_config(args.config, args.set)
        data = Path(args.data)
        train_split = args.train_split or base.data.train_split
        val_split = args.val_split or base.data.val_split
        run_dirs = {(s, a): out / f"seed{s}" / a for s in args.seeds for a in ARMS}
        for seed in args.seeds:
            root = data
            if args.train_subset is not None:
                root = subset_root(data, train_split, val_split, args.train_subset, seed, out)
            for arm in [] if args.report_only else args.arms:
                cfg = load_config(args.config, arm_overrides(args, root, arm, seed, run_dirs[seed, arm]))
                print(f"=== seed {seed}: {ARMS[arm]} (loss.suncet_weight={cfg.loss.suncet_weight}) -> "
                      f"{run_dirs[seed, arm]}", flush=True)
                run_arm(cfg, run_dirs[seed, arm])
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    curves = {key: read_knn_curve(d) for key, d in run_dirs.items()}
    means = mean_curves(curves)
    write_curves_csv(out / "curves.csv", curves, means)
    saved = compute_saved(means["simclr"], means["suncet"]) if len(means) == 2 else None
    if saved is not None:
        (out / "compute_saved.json").write_text(json.dumps(saved, indent=2) + "\n")
    plot(out, curves, means, saved, f"{data.name}: {args.labeled_fraction:.0%} labels, seeds {args.seeds}")
    for arm, curve in means.items():
        print(f"{ARMS[arm]:>14}: " + "  ".join(f"e{e}:{t1:.1f}" for e, t1, _ in curve))
    if saved is not None:
        frac = saved["fraction_of_simclr_epochs"]
        print(f"SimCLR best kNN top-1 {saved['simclr_best_top1']:.2f}% at epoch {saved['simclr_best_epoch']}; "
              + ("SimCLR+SuNCEt never reaches it" if frac is None else
                 f"SimCLR+SuNCEt reaches it at epoch {saved['suncet_epoch_to_match']} "
                 f"({frac:.2f} of SimCLR's epochs, {100 * saved['compute_saved']:.0f}% compute saved)"))
    if args.final_eval and len(means) == 2:
        final_evaluation(args, run_dirs, out, base.data.num_workers)
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}" + (", compute_saved.*" if saved else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
