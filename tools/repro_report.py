"""Figures and verdicts of ``tools.reproduce``: pure functions of what the runs logged.

Each run contributes a curve of points ``(epoch, global_step, images, top1, top5)``, one per
epoch-end kNN evaluation, where ``images`` counts the images pushed through the network so
far: each step forwards ``2 B`` unlabeled views, plus ``C K V`` support images while SuNCEt is
on (``loss.suncet_weight > 0`` and before ``loss.supervised_epochs``). A SuNCEt step at the
paper's shapes costs ``(88 + 40) / 88`` of a SimCLR step, so "epochs saved" overstates the
compute saved; both are reported.

Across seeds, a point is the mean with a 95 % t-interval (``Band``; min-max is also kept).
``compute_saved`` compares an arm with the baseline (SimCLR): the images the arm needs to first
reach the baseline's best mean kNN, as a fraction of the images the baseline needed, per seed,
then across seeds. ``verdict`` says "not distinguishable from noise" when the two arms'
intervals at the compared point overlap.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from train.config import config_from_dict

# Two-sided 95 % Student t quantiles by degrees of freedom (n - 1), for a handful of seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Point:
    epoch: int  # completed epochs
    global_step: int
    images: int  # images through the network so far
    top1: float
    top5: float


@dataclass(frozen=True)
class Band:
    """A value over seeds: the mean, its 95 % t-interval (the mean itself for one seed), min and max."""

    mean: float
    low: float
    high: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Band:
        values = [float(v) for v in values]
        mean = statistics.fmean(values)
        half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values)) \
            if len(values) > 1 else 0.0
        return cls(mean, mean - half, mean + half, min(values), max(values), len(values))

    def overlaps(self, other: Band) -> bool:
        return self.low <= other.high and other.low <= self.high

    def text(self, fmt: str = ".1f") -> str:
        if self.n == 1:
            return f"{self.mean:{fmt}}"
        return f"{self.mean:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"


def images_per_step(cfg: dict, epoch: int) -> int:
    """Images through the network in one step of ``epoch`` (0-based) for a run's config dict
    (``PretrainConfig.network_images_per_step``)."""
    return config_from_dict(cfg).network_images_per_step(epoch)


def curve_points(cfg: dict, knn_rows: Sequence[dict]) -> list[Point]:
    """Points of one run from its config dict and its kNN rows (``epoch``, ``global_step``,
    ``knn_top1``, ``knn_top5`` as logged in metrics.csv; ``epoch`` 0-based, the row written at the
    end of that epoch, so ``global_step = (epoch + 1) x steps per epoch``)."""
    points = []
    for row in sorted(knn_rows, key=lambda r: int(r["global_step"])):
        epoch, step = int(row["epoch"]), int(row["global_step"])
        per_epoch = step // (epoch + 1)  # each epoch's images counted at its own per-step cost
        images = sum(per_epoch * images_per_step(cfg, e) for e in range(epoch + 1))
        points.append(Point(epoch + 1, step, images, float(row["knn_top1"]), float(row["knn_top5"])))
    return points


def mean_curve(curves: Sequence[Sequence[Point]]) -> list[tuple[int, Band, Band, float]]:
    """``(epoch, top-1 band, top-5 band, mean images)`` over the epochs every curve reached."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    epochs = sorted(set.intersection(*({p.epoch for p in c} for c in curves)))
    by_epoch = [{p.epoch: p for p in c} for c in curves]
    return [(e, Band.of([b[e].top1 for b in by_epoch]), Band.of([b[e].top5 for b in by_epoch]),
             statistics.fmean(b[e].images for b in by_epoch)) for e in epochs]


def first_reaching(curve: Sequence[Point], target: float) -> Point | None:
    return next((p for p in curve if p.top1 >= target), None)


def compute_saved(baseline: dict[int, Sequence[Point]], arm: dict[int, Sequence[Point]]) -> dict:
    """How much of the baseline's compute ``arm`` needs to reach the baseline's best mean kNN.

    ``baseline`` and ``arm`` map a seed to its curve; seeds missing from either are ignored.
    Per seed: the images (and epochs) the arm needs to first reach the target, as a fraction of
    the images (epochs) the baseline needed to first reach it. Fractions of the seeds where
    the arm reaches the target are summarised as ``Band``s; ``reached`` counts those seeds."""
    seeds = sorted(set(baseline) & set(arm))
    mean = mean_curve([baseline[s] for s in seeds])
    if not mean:
        return {"seeds": seeds, "target_top1": None, "reached": 0}
    best_epoch, best_band, _, _ = max(mean, key=lambda m: (m[1].mean, -m[0]))
    target = best_band.mean
    image_fracs, epoch_fracs = [], []
    for s in seeds:
        ref, got = first_reaching(baseline[s], target), first_reaching(arm[s], target)
        ref = ref or next(p for p in baseline[s] if p.epoch == best_epoch)  # a seed below the mean best
        if got is not None:
            image_fracs.append(got.images / ref.images)
            epoch_fracs.append(got.epoch / ref.epoch)
    return {
        "seeds": seeds, "target_top1": target, "baseline_best_epoch": best_epoch,
        "reached": len(image_fracs),
        "fraction_of_images": asdict(Band.of(image_fracs)) if image_fracs else None,
        "fraction_of_epochs": asdict(Band.of(epoch_fracs)) if epoch_fracs else None,
        "images_saved": 1 - statistics.fmean(image_fracs) if image_fracs else None,
    }


def verdict(name: str, baseline_name: str, baseline: Sequence[Sequence[Point]], arm: Sequence[Sequence[Point]],
            saved: dict) -> str:
    """One line: the arm against the baseline at the baseline's best epoch and at the last common
    epoch, and whether the compute saving survives the seed-to-seed spread."""
    base, ours = mean_curve(baseline), mean_curve(arm)
    common = sorted({m[0] for m in base} & {m[0] for m in ours})
    if not common:
        return f"{name}: no common epoch with {baseline_name}"
    b, o = {m[0]: m for m in base}, {m[0]: m for m in ours}
    last = common[-1]
    parts = [f"{name} vs {baseline_name} at epoch {last}: kNN top-1 {o[last][1].text()} vs {b[last][1].text()}"]
    if o[last][1].n > 1:
        parts.append("not distinguishable from noise" if o[last][1].overlaps(b[last][1]) else
                     ("better" if o[last][1].mean > b[last][1].mean else "worse") + " beyond the seed spread")
    n = len(saved.get("seeds", []))
    if saved.get("fraction_of_images") is None:
        parts.append(f"never reaches {baseline_name}'s best mean ({saved.get('target_top1') or float('nan'):.1f}%)")
    else:
        frac = Band(**saved["fraction_of_images"])
        half = "at most half" if frac.high <= 0.5 else ("not within half" if frac.low > 0.5 else
                                                        "half or less not established")
        noise = ""
        if frac.n > 1 and frac.low > 1.0:
            noise = f"; it needs more images than {baseline_name} beyond the seed spread"
        elif frac.n > 1 and frac.high >= 1.0:
            noise = ("; the saving is not distinguishable from noise" if frac.mean < 1.0 else
                     f"; no saving: more images than {baseline_name} on average, within the seed spread")
        parts.append(f"reaches {baseline_name}'s best mean ({saved['target_top1']:.1f}%) in {saved['reached']} of {n} "
                     f"seeds, with {frac.text('.2f')} of its images ({half}){noise}")
    return "; ".join(parts)


def markdown_summary(curves: dict[str, dict[int, Sequence[Point]]], saved: dict[str, dict], baseline: str) -> str:
    """The tables RESULTS.md quotes, written by ``tools.reproduce`` as ``summary.md``: kNN per epoch
    (mean [95 % interval] over seeds), the last epoch per seed, and what each arm needs to reach
    the baseline's best mean."""
    means = {arm: mean_curve(list(by_seed.values())) for arm, by_seed in curves.items()}
    epochs = sorted({m[0] for mean in means.values() for m in mean})
    seeds = sorted({s for by_seed in curves.values() for s in by_seed})
    lines = ["kNN top-1 (%) after each epoch, mean [95 % interval] over seeds", "",
             "| arm | " + " | ".join(f"e{e}" for e in epochs) + " |", "|---" * (len(epochs) + 1) + "|"]
    for arm, mean in means.items():
        by_epoch = {m[0]: m[1].text() for m in mean}
        lines.append(f"| {arm} | " + " | ".join(by_epoch.get(e, "") for e in epochs) + " |")
    lines += ["", "Last epoch, per seed", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95 % interval] | images |",
              "|---" * (len(seeds) + 3) + "|"]
    for arm, by_seed in curves.items():
        last = {s: c[-1] for s, c in by_seed.items() if c}
        if not last:
            continue
        band = Band.of([p.top1 for p in last.values()])
        images = statistics.fmean(p.images for p in last.values())
        lines.append(f"| {arm} | " + " | ".join(f"{last[s].top1:.1f}" if s in last else "" for s in seeds)
                     + f" | {band.text()} | {images:,.0f} |")
    lines += ["", f"To reach {baseline}'s best mean kNN", "",
              "| arm | target | seeds reaching it | fraction of images | fraction of epochs |", "|---|---|---|---|---|"]
    for arm, s in saved.items():
        if s.get("target_top1") is None:
            continue
        frac = {k: Band(**s[k]).text(".2f") if s.get(k) else "-" for k in ("fraction_of_images", "fraction_of_epochs")}
        lines.append(f"| {arm} | {s['target_top1']:.1f} | {s['reached']} of {len(s['seeds'])} | "
                     f"{frac['fraction_of_images']} | {frac['fraction_of_epochs']} |")
    return "\n".join(lines) + "\n"
