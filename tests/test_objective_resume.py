"""Every objective resumes exactly: a run stopped mid-epoch (at its own checkpoint) and resumed with
``--resume`` logs every loss of the uninterrupted run (metrics.csv's rows), and ends with its
weights, optimizer state and objective state bit for bit (which catches a drift below the 6
digits metrics.csv keeps).

SimCLR, SwAV and PAWS, with and without SuNCEt where it applies, two views or multi-crop, on the
torch backend, and SwAV + SuNCEt and PAWS multi-crop on FFCV and DALI. SwAV's queue is still filling at the
checkpoint and is read after it; its prototypes were updated before it (or unfreeze after it),
with LARC (the SwAV configs' optimizer) and with LARS. Before the fix a resumed SwAV run
normalised its prototypes once more than the uninterrupted one and drifted within a few steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.pretrain_helpers import make_split_tree, read_metrics, tiny_config
from train import checkpoint as ckpt
from train import pretrain
from train.distributed import DistContext

CPU = DistContext(0, 1, 0, torch.device("cpu"))
CLASSES, PER_CLASS, BATCH = 4, 12, 8  # one epoch of 6 steps
STOP_AT = 3  # the checkpoint resumed from: epoch 0, step 3
MULTICROP = "[{count: 2, resolution: 16}, {count: 2, resolution: 8, crop_scale: [0.1, 0.4]}]"
SWAV = {"loss.method": "swav", "loss.swav.prototypes": 200, "model.head_out_dim": 32, "optim.name": "larc",
        # 32 queued rows = 4 steps of 8: the queue holds 24 rows at the checkpoint and is used from step 4
        "loss.swav.queue_length": 32, "loss.swav.queue_start_epoch": 0,
        "loss.swav.freeze_prototypes_steps": 2}  # updated from step 2: the checkpoint holds updated prototypes
OBJECTIVES = {
    "simclr": {"loss.suncet_weight": 0.0},
    "simclr_suncet_multicrop": {"augment.views": MULTICROP},
    "swav_unfreezing_after_the_checkpoint": {**SWAV, "loss.suncet_weight": 0.0,
                                             "loss.swav.freeze_prototypes_steps": 5},
    "swav_suncet_multicrop_lars": {**SWAV, "augment.views": MULTICROP, "optim.name": "lars"},
    "paws_multicrop": {"loss.method": "paws", "loss.suncet_weight": 0.0, "data.unique_classes": True,
                       "augment.views": MULTICROP},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("objective_resume"), classes=CLASSES,
                           train_per_class=PER_CLASS, val_per_class=2, size=20)


def _config(root: Path, run_dir: Path, settings: dict):
    return tiny_config(root, run_dir, **{"data.unlabeled_batch_size": BATCH, "optim.epochs": 1,
                                         "optim.warmup_epochs": 0.5,
                                         "run.knn_every_epochs": 0, "run.checkpoint_every_steps": STOP_AT,
                                         "run.keep_checkpoints": 10, **settings})


def _loss_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """Every logged loss (as written in metrics.csv) of each global step."""
    return {int(r["global_step"]): {k: v for k, v in r.items() if k.startswith("loss") and v}
            for r in read_metrics(run_dir) if r.get("loss")}


def _final_state(run_dir: Path) -> dict:
    state = ckpt.load(ckpt.list_checkpoints(run_dir)[-1])
    return {"model": state["model"], "optimizer": state["optimizer"]["state"], "objective": state["objective"]}


def _assert_resumes_exactly(root: Path, tmp_path: Path, settings: dict) -> None:
    reference = tmp_path / "reference"
    pretrain.run(_config(root, reference, settings), CPU)
    resumed = tmp_path / "resumed"
    pretrain.run(_config(root, resumed, settings), CPU, resume=str(ckpt.checkpoint_path(reference, STOP_AT)))
    expected, got = _loss_rows(reference), _loss_rows(resumed)
    assert sorted(expected) == list(range(1, CLASSES * PER_CLASS // BATCH + 1))
    assert sorted(got) == sorted(expected)[STOP_AT:]  # the resumed run logs the steps after the checkpoint
    assert len(next(iter(got.values()))) >= 2  # the objective's losses and the total
    for step in got:
        assert got[step] == expected[step], (step, got[step], expected[step])
    torch.testing.assert_close(_final_state(resumed), _final_state(reference), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_run_resumed_mid_epoch_gives_the_uninterrupted_losses_and_weights(objective, tree, tmp_path):
    _assert_resumes_exactly(tree, tmp_path, OBJECTIVES[objective])


ON_FFCV_AND_DALI = {"swav_suncet_multicrop": {**SWAV, "augment.views": MULTICROP},
                    "paws_multicrop": OBJECTIVES["paws_multicrop"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", sorted(ON_FFCV_AND_DALI))
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_multicrop_objectives_resume_exactly_on_ffcv_and_dali(backend, objective, tree, tmp_path):
    root = tree  # DALI reads ImageFolder trees; FFCV a conversion
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        from tools.convert_imagenet import ConvertOptions, convert

        root = tmp_path / "converted"
        convert(ConvertOptions(src=str(tree), out=str(root), splits=("train",), formats=("ffcv",),
                               labeled_fraction=0.5, jobs=1, progress=False))
    else:
        pytest.importorskip("nvidia.dali")
    _assert_resumes_exactly(root, tmp_path, {**ON_FFCV_AND_DALI[objective], "data.backend": backend,
                                             "data.num_workers": 1})
