"""Every objective end to end on a CPU: a short multi-crop run trains (its loss falls, nothing
non-finite), a SIGKILLed run resumed with ``--resume auto`` gives the uninterrupted run's losses
step for step (SwAV's queue and frozen prototypes included), and the exported encoder loads into
torchvision with the trained features."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.pretrain_helpers import make_split_tree, read_metrics, step_losses, tiny_overrides
from tests.test_pretrain import _cli, _set_args

EPOCHS, STEPS = 3, 5  # 40 images / 8 per step
METHODS = {
    # SwAV + SuNCEt: the queue starts at epoch 1 and is full from its second step; prototypes frozen 3 steps
    "swav": {"loss.method": "swav", "loss.swav.prototypes": 20, "loss.swav.queue_length": 16,
             "loss.swav.queue_start_epoch": 1, "loss.swav.freeze_prototypes_steps": 3, "model.head_out_dim": 16},
    "paws": {"loss.method": "paws", "loss.suncet_weight": 0.0, "model.head_out_dim": 32,
             "data.unique_classes": True},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("methods"), classes=4, train_per_class=10, val_per_class=2)


def _overrides(root: Path, run_dir: Path, method: str) -> list[str]:
    settings = {"model.arch": "resnet18", "augment.resolution": 32, "optim.epochs": EPOCHS, "run.knn_every_epochs": 0,
                "run.checkpoint_every_steps": 4, "optim.lr": 0.2, "optim.start_lr": 0.05, "optim.final_lr": 0.02,
                "augment.views": "[{count: 2}, {count: 2, resolution: 16, crop_scale: [0.1, 0.4]}]", **METHODS[method]}
    return tiny_overrides(root, run_dir, **settings)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_killed_run_resumes_with_the_uninterrupted_losses_and_exports(method, data_root, tmp_path):
    reference = _cli(["-m", "train.pretrain", "--device", "cpu",
                      *_set_args(_overrides(data_root, tmp_path / "reference", method))])
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    expected = step_losses(tmp_path / "reference")
    losses = [expected[s] for s in sorted(expected)]
    assert len(losses) == EPOCHS * STEPS and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it trains
    assert all(int(r["skipped"]) == 0 for r in read_metrics(tmp_path / "reference") if r["skipped"])

    run_dir = tmp_path / "run"
    args = ["--device", "cpu", *_set_args(_overrides(data_root, run_dir, method))]
    killed = _cli(["-m", "tests.helpers.record_stream", str(tmp_path / "killed.jsonl"), *args],
                  env_extra={"RECORD_STEP_SLEEP": "0.3"})
    target = run_dir / f"ckpt-{8:09d}.pt"  # epoch 1, step 3: SwAV's queue full and in use since step 7
    deadline = time.time() + 240
    while not target.exists():
        assert killed.poll() is None and time.time() < deadline, killed.stdout.read() if killed.poll() else ""
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _cli(["-m", "train.pretrain", *args, "--resume", "auto"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    got = step_losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, expected)

    # the encoder loads into torchvision and gives the trained features
    import torchvision

    from train.export import load_pretrained

    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(torch.load(run_dir / "encoder_resnet18_torchvision.pth"), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    tv.fc = torch.nn.Identity()
    model, cfg, _, _ = load_pretrained(run_dir)
    assert cfg.loss.method == method
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv.eval()(x), model.features(x), rtol=1e-4, atol=1e-4)  # memory formats differ
