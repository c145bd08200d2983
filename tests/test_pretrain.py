"""End-to-end tests of ``python -m train.pretrain`` on tiny generated JPEG trees."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import build_model
from tests.pretrain_helpers import make_split_tree, read_metrics, step_losses, tiny_config, tiny_overrides
from train import checkpoint as ckpt
from train import pretrain
from train.distributed import DistContext
from train.step import NonFiniteLossError
from tests.helpers.dist import free_port

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("data"))


def _cli(args: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_tiny_run_writes_everything(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run")
    summary = pretrain.run(cfg, CPU)
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    steps = [int(r["global_step"]) for r in rows if r["loss"]]
    assert steps == list(range(1, summary["global_step"] + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows if r["loss"])
    assert all(float(r["loss_suncet"]) > 0 for r in rows if r["loss"])
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())
    assert 0.0 <= summary["knn_top1"] <= 100.0
    # Epoch-end checkpoint: the next epoch, step 0.
    state, _ = ckpt.load_latest(run_dir)
    assert state["train_state"]["epoch"] == 2 and state["train_state"]["step"] == 0
    # Encoder export loads back into the same architecture.
    exported = torch.load(run_dir / "encoder_resnet18-small.pth", weights_only=True)
    fresh = build_model("resnet18-small", 32, 16)
    fresh.encoder.load_state_dict(exported)


def test_suncet_switched_off_after_supervised_epochs(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", **{"loss.supervised_epochs": 1, "run.knn_every_epochs": 0})
    pretrain.run(cfg, CPU)
    rows = [r for r in read_metrics(tmp_path / "run") if r["loss"]]
    assert all(r["loss_suncet"] for r in rows if int(r["epoch"]) == 0)
    assert not any(r["loss_suncet"] for r in rows if int(r["epoch"]) == 1)


@pytest.mark.slow
def test_loss_decreases_on_learnable_toy_set(tmp_path):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2, size=24, seed=3)
    cfg = tiny_config(root, tmp_path / "run", **{"optim.epochs": 12, "optim.lr": 0.3, "optim.start_lr": 0.1,
                                                  "run.knn_every_epochs": 0, "augment.crop_scale": "[0.5, 1.0]"})
    pretrain.run(cfg, CPU)
    losses = list(step_losses(tmp_path / "run").values())
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.1, (first, last)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path, monkeypatch):
    import train.step as step_module

    real = step_module.nt_xent
    calls = {"n": 0}

    def poisoned(z, temperature):
        calls["n"] += 1
        loss = real(z, temperature)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(step_module, "nt_xent", poisoned)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0})
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*Last good checkpoint"):
        pretrain.run(cfg, CPU)
    state, path = ckpt.load_latest(tmp_path / "run")
    assert path.name == "ckpt-000000004.pt" and state["train_state"]["global_step"] == 4
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]


def test_nonfinite_loss_skipped_when_configured(data_root, tmp_path, monkeypatch):
    import train.step as step_module

    real = step_module.nt_xent
    calls = {"n": 0}

    def poisoned(z, temperature):
        calls["n"] += 1
        return real(z, temperature) * (float("inf") if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(step_module, "nt_xent", poisoned)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "loss.on_nonfinite": "skip"})
    summary = pretrain.run(cfg, CPU)
    assert summary["skipped_steps"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.bogus=1"], "unknown config key.*data.bogus"),
        (["optim.lr=fast"], "optim.lr must be a number"),
        (["optim.lr=-1"], "optim.lr must be finite and >= 0"),
        (["data.backend=tfrecord"], "data.backend must be one of"),
        (["loss.temperature=0"], "loss.temperature"),
        (["data.root=/nonexistent/imagenet"], "data.root does not exist: /nonexistent/imagenet"),
        (["data.support_classes=9"], "support_classes"),
        (["data.support_images_per_class=7"], "class 0 has 5 labeled image.*data.support_images_per_class"),
        (["data.on_bad_image=ignore"], "data.on_bad_image must be 'error' or 'skip'"),
        (["data.on_bad_image=skip", "data.backend=ffcv"],
         "data.on_bad_image=skip is not supported with data.backend=ffcv"),
    ],
)
def test_bad_configs_fail_naming_the_key(data_root, tmp_path, capsys, overrides, message):
    argv = ["--device", "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "run")), *_set_args(overrides)]
    assert pretrain.main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err), message


def test_empty_class_folder_and_bad_labeled_list(tmp_path, capsys):
    root = make_split_tree(tmp_path / "data", classes=3, train_per_class=6, val_per_class=2)
    (root / "train" / "n_empty").mkdir()
    argv = ["--device", "cpu", *_set_args(tiny_overrides(root, tmp_path / "run", **{"data.support_classes": 2}))]
    assert pretrain.main(argv) == 2
    assert "n_empty holds no image files" in capsys.readouterr().err
    (root / "train" / "n_empty").rmdir()
    listing = tmp_path / "10percent.txt"
    listing.write_text("n00000000_0.JPEG\nn00000001_1.JPEG\nmissing_42.JPEG\n")
    argv += ["--set", f"data.labeled_list={listing}"]
    assert pretrain.main(argv) == 2
    assert "missing_42.JPEG" in capsys.readouterr().err


def test_fresh_run_refuses_directory_with_checkpoints(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt-000000002.pt").write_bytes(b"x")
    argv = ["--device", "cpu", *_set_args(tiny_overrides(data_root, run_dir))]
    assert pretrain.main(argv) == 2
    assert "--resume auto" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(data_root, tmp_path):
    common = ["-m", "train.pretrain", "--device", "cpu"]
    extra = {"optim.epochs": 3, "run.knn_every_epochs": 0, "run.checkpoint_every_steps": 3}
    reference = _cli(common + _set_args(tiny_overrides(data_root, tmp_path / "ref", **extra)))
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    expected = step_losses(tmp_path / "ref")

    killed_dir = tmp_path / "killed"
    args = common + _set_args(tiny_overrides(data_root, killed_dir, **extra))
    proc = _cli(args)
    deadline = time.time() + 300
    while not (killed_dir / "ckpt-000000003.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli(args + ["--resume", "auto"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    got = step_losses(killed_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step



@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(data_root, tmp_path):
    extra = {"optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": 4,
             "data.support_images_per_class": 1, "data.support_classes": 4}
    two = _cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "train.pretrain", "--device", "cpu",
                *_set_args(tiny_overrides(data_root, tmp_path / "two", **extra))])
    out, _ = two.communicate(timeout=600)
    assert two.returncode == 0, out
    # One process with the same global batch: 2 x 4 unlabeled, 4 classes x 2 images.
    extra_one = dict(extra, **{"data.unlabeled_batch_size": 8, "data.support_images_per_class": 2})
    pretrain.run(tiny_config(data_root, tmp_path / "one", **extra_one), CPU)
    two_losses, one_losses = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert sorted(two_losses) == sorted(one_losses)
    # Same images, views and weights; only BatchNorm statistics differ (per rank
    # on CPU, where SyncBatchNorm is unavailable), hence the tolerance.
    first = min(one_losses)
    assert two_losses[first] == pytest.approx(one_losses[first], rel=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_uses_fp16_autocast_and_grad_scaler(data_root, tmp_path):
    from train.distributed import choose_device

    ctx = DistContext(0, 1, 0, choose_device("auto", 0))
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.precision": "auto", "data.num_workers": 2})
    summary = pretrain.run(cfg, ctx)
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["scaler"]["scale"] > 0  # GradScaler was enabled and saved
    assert all(math.isfinite(v) for v in step_losses(tmp_path / "run").values())
    assert summary["global_step"] > 0
