"""End-to-end tests of ``python -m train.pretrain`` on tiny generated JPEG trees."""
from __future__ import annotations

import json
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
from train.data import build_loaders
from train.distributed import DistContext
from train.step import NonFiniteLossError
from train.trainer import seed_everything
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


def _poison_nt_xent(monkeypatch, factor):
    """Multiply the NT-Xent loss of the n-th call (1-based) by ``factor(n)``."""
    import train.objectives.simclr as step_module

    real = step_module.init_nt_xent_loss
    calls = {"n": 0}

    def init_poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        def poisoned(z):
            calls["n"] += 1
            return loss(z) * factor(calls["n"])

        return poisoned

    monkeypatch.setattr(step_module, "init_nt_xent_loss", init_poisoned)


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path, monkeypatch, host_sync):
    _poison_nt_xent(monkeypatch, lambda call: float("nan") if call == 5 else 1.0)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "compute.host_sync": host_sync})
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*Last good checkpoint"):
        pretrain.run(cfg, CPU)
    state, path = ckpt.load_latest(tmp_path / "run")
    assert path.name == "ckpt-000000004.pt" and state["train_state"]["global_step"] == 4
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_nonfinite_loss_skipped_when_configured(data_root, tmp_path, monkeypatch, host_sync):
    _poison_nt_xent(monkeypatch, lambda call: float("inf") if call == 2 else 1.0)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "loss.on_nonfinite": "skip",
                                                      "compute.host_sync": host_sync, "run.log_every_steps": 3})
    summary = pretrain.run(cfg, CPU)
    assert summary["skipped_steps"] == 1
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["skipped_steps"] == 1
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_skipping_gives_up_after_a_run_of_nonfinite_steps(data_root, tmp_path, monkeypatch, capsys, host_sync):
    """Before: with every step non-finite, loss.on_nonfinite=skip skipped them all and exited 0."""
    _poison_nt_xent(monkeypatch, lambda call: float("nan"))
    settings = {"run.knn_every_epochs": 0, "loss.on_nonfinite": "skip", "loss.max_skipped_in_a_row": 3,
                "compute.host_sync": host_sync, "run.log_every_steps": 5}
    assert pretrain.main(["--device", "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "run", **settings))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 3 steps in a row had a non-finite loss or gradients and were skipped "
                          "(loss.on_nonfinite=skip, loss.max_skipped_in_a_row=3): the 3 steps up to epoch 0 step 2")
    assert "raise loss.max_skipped_in_a_row" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("share, code", [(0.05, 3), (0.2, 0)])
def test_a_run_that_skipped_more_than_its_share_says_so_in_its_summary_and_exit_code(data_root, tmp_path, monkeypatch,
                                                                                      capsys, share, code):
    _poison_nt_xent(monkeypatch, lambda call: float("inf") if call == 2 else 1.0)  # 1 of the 10 steps
    settings = {"run.knn_every_epochs": 0, "loss.on_nonfinite": "skip", "loss.max_skipped_share": share}
    assert pretrain.main(["--device", "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "run", **settings))]) \
        == code
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["skipped_steps"], summary["skipped_share"]) == (1, 0.1)
    assert summary["skipped_over_limit"] is (code != 0)
    err = capsys.readouterr().err
    said = "error: 1 of 10 steps (10.0%) were non-finite and skipped (loss.on_nonfinite=skip), more than " \
           "loss.max_skipped_share=0.05"
    assert (said in err) is (code != 0), err


def test_unsynced_nonfinite_step_stops_at_the_next_check_without_a_checkpoint(data_root, tmp_path, monkeypatch):
    # NaN at global step 3; nothing is read back before the checkpoint step 4, which must not be written.
    _poison_nt_xent(monkeypatch, lambda call: float("nan") if call == 3 else 1.0)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "compute.host_sync": "log",
                                                      "run.log_every_steps": 5, "run.checkpoint_every_steps": 4})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 0 step 2: loss_ntxent=nan, "
                                                 r"loss_suncet=[\d.]+, loss=nan.*Last good checkpoint"):
        pretrain.run(cfg, CPU)
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_unsynced_run_logs_the_same_losses_as_the_eager_run(data_root, tmp_path):
    common = {"run.knn_every_epochs": 0, "optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.log_every_steps": 2}
    pretrain.run(tiny_config(data_root, tmp_path / "eager", **common), CPU)
    pretrain.run(tiny_config(data_root, tmp_path / "fast", **common, **{"compute.host_sync": "log",
                                                                        "compute.lars_foreach": True}), CPU)
    eager, fast = step_losses(tmp_path / "eager"), step_losses(tmp_path / "fast")
    assert sorted(eager) == sorted(fast) == [2, 4, 5]  # log steps and the epoch's end
    for step, loss in eager.items():
        assert fast[step] == pytest.approx(loss, rel=1e-4), step


def test_precision_is_resolved_once_per_run(data_root, tmp_path, monkeypatch):
    import train.precision as precision_module

    calls = []
    real = precision_module.cpu_has_native_bf16
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: calls.append(1) or real())
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "run.precision": "auto",
                                                      "optim.epochs": 3, "loss.supervised_epochs": 1})
    pretrain.run(cfg, CPU)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.bogus=1"], "unknown config key.*data.bogus"),
        (["optim.lr=fast"], "optim.lr must be a number"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["data.backend=tfrecord"], "data.backend must be one of"),
        (["loss.temperature=0"], "loss.temperature"),
        (["data.root=/nonexistent/imagenet"], "data.root does not exist: /nonexistent/imagenet"),
        (["data.support_classes=9"], "support_classes"),
        (["data.support_images_per_class=7"], "class 0 has 5 labeled image.*data.support_images_per_class"),
        (["data.on_bad_image=ignore"], "data.on_bad_image must be 'error' or 'skip'"),
        (["data.on_bad_image=skip", "data.backend=ffcv"],
         "data.on_bad_image=skip is not supported with data.backend=ffcv"),
        (["compute.host_sync=never"], "compute.host_sync must be .step. or .log."),
        (["compute.cuda_graphs=true"], "compute.cuda_graphs needs compute.compile=true"),
        (["compute.compile=true", "compute.cuda_graphs=true"], "compute.cuda_graphs needs a CUDA device"),
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


def test_a_resume_that_changes_the_resolution_is_recorded_in_the_checkpoints_and_the_exported_sidecar(data_root,
                                                                                                      tmp_path):
    """Before: checkpoints carried no config history, so the sidecar of an encoder trained at 16 px
    and resumed at 24 px said 24 px only."""
    from train.encoder_info import read_info

    run_dir = tmp_path / "run"
    settings = {"run.max_steps_per_epoch": 2, "run.knn_every_epochs": 0}  # 2 epochs x 2 steps, ckpt-2 and ckpt-4
    assert pretrain.main(["--device", "cpu", *_set_args(tiny_overrides(data_root, run_dir, **settings))]) == 0
    (run_dir / "ckpt-000000004.pt").unlink()  # as if stopped after the checkpoint of step 2
    (run_dir / "summary.json").unlink()
    first, _ = ckpt.load_latest(run_dir)
    assert [(h["global_step"], h["config"]["augment"]["resolution"]) for h in first["config_history"]] == [(0, 16)]
    larger = tiny_overrides(data_root, run_dir, **settings, **{"augment.resolution": 24})
    assert pretrain.main(["--device", "cpu", *_set_args(larger), "--resume", "auto"]) == 0
    state, path = ckpt.load_latest(run_dir)
    assert path.name == "ckpt-000000004.pt"
    assert [(h["global_step"], h["config"]["augment"]["resolution"]) for h in state["config_history"]] == \
        [(0, 16), (2, 24)]
    encoder = json.loads((run_dir / "summary.json").read_text())["encoder"]
    info = read_info(encoder)
    assert info.trained_resolutions == ((0, 16), (2, 24)) and info.resolution == 24


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
    """Two torchrun ranks train on exactly what one process computes from the same model and images.

    BatchNorm normalises each rank's images on their own (SyncBatchNorm does not run on a CPU), so
    the one-process reference forwards each rank's images separately, then computes both losses
    over the union, in one process: the data sharding, the views and the distributed losses must
    all agree for the first step's losses to match."""
    from train.losses import nt_xent, suncet
    from train.wiring import build_model_and_optimizer
    from train.precision import resolve_precision

    extra = {"optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": 4,
             "data.support_images_per_class": 1, "data.support_classes": 4}
    two = _cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "train.pretrain", "--device", "cpu",
                *_set_args(tiny_overrides(data_root, tmp_path / "two", **extra))])
    out, _ = two.communicate(timeout=600)
    assert two.returncode == 0, out
    first = [row for row in read_metrics(tmp_path / "two") if row["loss"]][0]  # after the step-0 row (its lr)
    assert int(first["global_step"]) == 1

    cfg = tiny_config(data_root, tmp_path / "unused", **extra)
    seed_everything(cfg.run.seed)  # as rank 0 (DDP broadcasts its weights): seed, loaders, model
    loaders = [build_loaders(cfg, rank, 2, torch.device("cpu")) for rank in range(2)]
    core, *_ = build_model_and_optimizer(cfg, CPU, resolve_precision("fp32", torch.device("cpu")))
    core.train()
    batches = []
    for loaders_r in loaders:
        loaders_r.train.set_epoch(0)
        batches.append(next(iter(loaders_r.train)))
        loaders_r.train.close()
    z = [core(torch.cat([b.view1, b.view2, b.support_images])).float() for b in batches]  # BN per rank
    n = cfg.data.unlabeled_batch_size
    views = torch.cat([zr[:n] for zr in z] + [zr[n : 2 * n] for zr in z])  # [view1 of all; view2 of all]
    support = torch.cat([zr[2 * n :] for zr in z])
    labels = torch.cat([b.support_labels for b in batches])
    with torch.no_grad():
        loss_nt, loss_sc = nt_xent(views, cfg.loss.temperature), suncet(support, labels, cfg.loss.temperature)
    assert float(first["loss_ntxent"]) == pytest.approx(loss_nt.item(), rel=1e-4)
    assert float(first["loss_suncet"]) == pytest.approx(loss_sc.item(), rel=1e-4)
    weight = (88 / 40) * 4 / 8  # paper_ratio (the default): 4 support images against 2 x 4 views per rank
    assert float(first["loss"]) == pytest.approx((loss_nt + weight * loss_sc).item(), rel=1e-4)
    # And one process with the same global batch (8 unlabeled, 4 classes x 2) sees those very views.
    one = build_loaders(tiny_config(data_root, tmp_path / "unused", **dict(
        extra, **{"data.unlabeled_batch_size": 8, "data.support_images_per_class": 2})), 0, 1, torch.device("cpu"))
    one.train.set_epoch(0)
    single = next(iter(one.train))
    one.train.close()
    for field in ("view1", "support_images"):
        rows = torch.cat([getattr(b, field) for b in batches])
        assert all(any(torch.equal(r, q) for q in getattr(single, field)) for r in rows), field


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
