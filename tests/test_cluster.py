"""What clusters do to runs (issue 25): SIGTERM before preemption writes a checkpoint and a resumed
run continues exactly, on one process and on two torchrun workers; the log rows average their
window; TensorBoard keeps the step a run resumed at; curves.png is written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.dist import free_port
from tests.helpers.record_stream import read_records
from tests.pretrain_helpers import make_split_tree, read_metrics, step_losses, tiny_overrides
from tests.test_multinode import REPO, _env, _set_args, _wait_for_no_worker
from train.preemption import PREEMPTED_EXIT

SETTINGS = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "run.checkpoint_every_steps": 100,
            "data.support_classes": 4, "data.support_images_per_class": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("cluster"))


def _command(data_root: Path, run_dir: Path, procs: int, record: Path | None, batch: int, per_class: int,
             resume: bool = False, torchrun: bool = False, workers: int = 0) -> list[str]:
    overrides = tiny_overrides(data_root, run_dir, **{**SETTINGS, "data.unlabeled_batch_size": batch,
                                                      "data.support_images_per_class": per_class,
                                                      "data.num_workers": workers})
    launcher = (["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(free_port())]
                if procs > 1 or torchrun else [])
    program = ["-m", "tests.helpers.record_stream", str(record)] if record is not None else ["-m", "train.pretrain"]
    return [sys.executable, *launcher, *program, "--device", "cpu", *_set_args(overrides),
            *(["--resume", "auto"] if resume else [])]


# (processes, under torchrun, DataLoader workers, SIGTERM to the whole process group). torchrun's agent
# passes the signal on with os.killpg to each worker's group, DataLoader workers included, as a
# group kill of a plain run does (and SLURM, which signals every process of the job step)
LAUNCHES = {"plain": (1, False, 0, False), "torchrun-2-ranks": (2, True, 0, False),
            "plain-group-2-workers": (1, False, 2, True), "torchrun-2-workers": (1, True, 2, False)}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_sigterm_mid_epoch_writes_a_checkpoint_and_the_resumed_run_gives_the_uninterrupted_losses(
        data_root, tmp_path, launch):
    procs, torchrun, workers, to_group = LAUNCHES[launch]
    batch, per_class = 8 // procs, 2 // procs  # the same global batch on 1 and 2 ranks

    def command(run_dir: Path, record: Path | None = None, resume: bool = False) -> list[str]:
        return _command(data_root, run_dir, procs, record, batch, per_class, resume, torchrun, workers)

    reference = subprocess.run(command(tmp_path / "reference"), cwd=REPO, env=_env(), capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr

    run_dir, record = tmp_path / "run", tmp_path / "stream.jsonl"
    first = subprocess.Popen(command(run_dir, record), cwd=REPO, env=dict(_env(), RECORD_STEP_SLEEP="0.4"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(read_records(record) if record.exists() else []) < 2 * procs:  # the second step is under way
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.05)
    if to_group:
        os.killpg(first.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
    else:
        first.send_signal(signal.SIGTERM)  # to the process, or to torchrun's agent, which passes it on
    out, _ = first.communicate(timeout=120)
    if torchrun:
        _wait_for_no_worker(run_dir)
    assert "killed by signal" not in out, out
    worker_codes = out.count("preempted: stopped by SIGTERM")
    assert worker_codes == 1, out  # the main rank reports it
    if not torchrun:
        assert first.returncode == PREEMPTED_EXIT, out
    checkpoints = sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
    assert len(checkpoints) == 1, checkpoints  # no regular checkpoint yet (every 100 steps): the signal's
    stopped_at = int(checkpoints[0][5:14])
    assert 1 <= stopped_at < 5, checkpoints  # mid-epoch (5 steps per epoch)

    resumed = subprocess.run(command(run_dir, resume=True), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    expected, got = step_losses(tmp_path / "reference"), step_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, expected)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ended_by", ["grace period", "second signal"])
def test_a_step_that_never_ends_is_stopped_by_the_grace_period_or_a_second_signal(data_root, tmp_path, ended_by):
    """The trainer defers SIGTERM to the end of the step: a step that never ends (here stuck in one C
    call) ignored SIGTERM for good. A second signal, or run.preempt_grace_s after the first, ends it
    at once, naming why; the last checkpoint stays whole."""
    from train import checkpoint as ckpt
    from train.preemption import FORCED_EXIT

    run_dir, record, log = tmp_path / "run", tmp_path / "stream.jsonl", tmp_path / "out.log"
    marker = tmp_path / "stream.jsonl.hanging"
    grace = 3 if ended_by == "grace period" else 600
    overrides = tiny_overrides(data_root, run_dir, **{**SETTINGS, "run.checkpoint_every_steps": 2,
                                                      "run.preempt_grace_s": grace})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.hang_run", str(record), "--device", "cpu",
                                 *_set_args(overrides)], cwd=REPO, env=dict(_env(), HANG_AT_STEP="3"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():  # steps 0-2 trained, ckpt-2 written, the fourth step hangs
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        if ended_by == "second signal":
            while "note: SIGTERM received" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == FORCED_EXIT, text
    reason = "SIGTERM came 3 s ago" if ended_by == "grace period" else "a second SIGTERM"
    assert f"error: {reason}" in text and "the last checkpoint in" in text, text
    state, path = ckpt.load_latest(run_dir)
    assert path.name == "ckpt-000000002.pt" and state["train_state"]["global_step"] == 2


def test_preempt_signals_are_checked_naming_the_key():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="run.preempt_signals: 'SIGKILL' is not a signal a process can catch"):
        load_config(None, ["run.preempt_signals=[SIGTERM, SIGKILL]"]).validate()
    load_config(None, ["run.preempt_signals=[TERM, SIGUSR2]"]).validate()


def test_log_rows_average_their_window_and_tensorboard_keeps_the_resumed_step(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import torch

    from train import pretrain
    from train.config import load_config
    from train.distributed import DistContext

    cpu = DistContext(0, 1, 0, torch.device("cpu"))
    overrides = tiny_overrides(data_root, tmp_path / "run", **{**SETTINGS, "run.log_every_steps": 5,
                                                               "run.knn_every_epochs": 1, "run.keep_checkpoints": 5})
    pretrain.run(load_config(None, overrides), cpu)
    rows = [r for r in read_metrics(tmp_path / "run") if r["loss"]]
    assert [int(r["global_step"]) for r in rows] == [5, 10]  # one row per 5-step window
    # the same run logging every step: the 5-step rows are the means of those steps' losses
    pretrain.run(load_config(None, overrides + ["run.log_every_steps=1", f"run.output_dir={tmp_path / 'every'}"]),
                 cpu)
    single = {int(r["global_step"]): float(r["loss"]) for r in read_metrics(tmp_path / "every") if r["loss"]}
    for row in rows:
        end = int(row["global_step"])
        window = [single[s] for s in range(end - 4, end + 1)]
        assert float(row["loss"]) == pytest.approx(sum(window) / 5, rel=1e-4)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume from epoch 0's checkpoint (step 5, where its kNN point was logged): TensorBoard keeps
    # step 5 and rewrites 6 onwards (purging from step 5, as before, lost epoch 0's kNN point)
    for ckpt in sorted((tmp_path / "run").glob("ckpt-*.pt")):
        if ckpt.name != "ckpt-000000005.pt":
            ckpt.unlink()
    pretrain.run(load_config(None, overrides), cpu, resume="auto")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/knn_top1")] == [5, 10]
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]


class _Killed(BaseException):
    """A kill stand-in: nothing in the run catches it."""


@pytest.mark.parametrize("killed_at_epoch", [0, 1])
def test_a_run_stopped_before_its_knn_evaluation_evaluates_it_on_resume(data_root, tmp_path, monkeypatch,
                                                                         killed_at_epoch):
    """A kill (or an end-of-epoch preemption) between an epoch's checkpoint and its kNN evaluation
    lost that epoch's point for good, and after the last epoch the summary's kNN figures too."""
    import torch

    from train import pretrain
    from train.config import load_config
    from train.distributed import DistContext

    cpu = DistContext(0, 1, 0, torch.device("cpu"))

    def knn_points(run_dir: Path) -> dict[int, tuple[str, str]]:
        return {int(r["global_step"]): (r["knn_top1"], r["knn_top5"]) for r in read_metrics(run_dir) if r["knn_top1"]}

    settings = {**SETTINGS, "run.knn_every_epochs": 1}
    reference = pretrain.run(load_config(None, tiny_overrides(data_root, tmp_path / "ref", **settings)), cpu)
    expected = knn_points(tmp_path / "ref")
    assert len(expected) == 2

    real_evaluate, calls = pretrain.evaluate_knn, []

    def killed_on_the_chosen_epoch(tr):
        calls.append(1)
        if len(calls) == killed_at_epoch + 1:
            raise _Killed
        return real_evaluate(tr)

    cfg = load_config(None, tiny_overrides(data_root, tmp_path / "run", **settings))
    monkeypatch.setattr(pretrain, "evaluate_knn", killed_on_the_chosen_epoch)
    with pytest.raises(_Killed):
        pretrain.run(cfg, cpu)
    monkeypatch.setattr(pretrain, "evaluate_knn", real_evaluate)
    summary = pretrain.run(cfg, cpu, resume="auto")
    assert knn_points(tmp_path / "run") == expected
    assert summary["knn_top1"] == pytest.approx(reference["knn_top1"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_slurm_script_checkpoints_and_requeues_on_sigusr1(data_root, tmp_path):
    """SLURM's warning before the time limit (``--signal=B:USR1@180``) reaches the batch script:
    it stops the run at a checkpoint through srun and torchrun, then requeues the job."""
    import os
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        "if [ \"$1 $2\" = \"show hostnames\" ]; then echo localhost; exit 0; fi\n"
        "[ \"$1\" = requeue ] && { echo \"requeue $2\" >> \"$SRUN_LOG.requeue\"; exit 0; }\n"
        "exit 64\n")
    (bin_dir / "srun").write_text(  # one node; forwards SIGTERM to its task, as srun does
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 \"$@\" > \"$SRUN_LOG.node0\" 2>&1 &\n"
        "child=$!\n"
        "trap 'kill -TERM $child' TERM\n"
        "wait $child; wait $child; exit $?\n")
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_JOB_ID="42", GPUS_PER_NODE="1", RDZV_PORT=str(free_port()), PYTHON=sys.executable,
               CONFIG="configs/demo.yaml", SRUN_LOG=str(tmp_path / "srun.log"))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data_root, run_dir, **{**SETTINGS, "optim.epochs": 30})
    script = subprocess.Popen(["bash", "tools/slurm/pretrain.sbatch", "--device", "cpu", *_set_args(overrides)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.csv").exists() or len(read_metrics(run_dir)) < 2:
        assert script.poll() is None and time.time() < deadline, script.communicate()[0]
        time.sleep(0.1)
    script.send_signal(signal.SIGUSR1)
    out, _ = script.communicate(timeout=120)
    assert script.returncode == 0, out
    assert (tmp_path / "srun.log.requeue").read_text() == "requeue 42\n"
    assert "preempted: stopped by SIGTERM" in (tmp_path / "srun.log.node0").read_text()
    steps = [int(p.name[5:14]) for p in run_dir.glob("ckpt-*.pt")]
    assert steps and max(steps) < 30 * 5  # stopped early, at a checkpoint of its own


def _checkpoint_of(cfg, world: int) -> dict:
    from train.config import config_to_dict
    from train.resume import global_batch

    return {"config": config_to_dict(cfg), "world_size": world, "global_batch": global_batch(cfg, world)}


def test_the_global_batch_survives_every_resume_whatever_the_command_says(capsys):
    """2 -> 1 -> 1 -> 2 ranks, each resumed with the same command (64 per rank): the global batch
    stays 128 unlabeled images and 4 classes x 8 support images; the second resume on one rank
    (the case that halved the batch) says which value it overrode."""
    from train.config import load_config
    from train.resume import global_batch, resumed_config

    command = ["data.unlabeled_batch_size=64", "data.support_classes=4", "data.support_images_per_class=4"]
    cfg, world = load_config(None, command), 2
    expected = global_batch(cfg, 2)
    assert expected == {"unlabeled_images": 128, "support_classes": 4, "support_images_per_class": 8, "world_size": 2}
    for new_world in (1, 1, 2):
        cfg = resumed_config(_checkpoint_of(cfg, world), load_config(None, command), new_world)
        world = new_world
        got = global_batch(cfg, world)
        assert {k: v for k, v in got.items() if k != "world_size"} == \
            {k: v for k, v in expected.items() if k != "world_size"}, (world, got)
    err = capsys.readouterr().err
    assert "data.unlabeled_batch_size=64 on the command line, 128 from the checkpoint's global batch" in err
    assert "other data settings" not in err  # nothing else changed: nothing else named


def test_a_resume_names_each_changed_key_and_refuses_a_new_schedule(capsys):
    from train.config import ConfigError, load_config
    from train.resume import resumed_config

    saved = load_config(None, ["data.num_workers=4", "optim.epochs=100"])
    now = load_config(None, ["data.num_workers=2", "data.labeled_fraction=0.2", "optim.epochs=100",
                             "optim.momentum=0.8"])
    resumed_config(_checkpoint_of(saved, 1), now, 1)
    err = capsys.readouterr().err
    assert "data.num_workers: 4 -> 2" in err and "data.labeled_fraction: 0.1 -> 0.2" in err
    assert "optim.momentum: 0.9 -> 0.8" in err
    longer = load_config(None, ["data.num_workers=4", "optim.epochs=200"])
    with pytest.raises(ConfigError, match=r"the learning-rate schedule differs from the checkpoint's "
                                          r"\(optim.epochs: 100 -> 200\); .* --allow-schedule-change"):
        resumed_config(_checkpoint_of(saved, 1), longer, 1)
    cfg = resumed_config(_checkpoint_of(saved, 1), longer, 1, allow_schedule_change=True)
    assert cfg.optim.epochs == 200 and "optim.epochs: 100 -> 200" in capsys.readouterr().err
