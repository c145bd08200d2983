"""A SIGKILLed multi-crop run resumed with ``--resume auto`` continues the DALI
and FFCV sample streams where its checkpoint left them: every epoch, put
together from the killed run (up to its checkpoint) and the resumed one, holds
each planned image once, in the order of an uninterrupted run (the shared
plan). The augmentations continue too: the resumed run's losses are an
uninterrupted run's, step for step. The runs take two view groups (2 x 16 px
and 3 x 8 px); the default two views are the first group's case."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers.reference_plan import reference_unlabeled
from tests.helpers.record_stream import read_records
from tests.pretrain_helpers import make_split_tree, read_metrics, step_losses, tiny_overrides
from tests.test_pretrain import _cli, _set_args

CLASSES, PER_CLASS, BATCH, EPOCHS = 4, 12, 8, 3
VIEWS = "[{count: 2, resolution: 16}, {count: 3, resolution: 8, crop_scale: [0.1, 0.4]}]"
STEPS = CLASSES * PER_CLASS // BATCH  # per epoch


def _data_root(backend: str, tmp_path: Path) -> Path:
    tree = make_split_tree(tmp_path / "tree", classes=CLASSES, train_per_class=PER_CLASS, val_per_class=2)
    if backend != "ffcv":
        return tree  # the DALI backend reads ImageFolder trees too
    from tools.convert_imagenet import ConvertOptions, convert

    out = tmp_path / "converted"
    convert(ConvertOptions(src=str(tree), out=str(out), splits=("train",), formats=("ffcv",),
                           labeled_fraction=0.5, jobs=1, progress=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend, kill_after_step", [("dali", STEPS), ("ffcv", 4)],
                         ids=["dali-between-epochs-multicrop", "ffcv-mid-epoch-multicrop"])
def test_killed_run_resumes_the_same_sample_stream(backend, kill_after_step, tmp_path):
    pytest.importorskip("nvidia.dali" if backend == "dali" else "ffcv")
    root = _data_root(backend, tmp_path)
    run_dir = tmp_path / "run"
    settings = {"data.backend": backend, "data.unlabeled_batch_size": BATCH, "data.num_workers": 1,
                "optim.epochs": EPOCHS, "run.knn_every_epochs": 0, "run.checkpoint_every_steps": 4,
                "augment.views": VIEWS}
    overrides = tiny_overrides(root, run_dir, **settings)
    command = ["-m", "tests.helpers.record_stream"]
    args = ["--device", "cpu", *_set_args(overrides)]
    env = {"RECORD_STEP_SLEEP": "0.4"}

    killed = _cli(command + [str(tmp_path / "killed.jsonl")] + args, env_extra=env)
    target = run_dir / f"ckpt-{kill_after_step:09d}.pt"
    deadline = time.time() + 300
    while not target.exists():
        assert killed.poll() is None and time.time() < deadline, killed.stdout.read() if killed.poll() else ""
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    resumed = _cli(command + [str(tmp_path / "resumed.jsonl")] + args + ["--resume", "auto"], env_extra=env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    first = read_records(tmp_path / "killed.jsonl")
    second = read_records(tmp_path / "resumed.jsonl")
    resume_at = (second[0]["epoch"], second[0]["step"])
    assert resume_at == divmod(kill_after_step, STEPS)  # the checkpoint's position, even at an epoch end
    stream = [r for r in first if (r["epoch"], r["step"]) < resume_at] + second
    assert [(r["epoch"], r["step"]) for r in stream] == [(e, s) for e in range(EPOCHS) for s in range(STEPS)]
    for epoch in range(EPOCHS):
        ids = [i for r in stream if r["epoch"] == epoch for i in r["ids"]]
        assert ids == [i for step in reference_unlabeled(CLASSES * PER_CLASS, BATCH, 0, 1, 0, epoch) for i in step]
        assert len(set(ids)) == len(ids) == STEPS * BATCH
    assert int(read_metrics(run_dir)[-1]["global_step"]) == EPOCHS * STEPS

    reference = _cli(["-m", "train.pretrain", "--device", "cpu",
                      *_set_args(tiny_overrides(root, tmp_path / "reference", **settings))])
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    expected, got = step_losses(tmp_path / "reference"), step_losses(run_dir)  # the resumed row wins a step logged twice
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
