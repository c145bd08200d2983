"""Small-scale reproduction of the paper's claim: ``python -m tools.reproduce``.

Pre-trains several *arms* with one config, data, labeled subset and schedule, differing only by
the overrides each arm names (default: SimCLR, ``loss.suncet_weight=0``, against
SimCLR+SuNCEt), for each of ``--seeds``. Every arm is scored by the same epoch-end kNN monitor,
and ``--out`` receives (``tools.repro_report`` holds the arithmetic):

- ``curves.csv``: per seed and arm, each epoch's kNN top-1/top-5 with the global step and the
  images pushed through the network so far; ``seed=mean`` rows with the 95 % interval;
- ``curves.png``: kNN top-1 against epochs and against images through the network, the mean
  of the seeds with its interval as a band;
- ``compute_saved.json``: per arm, the fraction of the baseline's (first arm's) images and
  epochs needed to reach the baseline's best mean kNN, per seed and as a mean with interval;
- ``verdict.txt``: one line per arm, saying when a difference is not distinguishable from noise;
- ``summary.md``: the same figures as markdown tables (per epoch, last epoch per seed, compute);
- ``final_eval.csv``: optional linear / fine-tune evaluation of each run's last checkpoint.

``--holdout N`` holds N images of the train split out as the evaluation split (a class-balanced
draw disjoint from the training images), so that settings can be chosen without the val/test
split that is reported. A run directory that holds ``summary.json`` is reused and one holding
checkpoints is resumed, so an interrupted reproduction continues, and ``--arms`` lets arms run
as separate processes.
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
import yaml

from pipelines.errors import DataError
from pipelines.image_folder import index_image_folder
from pipelines.labeled import stratified
from tools import repro_report as report
from train.checkpoint import CheckpointError
from train.config import ConfigError, load_config
from train.run_lock import RunDirError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "repro_cifar10.yaml"
LABELS = {"simclr": "SimCLR", "suncet": "SimCLR+SuNCEt", "simclr_suncet": "SimCLR+SuNCEt", "swav": "SwAV",
          "swav_suncet": "SwAV+SuNCEt", "paws": "PAWS"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root holding <train-split>/ and <val-split>/")
    p.add_argument("--labeled-fraction", type=float, default=0.1, help="labeled share of each class (data.labeled_fraction)")
    p.add_argument("--epochs", type=int, required=True, help="pre-training epochs of every run")
    p.add_argument("--resolution", type=int, default=None, help="default: the config's augment.resolution")
    p.add_argument("--model", default=None, help="encoder arch, e.g. resnet18-small (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and arm")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base pre-training config of every arm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="an arm and its own overrides (repeatable; the first is the baseline); an override @FILE "
                        "is a YAML overlay (e.g. @configs/repro_arms/swav.yaml, for values with commas such as "
                        "view groups). Default: simclr:loss.suncet_weight=0 and suncet:loss.suncet_weight="
                        "<--suncet-weight>")
    p.add_argument("--baseline", default=None,
                   help="the arm the others' compute is measured against (default: the first); a baseline other "
                        "than the first writes its report files with the suffix _vs_<arm>")
    p.add_argument("--suncet-weight", type=float, default=1.0, help="loss.suncet_weight of the default suncet arm")
    p.add_argument("--train-split", default=None, help="default: the config's data.train_split")
    p.add_argument("--val-split", default=None, help="default: the config's data.val_split")
    p.add_argument("--train-subset", type=int, default=None,
                   help="pre-train on a class-balanced subset of this many train images (symlinked under --out)")
    p.add_argument("--holdout", type=int, default=None,
                   help="evaluate on this many train images held out of training (for choosing settings), "
                        "not on the val split")
    p.add_argument("--eval-every", type=int, default=1, help="kNN evaluation every this many epochs")
    p.add_argument("--final-eval", nargs="*", default=["linear"], choices=["knn", "snn", "linear", "finetune"],
                   help="evaluations of each run's last checkpoint (default: linear)")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                   help="arms to train in this process (default: all; the report uses every arm found under --out)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write curves and figures from whatever the runs under --out logged so far")
    p.add_argument("--out", default="runs/reproduce", help="output folder (runs, subsets, figures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_arms(args) -> dict[str, list[str]]:
    """Arm name -> its config overrides, in order (the first is the baseline)."""
    if not args.arm:
        return {"simclr": ["loss.suncet_weight=0.0"], "suncet": [f"loss.suncet_weight={args.suncet_weight}"]}
    arms = {}
    for spec in args.arm:
        name, _, rest = spec.partition(":")
        if not name or name in arms or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--arm {spec!r}: give a new name of letters, digits, - and _, then :KEY=VALUE,...")
        arms[name] = [o for kv in rest.split(",") if kv for o in (overlay_sets(kv[1:]) if kv.startswith("@") else [kv])]
    return arms


def overlay_sets(path: str) -> list[str]:
    """A YAML overlay file as ``--set`` items (dotted keys, values in YAML flow style)."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--arm overlay {path}: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"--arm overlay {path} must be a mapping of sections")

    def flatten(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += flatten(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}=" + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                           .removesuffix("\n...").removesuffix("..."))
        return out

    return flatten(tree, "")


# --------------------------------------------------------------------------- data


def _symlink(target: Path, link: Path) -> None:
    """Create ``link`` -> ``target`` unless it exists (several arm processes may race here)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target.resolve(), link, target_is_directory=target.is_dir())
    except FileExistsError:
        pass


def subset_root(data: Path, train_split: str, val_split: str, n: int | None, holdout: int | None, seed: int,
                out: Path) -> Path:
    """An ImageFolder of symlinks under ``out``: a class-balanced ``n``-image subset of the train
    split (all of it when ``n`` is None) and, as ``val_split``, either the real one or a
    class-balanced ``holdout``-image draw of the train images not used for training.
    The same (n, holdout, seed) always gives the same images."""
    index = index_image_folder(data / train_split)
    pool = np.arange(len(index))
    if holdout is not None:
        if not 0 < holdout < len(index):
            raise DataError(f"--holdout must be in [1, {len(index) - 1}], got {holdout}")
        held = stratified(index.labels, holdout / len(index), seed + 1_000_003)
        pool = np.setdiff1d(pool, held)
    if n is not None and not 0 < n <= len(pool):
        raise DataError(f"--train-subset must be in [1, {len(pool)}], got {n}")
    chosen = pool if n is None else pool[stratified(index.labels[pool], n / len(pool), seed)]
    root = out / f"data-subset{n or 'all'}-holdout{holdout or 0}-seed{seed}"
    for i in chosen:
        _symlink(index.root / index.paths[i], root / train_split / index.paths[i])
    if holdout is None:
        _symlink(data / val_split, root / val_split)
    else:
        for i in held:
            _symlink(index.root / index.paths[i], root / val_split / index.paths[i])
    return root


# --------------------------------------------------------------------------- runs


def run_overrides(args, data_root: Path, arm_sets: list[str], seed: int, run_dir: Path) -> list[str]:
    """Shared overrides, then the arm's own, then what differs by run (seed, output dir)."""
    sets = [f"data.root={data_root}", f"data.labeled_fraction={args.labeled_fraction}",
            f"optim.epochs={args.epochs}", f"run.knn_every_epochs={args.eval_every}"]
    for key, value in (("augment.resolution", args.resolution), ("model.arch", args.model),
                       ("data.train_split", args.train_split), ("data.val_split", args.val_split)):
        if value is not None:
            sets.append(f"{key}={value}")
    if args.no_progress:
        sets.append("run.progress_bar=false")
    return [*args.set, *sets, *arm_sets, f"run.seed={seed}", f"run.output_dir={run_dir}"]


def run_arm(cfg, run_dir: Path) -> None:
    from train import checkpoint as ckpt
    from train.distributed import DistContext
    from train.pretrain import run

    if (run_dir / "summary.json").is_file():
        print(f"{run_dir}: finished earlier, reusing its metrics")
        return
    resume = "auto" if ckpt.list_checkpoints(run_dir) else "none"
    run(cfg, DistContext(0, 1, 0, torch.device("cpu")), resume)


def read_curve(run_dir: Path) -> list[report.Point]:
    """The kNN points a run logged (empty if it logged none yet)."""
    metrics, config = run_dir / "metrics.csv", run_dir / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return []
    with open(metrics, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("knn_top1")]
    return report.curve_points(yaml.safe_load(config.read_text()), rows)


# --------------------------------------------------------------------------- outputs


def write_curves_csv(path: Path, curves: dict[str, dict[int, list]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "arm", "epoch", "global_step", "images", "knn_top1", "knn_top5", "top1_low",
                    "top1_high"])
        for arm, by_seed in curves.items():
            for seed, curve in sorted(by_seed.items()):
                for p in curve:
                    w.writerow([seed, arm, p.epoch, p.global_step, p.images, f"{p.top1:.2f}", f"{p.top5:.2f}", "", ""])
            for epoch, top1, top5, images in report.mean_curve(list(by_seed.values())):
                w.writerow(["mean", arm, epoch, "", round(images), f"{top1.mean:.2f}", f"{top5.mean:.2f}",
                            f"{top1.low:.2f}", f"{top1.high:.2f}"])


def plot(out: Path, curves: dict[str, dict[int, list]], target: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (arm, by_seed) in enumerate(curves.items()):
        mean = report.mean_curve(list(by_seed.values()))
        if not mean:
            continue
        color = f"C{i}"
        for ax, xs in ((axes[0], [m[0] for m in mean]), (axes[1], [m[3] for m in mean])):
            ax.plot(xs, [m[1].mean for m in mean], "o-", color=color, ms=3,
                    label=f"{LABELS.get(arm, arm)} (n={mean[0][1].n})")
            ax.fill_between(xs, [m[1].low for m in mean], [m[1].high for m in mean], color=color, alpha=0.2)
    for ax, xlabel in ((axes[0], "pre-training epochs"), (axes[1], "images through the network")):
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kNN top-1 (%), mean and 95 % interval")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def final_evaluation(args, run_dirs: dict[tuple[str, int], Path], out: Path, num_workers: int) -> None:
    from train.evaluate import EvalSettings, evaluate_checkpoint

    rows = []
    for (arm, seed), run_dir in sorted(run_dirs.items()):
        if not (run_dir / "summary.json").is_file():
            continue
        for method in args.final_eval:
            settings = EvalSettings(method=method, val_split=args.val_split, train_split=args.train_split,
                                    num_workers=num_workers, progress=not args.no_progress, seed=seed)
            res = evaluate_checkpoint(run_dir, None, settings)
            print(f"seed {seed} {arm} {method}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
            rows.append({"seed": seed, "arm": arm, "method": method, "top1": f"{res['top1']:.2f}",
                         "top5": f"{res['top5']:.2f}"})
    if rows:
        with open(out / "final_eval.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def summarise_final_eval(out: Path, arms: list[str]) -> None:
    """``final_eval.md``: per arm and evaluation, the mean top-1 / top-5 over seeds with 95 % intervals."""
    path = out / "final_eval.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| arm | " + " | ".join(f"{m} top-1 | {m} top-5" for m in methods) + " | seeds |",
             "|---|" + "---|" * (2 * len(methods) + 1)]
    for arm in arms:
        cells, seeds = [], set()
        for m in methods:
            mine = [r for r in rows if r["arm"] == arm and r["method"] == m]
            seeds |= {r["seed"] for r in mine}
            for key in ("top1", "top5"):
                cells.append(report.Band.of([float(r[key]) for r in mine]).text() if mine else "")
        lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(cells) + f" | {len(seeds)} |")
    (out / "final_eval.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        arms = parse_arms(args)
        unknown = sorted(set(args.arms or ()) - set(arms))
        if unknown:
            raise ConfigError(f"--arms names no defined arm: {', '.join(unknown)} (arms: {', '.join(arms)})")
        out.mkdir(parents=True, exist_ok=True)
        base = load_config(args.config, args.set)
        data = Path(args.data)
        train_split = args.train_split or base.data.train_split
        val_split = args.val_split or base.data.val_split
        run_dirs = {(a, s): out / f"seed{s}" / a for a in arms for s in args.seeds}
        for seed in args.seeds:
            root = data
            if args.train_subset is not None or args.holdout is not None:
                root = subset_root(data, train_split, val_split, args.train_subset, args.holdout, seed, out)
            for arm in [] if args.report_only else (args.arms or list(arms)):
                cfg = load_config(args.config, run_overrides(args, root, arms[arm], seed, run_dirs[arm, seed]))
                print(f"=== seed {seed}: {arm} ({', '.join(arms[arm]) or 'no overrides'}) -> {run_dirs[arm, seed]}",
                      flush=True)
                run_arm(cfg, run_dirs[arm, seed])
    except (ConfigError, DataError, RunDirError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    curves = {a: {s: c for s in args.seeds if (c := read_curve(run_dirs[a, s]))} for a in arms}
    write_curves_csv(out / "curves.csv", curves)
    baseline = args.baseline or next(iter(arms))
    if baseline not in arms:
        print(f"error: --baseline {baseline} names no arm ({', '.join(arms)})", file=sys.stderr)
        return 2
    suffix = "" if baseline == next(iter(arms)) else f"_vs_{baseline}"
    saved = {a: report.compute_saved(curves[baseline], curves[a]) for a in arms if a != baseline and curves[a]}
    (out / f"compute_saved{suffix}.json").write_text(json.dumps({"baseline": baseline, "arms": saved}, indent=2)
                                                      + "\n")
    lines = [report.verdict(a, baseline, list(curves[baseline].values()), list(curves[a].values()), saved[a])
             for a in saved]
    (out / f"verdict{suffix}.txt").write_text("".join(line + "\n" for line in lines))
    (out / f"summary{suffix}.md").write_text(report.markdown_summary(curves, saved, baseline))
    target = next((v["target_top1"] for v in saved.values() if v.get("target_top1") is not None), None)
    split = f"held-out {args.holdout} train images" if args.holdout else val_split
    plot(out, curves, target, f"{data.name}: {args.labeled_fraction:.0%} labels, kNN on {split}, seeds {args.seeds}")
    for arm, by_seed in curves.items():
        mean = report.mean_curve(list(by_seed.values()))
        print(f"{arm:>14}: " + "  ".join(f"e{e}:{t1.text()}" for e, t1, _, _ in mean))
    print("\n".join(lines))
    if args.final_eval and not args.report_only:
        final_evaluation(args, run_dirs, out, base.data.num_workers)
    summarise_final_eval(out, list(arms))
    print(f"wrote {out / 'curves.csv'}, curves.png, compute_saved.json, verdict.txt, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
