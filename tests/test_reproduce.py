"""``tools.reproduce`` end to end on a tiny generated dataset, and its compute-saved arithmetic."""
from __future__ import annotations

import csv
import json

import yaml

from tests.pretrain_helpers import make_split_tree, tiny_overrides
from tools import reproduce


def test_compute_saved_reads_the_first_epoch_reaching_simclrs_best():
    simclr = [(1, 20.0, 0), (2, 30.0, 0), (3, 40.0, 0), (4, 40.0, 0)]
    suncet = [(1, 30.0, 0), (2, 41.0, 0), (3, 45.0, 0), (4, 46.0, 0)]
    saved = reproduce.compute_saved(simclr, suncet)
    assert saved["simclr_best_epoch"] == 3  # the first epoch at the best value
    assert saved["suncet_epoch_to_match"] == 2
    assert saved["fraction_of_simclr_epochs"] == 2 / 3
    never = reproduce.compute_saved(simclr, [(e, 10.0, 0) for e in range(1, 5)])
    assert never["suncet_epoch_to_match"] is None and never["compute_saved"] is None


def test_mean_curves_average_over_seeds():
    curves = {(0, "simclr"): [(1, 10.0, 50.0), (2, 20.0, 60.0)], (1, "simclr"): [(1, 30.0, 70.0)],
              (0, "suncet"): []}
    assert reproduce.mean_curves(curves) == {"simclr": [(1, 20.0, 60.0)]}


def test_reproduce_runs_end_to_end(tmp_path):
    data = make_split_tree(tmp_path / "data", classes=3, train_per_class=8, val_per_class=2, size=12)
    keep = ("data.unlabeled_batch_size", "data.support_images_per_class", "data.num_workers", "model.",
            "optim.", "run.precision", "run.log_every_steps", "run.checkpoint_every_steps", "run.knn_k")
    sets = [o for o in tiny_overrides(data, tmp_path / "unused") if o.startswith(keep) and "epochs" not in o]
    out = tmp_path / "repro"
    argv = ["--data", str(data), "--labeled-fraction", "0.5", "--epochs", "2", "--resolution", "8",
            "--seeds", "0", "--train-subset", "18", "--val-split", "val", "--out", str(out), "--no-progress",
            "--set", "data.support_classes=3", "--set", "optim.warmup_epochs=0.5",
            "--set", "data.knn_max_samples=100", *[a for s in sets for a in ("--set", s)]]
    assert reproduce.main(argv) == 0

    # Identical settings except the SuNCEt weight.
    cfgs = {arm: yaml.safe_load((out / "seed0" / arm / "config.yaml").read_text()) for arm in reproduce.ARMS}
    assert cfgs["simclr"]["loss"].pop("suncet_weight") == 0.0 and cfgs["suncet"]["loss"].pop("suncet_weight") == 1.0
    for cfg in cfgs.values():
        cfg["run"].pop("output_dir")
    assert cfgs["simclr"] == cfgs["suncet"]
    assert len(list((out / "data-subset18-seed0" / "train").rglob("*.JPEG"))) == 18

    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["seed"], r["arm"], r["epoch"]) for r in rows} == {
        (s, a, e) for s in ("0", "mean") for a in ("simclr", "suncet") for e in ("1", "2")}
    saved = json.loads((out / "compute_saved.json").read_text())
    assert saved["simclr_epochs"] == 2
    assert (out / "curves.png").stat().st_size > 0 and (out / "compute_saved.png").stat().st_size > 0
    with open(out / "final_eval.csv", newline="") as f:
        assert [(r["arm"], r["method"]) for r in csv.DictReader(f)] == [("simclr", "linear"), ("suncet", "linear")]

    # A second call reuses the finished runs instead of training again.
    mtime = (out / "seed0" / "suncet" / "metrics.csv").stat().st_mtime
    assert reproduce.main([*argv, "--final-eval"]) == 0
    assert (out / "seed0" / "suncet" / "metrics.csv").stat().st_mtime == mtime
