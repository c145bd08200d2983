"""``tools.reproduce`` end to end on a tiny generated dataset, and its arithmetic (``tools.repro_report``)
against numbers worked out by hand."""
from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from tests.pretrain_helpers import make_split_tree, tiny_overrides
from tools import repro_report as rep
from tools import reproduce

CFG = {"data": {"unlabeled_batch_size": 44, "support_classes": 20, "support_images_per_class": 2,
                "support_views": 1}, "loss": {"suncet_weight": 1.0, "supervised_epochs": 2}}


def _curve(values: list[float], images_per_epoch: int = 100) -> list[rep.Point]:
    return [rep.Point(e, 10 * e, images_per_epoch * e, v, 0.0) for e, v in enumerate(values, start=1)]


def test_images_through_the_network_count_the_support_only_while_suncet_is_on():
    assert rep.images_per_step(CFG, 0) == 88 + 40 and rep.images_per_step(CFG, 2) == 88
    simclr = {**CFG, "loss": {"suncet_weight": 0.0}}
    assert rep.images_per_step(simclr, 0) == 88
    rows = [{"epoch": e, "global_step": 10 * (e + 1), "knn_top1": 1, "knn_top5": 2} for e in range(3)]
    assert [p.images for p in rep.curve_points(CFG, rows)] == [1280, 2560, 3440]  # 10 steps x 128, 128, 88
    every_other = [rows[0], rows[2]]  # kNN every 2nd epoch: the epochs in between still cost what they cost
    assert [p.images for p in rep.curve_points(CFG, every_other)] == [1280, 3440]


def test_band_is_the_mean_with_a_student_t_interval():
    band = rep.Band.of([1.0, 2.0, 3.0])
    assert band.mean == 2.0 and band.n == 3
    assert band.high - band.mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    single = rep.Band.of([5.0])
    assert (single.low, single.high) == (5.0, 5.0)
    assert rep.Band.of([1.0, 2.0]).overlaps(rep.Band.of([1.5, 3.0]))
    assert not rep.Band.of([1.0, 1.1]).overlaps(rep.Band.of([5.0, 5.1]))


def test_compute_saved_counts_images_to_reach_the_baselines_best_mean():
    baseline = {0: _curve([20, 30, 40, 40]), 1: _curve([22, 32, 38, 42])}  # mean best 41 at epoch 4
    arm = {0: _curve([30, 41, 45, 46], 150), 1: _curve([30, 35, 42, 46], 150)}
    saved = rep.compute_saved(baseline, arm)
    assert saved["target_top1"] == 41.0 and saved["baseline_best_epoch"] == 4
    # seed 0: baseline never reaches 41, so its best-mean epoch 4 (400 images); arm at epoch 2 (300).
    # seed 1: baseline first at epoch 4 (400); arm at epoch 3 (450).
    frac = saved["fraction_of_images"]
    assert frac["mean"] == pytest.approx((300 / 400 + 450 / 400) / 2) and saved["reached"] == 2
    assert saved["fraction_of_epochs"]["mean"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    never = rep.compute_saved(baseline, {0: _curve([10, 10, 10, 10]), 1: _curve([10, 10, 10, 10])})
    assert never["reached"] == 0 and never["fraction_of_images"] is None


def test_verdict_says_when_a_difference_is_noise():
    baseline = [_curve([20, 30, 40]), _curve([22, 31, 39]), _curve([18, 29, 41])]
    noisy = [_curve([19, 31, 38]), _curve([25, 33, 44]), _curve([17, 28, 39])]
    saved = rep.compute_saved(dict(enumerate(baseline)), dict(enumerate(noisy)))
    assert "not distinguishable from noise" in rep.verdict("x", "simclr", baseline, noisy, saved)
    clear = [_curve([45, 50, 60]), _curve([46, 51, 61]), _curve([44, 49, 59])]  # each at epoch 1 of 3
    line = rep.verdict("x", "simclr", baseline, clear, rep.compute_saved(dict(enumerate(baseline)),
                                                                         dict(enumerate(clear))))
    assert "better beyond the seed spread" in line and "at most half" in line
    slow = [_curve([10, 20, 41], 150), _curve([12, 21, 42], 150), _curve([11, 19, 40], 150)]  # 1.5x the images
    line = rep.verdict("x", "simclr", baseline, slow, rep.compute_saved(dict(enumerate(baseline)), dict(enumerate(slow))))
    assert "needs more images than simclr beyond the seed spread" in line and "not distinguishable" not in line.split(";")[-1]
    # more images on average, but one seed needs fewer: no saving, and none claimed as noise
    mixed = [_curve([10, 20, 41], 150), _curve([12, 21, 42], 150), _curve([41, 42, 43], 150)]
    line = rep.verdict("x", "simclr", baseline, mixed, rep.compute_saved(dict(enumerate(baseline)),
                                                                         dict(enumerate(mixed))))
    assert line.endswith("; no saving: more images than simclr on average, within the seed spread"), line


def test_summary_tables_hold_the_per_seed_values_and_their_bands():
    baseline = {0: _curve([20, 40]), 1: _curve([22, 42])}
    arm = {0: _curve([41, 45], 150), 1: _curve([30, 44], 150)}
    text = rep.markdown_summary({"simclr": baseline, "k2": arm}, {"k2": rep.compute_saved(baseline, arm)}, "simclr")
    # two seeds: t(1) = 12.706, stdev of (40, 42) = sqrt(2), half-width 12.706 x sqrt(2) / sqrt(2)
    assert "| simclr | 21.0 [8.3, 33.7] | 41.0 [28.3, 53.7] |" in text
    assert "| simclr | 40.0 | 42.0 | 41.0 [28.3, 53.7] | 200 |" in text
    assert "| k2 | 45.0 | 44.0 | 44.5 [38.1, 50.9] | 300 |" in text
    # target 41: seed 0 reaches it at epoch 1 (150 images, 1 epoch) against the baseline's best epoch 2
    # (200 images; that seed never reaches 41); seed 1 at epoch 2 (300 images) against epoch 2 (200)
    assert "| k2 | 41.0 | 2 of 2 | 1.12 [-3.64, 5.89] | 0.75 [-2.43, 3.93] |" in text


def test_arms_are_parsed_in_order_and_bad_names_refused():
    args = reproduce.build_parser().parse_args(["--data", "d", "--epochs", "1", "--arm", "simclr:loss.suncet_weight=0",
                                                "--arm", "k6:data.support_images_per_class=6,loss.suncet_weight=1"])
    assert reproduce.parse_arms(args) == {"simclr": ["loss.suncet_weight=0"],
                                          "k6": ["data.support_images_per_class=6", "loss.suncet_weight=1"]}
    args.arm.append("k6:x=1")
    with pytest.raises(Exception, match="new name"):
        reproduce.parse_arms(args)


def test_holdout_is_disjoint_from_training_and_class_balanced(tmp_path):
    data = make_split_tree(tmp_path / "data", classes=3, train_per_class=10, val_per_class=2, size=12)
    root = reproduce.subset_root(data, "train", "val", 12, 6, seed=0, out=tmp_path / "out")
    train = {p.name for p in (root / "train").rglob("*.JPEG")}
    held = {p.name for p in (root / "val").rglob("*.JPEG")}
    assert len(train) == 12 and len(held) == 6 and not train & held
    assert sorted(p.parent.name for p in (root / "val").rglob("*.JPEG")).count("n00000000") == 2


def test_reproduce_runs_end_to_end(tmp_path):
    data = make_split_tree(tmp_path / "data", classes=3, train_per_class=8, val_per_class=2, size=12)
    keep = ("data.unlabeled_batch_size", "data.support_images_per_class", "data.num_workers", "model.",
            "optim.", "run.precision", "run.log_every_steps", "run.checkpoint_every_steps", "run.knn_k")
    sets = [o for o in tiny_overrides(data, tmp_path / "unused") if o.startswith(keep) and "epochs" not in o]
    out = tmp_path / "repro"
    argv = ["--data", str(data), "--labeled-fraction", "0.5", "--epochs", "2", "--resolution", "8",
            "--seeds", "0", "1", "--train-subset", "18", "--val-split", "val", "--out", str(out), "--no-progress",
            "--set", "data.support_classes=3", "--set", "optim.warmup_epochs=0.5",
            "--set", "data.knn_max_samples=100", *[a for s in sets for a in ("--set", s)]]
    assert reproduce.main(argv) == 0

    # Identical settings except the SuNCEt weight (and the seed).
    cfgs = {arm: yaml.safe_load((out / "seed0" / arm / "config.yaml").read_text()) for arm in ("simclr", "suncet")}
    assert cfgs["simclr"]["loss"].pop("suncet_weight") == 0.0 and cfgs["suncet"]["loss"].pop("suncet_weight") == 1.0
    for cfg in cfgs.values():
        cfg["run"].pop("output_dir")
    assert cfgs["simclr"] == cfgs["suncet"]
    assert len(list((out / "data-subset18-holdout0-seed0" / "train").rglob("*.JPEG"))) == 18

    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["seed"], r["arm"], r["epoch"]) for r in rows} == {
        (s, a, e) for s in ("0", "1", "mean") for a in ("simclr", "suncet") for e in ("1", "2")}
    by = {(r["seed"], r["arm"], r["epoch"]): r for r in rows}
    # A SuNCEt step forwards 2 x 8 views + 3 classes x 2 images x 2 views (the repro config's
    # support_views) of support, a SimCLR step 2 x 8.
    steps = int(by["0", "simclr", "1"]["global_step"])
    assert int(by["0", "simclr", "1"]["images"]) == steps * 16 and int(by["0", "suncet", "1"]["images"]) == steps * 28
    mean = by["mean", "suncet", "2"]
    assert float(mean["top1_low"]) <= float(mean["knn_top1"]) <= float(mean["top1_high"])
    saved = json.loads((out / "compute_saved.json").read_text())
    assert saved["baseline"] == "simclr" and set(saved["arms"]) == {"suncet"}
    assert (out / "verdict.txt").read_text().startswith("suncet vs simclr at epoch 2")
    assert "| suncet | " in (out / "summary.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
    with open(out / "final_eval.csv", newline="") as f:
        assert sorted((r["seed"], r["arm"]) for r in csv.DictReader(f)) == [
            ("0", "simclr"), ("0", "suncet"), ("1", "simclr"), ("1", "suncet")]

    # A second call reuses the finished runs instead of training again.
    mtime = (out / "seed0" / "suncet" / "metrics.csv").stat().st_mtime
    assert reproduce.main([*argv, "--final-eval"]) == 0
    assert (out / "seed0" / "suncet" / "metrics.csv").stat().st_mtime == mtime
