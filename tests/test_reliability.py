"""Failure modes of a run: disk errors while saving, kills during a checkpoint
write, damaged checkpoints, bad files at training time, non-finite gradients,
and a killed 2-process run resumed with --resume auto."""
from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import atomic_write
from pipelines.bad_images import BadImageError, ReplacementPools
from train.data import build_loaders
from tests.pretrain_helpers import make_split_tree, read_metrics, step_losses, tiny_config, tiny_overrides
from tests.helpers.dist import free_port
from tests.test_pretrain import CPU, REPO, _cli, _set_args
from train import checkpoint as ckpt
from train import pretrain
from train.step import NonFiniteLossError


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("data"), classes=4, train_per_class=8, val_per_class=2)


def test_disk_full_while_saving_keeps_previous_checkpoint(data_root, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0})
    with pytest.raises(ckpt.CheckpointError, match="ckpt-000000004.pt.*No space left"):
        pretrain.run(cfg, CPU)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.suffix == ".pt" or p.name.startswith(".tmp"))
    assert names == ["ckpt-000000002.pt"]
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["global_step"] == 2


def test_read_only_run_directory_while_saving_keeps_previous_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    import tempfile

    real_mkstemp = tempfile.mkstemp
    calls = {"n": 0}

    def read_only_after_first(*args, **kwargs):
        if not kwargs.get("prefix", "").startswith(".tmp-ckpt-"):
            return real_mkstemp(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:  # the file system turns read-only after the first checkpoint
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(atomic_write.tempfile, "mkstemp", read_only_after_first)
    argv = ["--device", "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0}))]
    assert pretrain.main(argv) == 1  # checkpoints every 2 steps: the second save fails
    assert "could not write checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(atomic_write.tempfile, "mkstemp", real_mkstemp)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["ckpt-000000002.pt"]
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["global_step"] == 2


WRITER = """
import sys, torch
from train.checkpoint import save_checkpoint
run_dir = sys.argv[1]
big = torch.zeros(64 * 1024 * 1024 // 4)
for step in range(1, 1000):
    save_checkpoint({"step": step, "payload": big}, run_dir, step, keep=2)
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_never_leaves_a_partial_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], cwd=REPO)
        deadline = time.time() + 120
        # Wait until a checkpoint exists and the next one is being written, then kill.
        while not (ckpt.list_checkpoints(run_dir) and any(p.name.startswith(".tmp-") for p in run_dir.iterdir())):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in ckpt.list_checkpoints(run_dir):
            state = torch.load(path, weights_only=True)  # every named checkpoint is complete
            assert f"{state['step']:09d}" in path.name
        state, path = ckpt.load_latest(run_dir)
        assert path == ckpt.list_checkpoints(run_dir)[-1]
        for leftover in run_dir.glob(".tmp-*"):
            leftover.unlink()


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1, keep=3)
    ckpt.save_checkpoint({"step": 2}, tmp_path, 2, keep=3)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:20])
    state, path = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-000000001.pt"
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 2])
def test_image_removed_after_indexing_fails_naming_the_file(tmp_path, workers):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    cfg = tiny_config(root, tmp_path / "run", **{"data.num_workers": workers})
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    victim = root / "train" / "n00000002" / "n00000002_3.JPEG"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated after the listing was made
    loaders.train.set_epoch(0)
    start = time.time()
    with pytest.raises(BadImageError, match="n00000002_3.JPEG"):
        for _ in loaders.train:
            pass
    assert time.time() - start < 60


def test_replacement_pools_follow_dataset_order_within_the_class():
    labels = np.array([0, 1, 0, 1, 0, 0, 1])
    pools = ReplacementPools.by_class(labels, members=np.array([0, 2, 3, 5, 6]))
    assert pools.after(2).tolist() == [5, 0]  # class 0 labeled: 0, 2, 5 (4 is not labeled)
    assert pools.after(6).tolist() == [3]
    with pytest.raises(ValueError):
        pools.after(4)
    assert ReplacementPools.single(4).after(3).tolist() == [0, 1, 2]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_replaces_and_names_bad_images(tmp_path, workers):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    cfg = tiny_config(root, tmp_path / "run", **{"data.num_workers": workers, "data.on_bad_image": "skip",
                                                 "data.labeled_fraction": 0.5})
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    loader = loaders.train
    index = loader.unlabeled.dataset.source.paths
    labeled = set(loader.plan.support.labeled.tolist())
    # One unlabeled-only image and labeled images of two classes, no two adjacent in a pool.
    victims = {min(set(range(len(index))) - labeled)}
    victims |= {min(i for i in labeled if f"n0000000{c}" in index[i] and i - 1 not in victims) for c in (2, 3)}
    for i in victims:
        _truncate(Path(index[i]))
    loader.set_epoch(0)
    order = loader.plan.unlabeled.batches(0).reshape(-1)
    support_ids = [i for batch in loader.support_batches for i, _ in batch]
    loader.set_epoch(0)
    batches = list(loader)
    names = [name for b in batches for name in b.bad_images]
    expected = sum(int(i in victims) for i in order) + sum(int(i in victims) for i in support_ids)
    assert len(names) == expected and expected > 0
    assert all(any(Path(index[i]).name in name for i in victims) for name in names)
    seen = torch.cat([b.sample_ids for b in batches]).tolist()
    assert not set(seen) & set(victims)
    for i in victims:  # an unlabeled victim is replaced, in its slot, by the next image in dataset order
        assert seen[order.tolist().index(i)] == i + 1
    for b in batches:  # the support set keeps C x K with its labels
        counts = torch.bincount(b.support_labels, minlength=4)
        assert sorted(counts.tolist()) == [2, 2, 2, 2]


def test_skip_mode_counts_bad_images_in_the_run(data_root, tmp_path, capsys):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    victim = root / "train" / "n00000001" / "n00000001_2.JPEG"
    _truncate(victim)
    cfg = tiny_config(root, tmp_path / "run", **{"run.knn_every_epochs": 0, "data.on_bad_image": "skip",
                                                 "optim.epochs": 1, "optim.warmup_epochs": 0.5})
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    loader.set_epoch(0)
    expected = sum(len(b.bad_images) for b in loader)
    summary = pretrain.run(cfg, CPU)
    assert summary["bad_images"] == expected > 0
    assert int(read_metrics(tmp_path / "run")[-1]["bad_images"]) == expected
    assert capsys.readouterr().err.count("n00000001_2.JPEG") == expected
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["bad_images"] == expected


def test_skip_mode_gives_up_when_every_image_is_bad(tmp_path):
    root = make_split_tree(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2)
    cfg = tiny_config(root, tmp_path / "run", **{"data.on_bad_image": "skip", "data.support_classes": 2})
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    for path in (root / "train").rglob("*.JPEG"):
        _truncate(path)
    loader.set_epoch(0)
    with pytest.raises(BadImageError, match="8 images in a row could not be read"):
        next(iter(loader))


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_nonfinite_gradients_stop_the_run(data_root, tmp_path, monkeypatch, host_sync):
    from train import wiring

    real_build = wiring.build_model
    seen = {"n": 0}

    def build_with_poisoned_grad(*args, **kwargs):
        model = real_build(*args, **kwargs)
        weight = next(model.head.parameters())

        def hook(grad):
            seen["n"] += 1
            return grad * float("nan") if seen["n"] == 3 else grad

        weight.register_hook(hook)
        return model

    monkeypatch.setattr(wiring, "build_model", build_with_poisoned_grad)
    cfg = tiny_config(data_root, tmp_path / "run", **{"run.knn_every_epochs": 0, "compute.host_sync": host_sync})
    with pytest.raises(NonFiniteLossError, match="non-finite gradients at epoch 0 step 2"):
        pretrain.run(cfg, CPU)
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["global_step"] == 2
    for value in state["model"].values():
        assert torch.isfinite(value.float()).all()


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_matches_uninterrupted(data_root, tmp_path):
    extra = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0,
             "data.unlabeled_batch_size": 4, "data.support_images_per_class": 1, "run.checkpoint_every_steps": 3}

    def launch(run_dir: Path, resume: bool) -> subprocess.Popen:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "train.pretrain", "--device", "cpu", *_set_args(tiny_overrides(data_root, run_dir, **extra))]
        return _cli(args + (["--resume", "auto"] if resume else []), start_new_session=True)

    ref = launch(tmp_path / "ref", False)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    killed = launch(tmp_path / "killed", False)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "ckpt-000000003.pt").exists():
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.05)
    import os

    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both ranks
    killed.wait()
    resumed = launch(tmp_path / "killed", True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    expected, got = step_losses(tmp_path / "ref"), step_losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_killed_loader_worker_fails_the_run_within_seconds(tmp_path):
    import os

    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    cfg = tiny_config(root, tmp_path / "run", **{"data.num_workers": 2, "data.unlabeled_batch_size": 4})
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    workers = loader.unlabeled._iterator._workers  # persistent workers of the unlabeled stream
    start = time.time()
    try:
        dead = rf"\(pid.*{workers[0].pid}.*(killed by signal|exited unexpectedly)"
        with pytest.raises(RuntimeError, match=rf"DataLoader worker ({dead}|of the unlabeled stream died)"):
            os.kill(workers[0].pid, signal.SIGKILL)  # torch may raise from its SIGCHLD handler right here
            for _ in batches:
                pass
        assert time.time() - start < 30
    finally:  # unregister the workers first, or torch's SIGCHLD handler fires again while they stop
        from torch.utils.data._utils import signal_handling

        for dl in (loader.unlabeled, loader.support):
            signal_handling._remove_worker_pids(id(dl._iterator))
            dl._iterator._worker_pids_set = False
        for dl in (loader.unlabeled, loader.support):
            dl._iterator._shutdown_workers()


@pytest.mark.slow
def test_bad_image_on_one_rank_ends_the_two_process_run_naming_it(tmp_path):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    victim = root / "train" / "n00000003" / "n00000003_5.JPEG"
    _truncate(victim)
    extra = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": 4,
             "data.support_images_per_class": 1}
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "train.pretrain", "--device", "cpu", *_set_args(tiny_overrides(root, tmp_path / "run", **extra))]
    proc = _cli(args, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)  # the other rank must not wait in a collective for its timeout
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"cannot read image {victim}" in out


def test_jpeg_completeness_check_reads_past_thumbnails_and_trailers():
    import io

    from PIL import Image

    from pipelines.encoded_images import jpeg_is_complete

    rng = np.random.default_rng(0)
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, "JPEG", progressive=progressive)
        jpeg = buf.getvalue()
        assert jpeg_is_complete(jpeg)
        assert jpeg_is_complete(jpeg + bytes(5000))  # metadata or padding after the image
        assert not jpeg_is_complete(jpeg[: len(jpeg) // 2])
        # An APP1 segment holding a whole thumbnail (its own end marker) right after the start marker.
        thumb = b"Exif\x00\x00" + jpeg[:200] + b"\xff\xd9"
        with_thumb = jpeg[:2] + b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb + jpeg[2:]
        assert jpeg_is_complete(with_thumb)
        assert not jpeg_is_complete(with_thumb[: len(with_thumb) - len(jpeg) // 3])
        assert not jpeg_is_complete(b"not a jpeg")


@pytest.mark.slow
def test_skip_mode_counts_bad_images_of_every_rank(tmp_path):
    root = make_split_tree(tmp_path / "data", classes=4, train_per_class=8, val_per_class=2)
    for name in ("n00000001/n00000001_2.JPEG", "n00000003/n00000003_6.JPEG"):
        _truncate(root / "train" / name)
    extra = {"optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": 4,
             "data.support_images_per_class": 1, "data.on_bad_image": "skip"}
    overrides = tiny_overrides(root, tmp_path / "run", **extra)
    from train.config import load_config

    expected = 0
    for rank in range(2):  # what each rank's loader replaces in the epoch
        loader = build_loaders(load_config(None, overrides), rank, 2, torch.device("cpu")).train
        loader.set_epoch(0)
        expected += sum(len(b.bad_images) for b in loader)
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "train.pretrain", "--device", "cpu", *_set_args(overrides)]
    proc = _cli(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert expected > 0 and out.count("skipped unreadable image") == expected
    assert int(read_metrics(tmp_path / "run")[-1]["bad_images"]) == expected
