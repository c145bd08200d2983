"""Several torchrun agents (simulated nodes) on one machine, the SLURM script, and sharding
over any number of ranks (issue 16). gloo on the CPU; marked slow where processes train."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.dist import free_port
from tests.helpers.record_stream import read_records
from tests.pretrain_helpers import make_split_tree, step_losses, tiny_overrides
from train.config import load_config
from train.data import build_loaders

REPO = Path(__file__).resolve().parents[1]
EXTRA = {"optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": 4,
         "data.support_images_per_class": 1, "data.support_classes": 4}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_two_agents_with_c10d_rendezvous_train_like_one_agent_with_two_workers(data_root, tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(
        _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                  "-m", "train.pretrain", "--device", "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "two",
                                                                                       **EXTRA))),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    one = subprocess.run(
        _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "train.pretrain", "--device",
                  "cpu", *_set_args(tiny_overrides(data_root, tmp_path / "one", **EXTRA))),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two, single = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert sorted(two) == sorted(single) and len(two) == 5
    for step, loss in single.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), step


_THREADS_LEFT = """
import os, sys
from train.pretrain import main
rc = main(sys.argv[1:])
names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
left = sorted(n for n in names if "gloo" in n)
print(f"rank {os.environ['RANK']} returned {rc}; gloo threads left: {left}", flush=True)
sys.exit(rc or (3 if left else 0))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_a_finished_worker_has_ended_the_process_groups_threads(data_root, tmp_path):
    """A gloo thread still running when the interpreter shuts down now and then aborted a worker
    that had finished (SIGABRT, torchrun reporting the job failed): none may be left when
    ``main`` returns."""
    script = tmp_path / "worker.py"
    script.write_text(_THREADS_LEFT)
    done = subprocess.run(
        _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), str(script), "--device", "cpu",
                  *_set_args(tiny_overrides(data_root, tmp_path / "run", **EXTRA))),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("returned 0; gloo threads left: []") == 2, out


def _stand_ins(bin_dir: Path, hosts: list[str]) -> None:
    """``scontrol show hostnames`` prints ``hosts``; ``srun`` starts its command once per node with
    SLURM's per-task variables and fails if any copy fails (as --kill-on-bad-exit would)."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\n[ \"$1 $2\" = \"show hostnames\" ] || exit 64\n"
                                      + "".join(f"echo {h}\n" for h in hosts))
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "echo \"srun $*\" >> \"$SRUN_LOG\"\n"
        "while [[ $1 == --* ]]; do shift; done\n"  # srun's own options
        "pids=()\n"
        "for ((n = 0; n < SLURM_NNODES; n++)); do\n"
        "  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 \"$@\" > \"$SRUN_LOG.node$n\" 2>&1 & pids+=($!)\n"
        "done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=1; done; exit $rc\n")
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_the_slurm_script_trains_on_two_simulated_nodes(data_root, tmp_path):
    _stand_ins(tmp_path / "bin", ["localhost", "localhost"])
    env = dict(_env(), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", SLURM_JOB_ID="42", GPUS_PER_NODE="1", RDZV_PORT=str(free_port()),
               PYTHON=sys.executable, CONFIG="configs/demo.yaml", SRUN_LOG=str(tmp_path / "srun.log"))
    overrides = tiny_overrides(data_root, tmp_path / "run", **EXTRA)
    done = subprocess.run(["bash", "tools/slurm/pretrain.sbatch", "--device", "cpu", *_set_args(overrides)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("srun.log*")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    call = (tmp_path / "srun.log").read_text()
    assert "--kill-on-bad-exit=1" in call and "--rdzv-endpoint localhost:" in call and "--nnodes 2" in call
    assert "--resume auto" in call and "--max-restarts 3" in call
    assert len(step_losses(tmp_path / "run")) == 5  # 40 images, global batch 8


# --------------------------------------------------------------------------- sharding proof


def _cfg(root: Path, backend: str, world: int, batch: int = 4):
    return load_config(None, tiny_overrides(root, root / "unused", **{
        "data.backend": backend, "data.unlabeled_batch_size": batch, "data.support_classes": 2,
        "data.support_images_per_class": 2, "data.num_workers": 0 if backend == "torch" else 1,
        "run.knn_every_epochs": 0}))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_root):
    out = {"torch": data_root, "dali": data_root}
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return out
    from tools.convert_imagenet import ConvertOptions, convert
    converted = tmp_path_factory.mktemp("ffcv")
    convert(ConvertOptions(src=str(data_root), out=str(converted), splits=("train",), formats=("ffcv",),
                           labeled_fraction=0.5, jobs=1, progress=False))
    out["ffcv"] = converted
    return out


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_epoch_over_any_number_of_ranks_sees_every_image_once(sources, backend, world):
    if backend not in sources or (backend == "dali" and not _has("nvidia.dali")):
        pytest.skip(f"{backend} not installed")
    root = sources[backend]
    loaders = [build_loaders(_cfg(root, backend, world), rank, world, torch.device("cpu")) for rank in range(world)]
    n, global_batch = 40, 4 * world
    seen, labels_ok = [], True
    for rank, loaders_r in enumerate(loaders):
        loader = loaders_r.train
        assert len(loader) == n // global_batch
        loader.set_epoch(1)
        for batch in loader:
            seen += batch.sample_ids.tolist()
            assert batch.support_images.shape[0] == 2 * 2  # C x K, one view each
            blocks = batch.support_labels.view(2, 2)
            labels_ok &= bool((blocks == blocks[:, :1]).all()) and len(set(blocks[:, 0].tolist())) == 2
        loader.close()
    assert labels_ok
    assert len(seen) == len(set(seen)) == (n // global_batch) * global_batch  # once each, remainder dropped
    assert set(seen) <= set(range(n))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_support_labels_match_the_images_on_every_rank(data_root):
    """The labels a rank's loader yields are those of the images the plan gave it, class-major."""
    for world in (2, 3):
        for rank in range(world):
            loader = build_loaders(_cfg(data_root, "torch", world), rank, world, torch.device("cpu")).train
            index_labels = loader.support.dataset.labels
            loader.set_epoch(1)
            for step, batch in enumerate(loader):
                ids = loader.plan.support.batch(loader.plan.global_step(1, step))
                assert batch.support_labels.tolist() == index_labels[ids].tolist()  # one view per image
                blocks = batch.support_labels.view(2, 2)
                assert (blocks == blocks[:, :1]).all()
            loader.close()


def test_no_two_ranks_produce_identical_support_views(tmp_path):
    """Each class has exactly K labeled images, so both ranks draw the same images: their views must differ."""
    root = make_split_tree(tmp_path / "tree", classes=4, train_per_class=4)
    cfg = load_config(None, tiny_overrides(root, tmp_path / "unused", **{
        "data.unlabeled_batch_size": 4, "data.support_classes": 2, "data.support_images_per_class": 2,
        "data.labeled_fraction": 0.5, "data.num_workers": 0, "run.knn_every_epochs": 0}))
    loaders = [build_loaders(cfg, rank, 2, torch.device("cpu")).train for rank in range(2)]
    ids = [loader.plan.support.batch(0) for loader in loaders]
    assert sorted(ids[0].tolist()) == sorted(ids[1].tolist())  # the same images on both ranks
    views = []
    for loader in loaders:
        loader.set_epoch(0)
        views.append(next(iter(loader)).support_images)
        loader.close()
    for a in views[0]:
        assert not any(torch.equal(a, b) for b in views[1])



def test_torch_support_views_are_distinct_views_of_the_planned_images(tmp_path):
    """data.support_views=2: each planned support image arrives twice, with its label, as two
    different views (the second view is SuNCEt's extra positive, RESULTS.md)."""
    root = make_split_tree(tmp_path / "tree", classes=4, train_per_class=4)
    cfg = load_config(None, tiny_overrides(root, tmp_path / "unused", **{
        "data.unlabeled_batch_size": 4, "data.support_classes": 2, "data.support_images_per_class": 2,
        "data.support_views": 2, "data.labeled_fraction": 0.5, "data.num_workers": 0, "run.knn_every_epochs": 0}))
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    loader.set_epoch(0)
    batch = next(iter(loader))
    loader.close()
    ids = loader.plan.support.batch(0)
    assert batch.support_images.shape[0] == 2 * 2 * 2  # C x K x V
    pairs = batch.support_images.view(len(ids), 2, *batch.support_images.shape[1:])
    assert all(not torch.equal(a, b) for a, b in pairs)
    labels = batch.support_labels.view(len(ids), 2)
    assert labels[:, 1].tolist() == labels[:, 0].tolist() == loader.support.dataset.labels[ids].tolist()

# --------------------------------------------------------------------------- another number of ranks


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_a_global_step_holds_the_same_images_on_one_or_two_ranks(sources, backend):
    if backend not in sources or (backend == "dali" and not _has("nvidia.dali")):
        pytest.skip(f"{backend} not installed")
    root = sources[backend]
    one = build_loaders(_cfg(root, backend, 1, batch=8), 0, 1, torch.device("cpu")).train
    two = [build_loaders(_cfg(root, backend, 2, batch=4), r, 2, torch.device("cpu")).train for r in range(2)]
    assert len(one) == len(two[0]) == 5
    one.set_epoch(2, 1)
    steps_one = [sorted(b.sample_ids.tolist()) for b in one]
    for loader in two:
        loader.set_epoch(2, 1)
    steps_two = [sorted(a.sample_ids.tolist() + b.sample_ids.tolist()) for a, b in zip(*two)]
    assert steps_one == steps_two and len(steps_one) == 4
    for loader in [one, *two]:
        loader.close()


def _recorded_run(data_root: Path, run_dir: Path, record: Path, procs: int, batch: int, images: int,
                  resume: bool, sleep: str = "0") -> subprocess.Popen:
    overrides = tiny_overrides(data_root, run_dir, **{
        "optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.unlabeled_batch_size": batch,
        "data.support_classes": 4, "data.support_images_per_class": images, "run.checkpoint_every_steps": 3})
    launcher = (["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(free_port())]
                if procs > 1 else [])
    args = [sys.executable, *launcher, "-m", "tests.helpers.record_stream", str(record), "--device", "cpu",
            *_set_args(overrides), *(["--resume", "auto"] if resume else [])]
    return subprocess.Popen(args, cwd=REPO, env=dict(_env(), RECORD_STEP_SLEEP=sleep), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_no_worker(run_dir: Path, timeout: float = 30.0) -> None:
    """Wait until no process trains into ``run_dir`` (its workers see their agent die)."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(str(run_dir))]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers still training into {run_dir} after their agent died: {alive}")


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_keeps_the_global_batch_and_the_stream(data_root, tmp_path, before,
                                                                                   after):
    import signal
    import time
    global_batch, per_class = 8, 2  # 8 unlabeled images and 2 images of each support class per step, in all
    run_dir, record = tmp_path / "run", tmp_path / "stream.jsonl"
    first = _recorded_run(data_root, run_dir, record, before, global_batch // before, per_class // before,
                          resume=False, sleep="0.5")
    deadline = time.time() + 300
    while not (run_dir / "ckpt-000000003.pt").exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # the process (torchrun's agent, or the single worker) dies at once
    first.wait()
    _wait_for_no_worker(run_dir)  # torchrun's workers, in sessions of their own, die with their agent
    # The checkpoint is at global step 3; what ran after it is redone by the resumed run.
    kept = [r for r in read_records(record) if r["epoch"] * 5 + r["step"] < 3]
    record.write_text("".join(__import__("json").dumps(r) + "\n" for r in kept))
    second = _recorded_run(data_root, run_dir, record, after, global_batch // before, per_class // before,
                           resume=True)  # the old per-rank sizes: the run rescales them itself
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert f"resuming a {before}-rank run on {after} rank(s)" in out
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 11))  # 2 epochs of 40 // 8 steps, as uninterrupted
    for epoch in range(2):
        ids = [i for r in read_records(record) if r["epoch"] == epoch for i in r["ids"]]
        assert len(ids) == len(set(ids)) == 40  # every image once: none repeated or skipped across the change


# --------------------------------------------------------------------------- elastic restart


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if pid.isdigit() and str(run_dir) in _cmdline(pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
                return int(pid)
    return None


def test_a_resumed_run_warns_when_its_suncet_weight_changed(capsys):
    """A checkpoint from before loss.suncet_weight_rule existed trained with the weight as given
    ("fixed"); resumed under today's default (paper_ratio) its weight would change, which is said."""
    from train.config import config_to_dict
    from train.resume import resumed_config

    shapes = ["data.unlabeled_batch_size=64", "data.support_classes=10", "data.support_images_per_class=2"]
    old = config_to_dict(load_config(None, shapes))
    del old["loss"]["suncet_weight_rule"]
    resumed_config({"config": old, "world_size": 1}, load_config(None, shapes), 1)
    err = capsys.readouterr().err
    assert "SuNCEt weight is now 0.3438" in err and "trained with 1 (" in err and "suncet_weight_rule=fixed" in err
    resumed_config({"config": old, "world_size": 1}, load_config(None, [*shapes, "loss.suncet_weight_rule=fixed"]), 1)
    new = config_to_dict(load_config(None, shapes))  # written with the rule: the same weight on 2 ranks
    resumed_config({"config": new, "world_size": 1}, load_config(None, shapes), 2)
    assert "SuNCEt weight" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_resumes_and_finishes_like_an_uninterrupted_run(data_root,
                                                                                                  tmp_path):
    import signal
    import time
    extra = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0,
             "data.unlabeled_batch_size": 4, "data.support_images_per_class": 1, "run.checkpoint_every_steps": 3}

    def launch(run_dir: Path, *torchrun: str) -> subprocess.Popen:
        return subprocess.Popen(
            _torchrun("--nproc-per-node", "2", *torchrun, "-m", "train.pretrain", "--device", "cpu",
                      *_set_args(tiny_overrides(data_root, run_dir, **extra))),
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref = launch(tmp_path / "ref", "--master-port", str(free_port()))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    # c10d rendezvous, as the SLURM script uses; no --resume flag: a restart implies --resume auto.
    run_dir = tmp_path / "elastic"
    elastic = launch(run_dir, "--max-restarts", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    deadline = time.time() + 300
    while not (run_dir / "ckpt-000000003.pt").exists():
        assert elastic.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim = _worker_pid(run_dir, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, _ = elastic.communicate(timeout=600)
    assert elastic.returncode == 0, out
    assert "torchrun restarted the workers; resuming from the newest checkpoint" in out
    expected, got = step_losses(tmp_path / "ref"), step_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():  # the torch backend resumes exactly: the same losses throughout
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
