"""Hostile and unusual input, second round (issue 27): no writes through links, no deletes outside
our files, one lock per conversion, no hangs, and one-line refusals. Each test names its case
(S1, L1..L10, H1..H2, T1..T12, W1..W11) and fails without its fix."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.bad_images import ReplacementPools, read_or_replace
from pipelines.encoded_images import FileImages, ShardImages
from pipelines.errors import BadImageError, DataError
from pipelines.format import layout
from pipelines.format.converted import open_converted
from pipelines.image_folder import ImageFolderIndex, find_classes, index_image_folder, list_split
from pipelines.images import open_rgb
from pipelines.labeled import match_list, read_list, read_list_lines
from pipelines.train_split import open_train_split
from tests.helpers.imagefolder import make_image_folder
from tests.pretrain_helpers import make_split_tree, tiny_config, tiny_overrides
from tools import convert_imagenet, throughput, verify_converted
from tools.convert.options import ConvertOptions
from tools.convert.source import SKIP, inspect_file
from train import checkpoint as ckpt
from train import evaluate, pretrain
from train.config import ConfigError, load_config
from train.data import loader_spec
from train.knn import knn_predict
from train.run_lock import DirLock, RunDirError, RunLock
from train.run_logger import RunLogger

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("tree"), classes=4, train_per_class=10, val_per_class=4)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "out"
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--labeled-fraction", "0.5", "--no-progress"]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _pretrain_args(tree: Path, run_dir: Path, *extra: str, **overrides) -> list[str]:
    sets = [a for o in tiny_overrides(tree, run_dir, **overrides) for a in ("--set", o)]
    return ["--device", "cpu", *sets, *extra]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1] if err else ""


# --------------------------------------------------------------------------- S1: no writes through links

def test_s1_dry_run_with_a_linked_lock_is_refused_and_writes_nothing(tree, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    assert pretrain.main(_pretrain_args(tree, run_dir, "--dry-run")) == 2
    assert "symbolic link" in _err(capsys)
    assert victim.read_text() == "precious\n"


def test_s1_a_free_lock_checked_by_a_dry_run_is_not_rewritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("left by an earlier run\n")
    RunLock.check(run_dir)
    assert (run_dir / ".lock").read_text() == "left by an earlier run\n"


def test_s1_config_and_summary_links_are_replaced_and_a_metrics_link_refused(tree, tmp_path):
    victims = {name: tmp_path / f"victim-{name}" for name in ("config.yaml", "summary.json", "metrics.csv")}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, victim in victims.items():
        victim.write_text("precious\n")
        (run_dir / name).symlink_to(victim)
    cfg = tiny_config(tree, run_dir)
    with pytest.raises(RunDirError, match="metrics.csv is a symbolic link"):
        RunLogger(run_dir, cfg, None, tensorboard=False)
    (run_dir / "metrics.csv").unlink()
    logger = RunLogger(run_dir, cfg, None, tensorboard=False)
    logger.write_summary({"global_step": 1})
    logger.close()
    assert all(v.read_text() == "precious\n" for v in victims.values())
    assert not (run_dir / "config.yaml").is_symlink() and "data" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text()) == {"global_step": 1}


def test_s1_the_manifest_is_replaced_not_written_through(tmp_path):
    from pipelines.format.manifest import write_json
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "manifest.json").symlink_to(victim)
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "precious\n" and json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}


# --------------------------------------------------------------------------- L1, L2, L3: the converter's own files

def _user_files(out: Path) -> dict[Path, str]:
    files = {out / name / "mine.txt": f"user file in {name}" for name in ("samples", "labeled", "dali", "ffcv")}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_l1_overwrite_on_a_folder_without_a_conversion_keeps_the_users_files(tree, tmp_path):
    out = tmp_path / "out"
    files = _user_files(out)
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--overwrite", "--no-progress"]) == 0
    assert all(p.read_text() == t for p, t in files.items())


def test_l1_overwrite_deletes_only_what_the_manifest_records(tree, converted, tmp_path, capsys):
    out = _copy(converted, tmp_path / "out")
    files = _user_files(out)
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--overwrite", "--jpeg-quality", "80", "--no-progress"]) == 0
    assert all(p.read_text() == t for p, t in files.items())
    stray = out / "dali" / "train" / "notes.txt"
    stray.write_text("mine")
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--overwrite", "--jpeg-quality", "70", "--no-progress"]) == 2
    assert "notes.txt, which no conversion recorded" in _err(capsys)
    assert stray.read_text() == "mine" and layout.read_manifest(out)["settings"]["dali"]["reencode_quality"] == 80


def test_l1_a_foreign_file_where_a_split_is_written_is_refused(tree, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "train.jsonl").write_text("my own notes\n")
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--no-progress"]) == 2
    assert "train.jsonl, which no conversion recorded" in _err(capsys)
    assert (out / "samples" / "train.jsonl").read_text() == "my own notes\n"


@pytest.mark.parametrize("splits", ["..", "a/b", ".hidden", "train,../x", "train.partial"])
def test_l2_splits_take_plain_folder_names(tree, tmp_path, splits):
    with pytest.raises(ValueError, match="--splits takes plain folder names"):
        ConvertOptions(src=str(tree), out=str(tmp_path / "o"), splits=tuple(splits.split(",")))


def test_l3_a_second_converter_on_one_out_is_refused_naming_the_holder(tree, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train.run_lock import DirLock; "
         f"DirLock({str(out)!r}, '.convert.lock', '--out', 'conversion'); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                      "--no-progress"]) == 2
        assert f"in use by another conversion (pid {holder.pid}" in _err(capsys)
        assert not (out / layout.MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- L4, W2, L8, H2: one readability rule

def _odd_image(path: Path, kind: str) -> None:
    if kind == "float-tiff":
        Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), mode="F").save(path, "TIFF")
    else:  # a GIF named .JPEG
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).convert("P").save(path, "GIF")


def test_l4_a_camera_jpeg_that_pil_calls_mpo_is_read_everywhere(tmp_path):
    split = tmp_path / "train"
    make_image_folder(split, 2, 3, 24)
    mpo = split / "n00000000" / "camera.JPEG"
    first, second = (Image.fromarray(np.full((24, 24, 3), v, np.uint8)) for v in (60, 200))
    first.save(mpo, "MPO", save_all=True, append_images=[second])
    assert Image.open(mpo).format == "MPO"
    assert inspect_file(str(mpo)).reason == "format:MPO"  # re-encoded by the converter, not skipped
    assert np.asarray(open_rgb(str(mpo))).mean() == pytest.approx(60, abs=2)
    index = index_image_folder(split)
    FileImages(index).checked(index.paths.index("n00000000/camera.JPEG"))


@pytest.mark.parametrize("kind, reason", [("float-tiff", "unsupported-mode"), ("gif", "unsupported-format")])
def test_l4_w2_every_reader_refuses_the_same_odd_file(tmp_path, kind, reason):
    split = tmp_path / "train"
    make_image_folder(split, 2, 3, 24)
    odd = split / "n00000000" / "odd.JPEG"
    _odd_image(odd, kind)
    assert inspect_file(str(odd)).action == SKIP and inspect_file(str(odd)).reason == reason  # the converter
    with pytest.raises(BadImageError, match="odd.JPEG"):  # the torch backend and evaluation
        open_rgb(str(odd))
    index = index_image_folder(split)
    images = FileImages(index)  # DALI on a raw tree: the bytes it would be fed
    i = index.paths.index("n00000000/odd.JPEG")
    with pytest.raises(BadImageError, match="odd.JPEG"):
        images.checked(i)
    _, used, bad = read_or_replace(i, images.checked, "skip", ReplacementPools.single(len(index)))
    assert used != i and "odd.JPEG" in bad[0]  # data.on_bad_image=skip replaces it, naming it


def test_l8_a_hidden_folder_is_no_class_for_any_reader(tree, tmp_path):
    src = _copy(tree, tmp_path / "src")
    (src / "train" / ".ipynb_checkpoints").mkdir()
    (src / "train" / "n00000001" / ".DS_Store").write_bytes(b"\0\0")
    index = index_image_folder(src / "train")
    assert index.classes == tuple(find_classes([tree / "train"]))
    out = tmp_path / "out"
    assert convert_imagenet.main(["--src", str(src), "--out", str(out), "--formats", "dali", "--jobs", "1",
                                  "--no-progress"]) == 0
    conv = open_converted(out, "train")
    assert conv.index.classes == index.classes and conv.index.labels.tolist() == index.labels.tolist()
    skipped = {s["path"]: s["reason"] for s in layout.read_manifest(out)["splits"]["train"]["skipped"]}
    assert skipped == {".ipynb_checkpoints": "hidden-folder", "n00000001/.DS_Store": "hidden-file"}


@pytest.mark.timeout(120)
def test_h2_a_named_pipe_is_ignored_by_the_listing_and_the_converter(tree, tmp_path):
    src = _copy(tree, tmp_path / "src")
    os.mkfifo(src / "train" / "n00000000" / "x.JPEG")
    listing = list_split(src / "train")
    assert "n00000000/x.JPEG" not in listing.paths
    assert {"path": "n00000000/x.JPEG", "reason": "not-a-regular-file", "detail": None} in listing.ignored
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("rc", convert_imagenet.main(
        ["--src", str(src), "--out", str(tmp_path / "out"), "--formats", "dali", "--jobs", "1", "--no-progress"])),
        daemon=True)
    worker.start()
    worker.join(90)
    assert result.get("rc") == 0


# --------------------------------------------------------------------------- L6/T10, T8, T9: converted small files

def test_l6_a_line_appended_to_the_labeled_list_is_refused_at_start(converted, tmp_path):
    out = _copy(converted, tmp_path / "out")
    with open(layout.labeled_path(out, "train"), "a") as f:
        f.write("-3\n")
    with pytest.raises(DataError, match="train.txt: .* bytes, the converter wrote"):
        open_converted(out, "train")


def _edit_samples(out: Path, label: int, rerecord: bool) -> None:
    path = layout.samples_path(out, "train")
    rows = layout.read_samples(out, "train")
    rows[3]["label"] = label
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rerecord:  # as if the manifest had been edited to match (or predates records)
        from pipelines.format.manifest import file_record, write_json
        manifest = layout.read_manifest(out)
        files = manifest["splits"]["train"]["files"]
        manifest["splits"]["train"]["files"] = [file_record(path, out) if f["path"] == "samples/train.jsonl" else f
                                                for f in files]
        write_json(out / layout.MANIFEST, manifest)


def test_l6_an_edited_label_is_refused_by_its_hash_and_by_its_range(converted, tmp_path):
    out = _copy(converted, tmp_path / "a")
    _edit_samples(out, 2, rerecord=False)  # a valid label, moved: only the hash sees it
    with pytest.raises(DataError, match="sha256 mismatch"):
        open_converted(out, "train")
    out = _copy(converted, tmp_path / "b")
    _edit_samples(out, 99, rerecord=True)
    with pytest.raises(DataError, match="sample 3 has label 99, outside the 4 classes"):
        open_converted(out, "train")


@pytest.mark.parametrize("labels", [{"classes": 5}, {"classes": ["n00000000"], "class_to_idx": {"n00000000": 0}}])
def test_l6_an_edited_labels_file_is_refused(converted, tmp_path, labels):
    out = _copy(converted, tmp_path / "out")
    (out / layout.LABELS).write_text(json.dumps(labels))
    with pytest.raises(DataError, match="labels.json"):
        open_converted(out, "train")


@pytest.mark.parametrize("member", ["../../evil.jpg", "00000000x.jpg"])
def test_t8_a_damaged_index_of_the_same_size_is_a_one_line_error(converted, tmp_path, member):
    out = _copy(converted, tmp_path / "out")
    idx = layout.shard_files(out, "train")[1][0]
    text = idx.read_text()
    first = next(t for t in text.split() if t.endswith(".jpg"))
    damaged = text.replace(first, member[: len(first)].ljust(len(first), "x"), 1)
    idx.write_text(damaged)
    split = open_converted(out, "train")
    with pytest.raises(DataError, match="is not a sample the converter writes"):
        ShardImages(split.index, *layout.shard_files(out, "train"))


@pytest.mark.parametrize("path", [5, "../../etc/passwd", "/etc/passwd"])
def test_t9_a_manifest_record_with_a_bad_path_is_refused_in_one_line(converted, tmp_path, capsys, path):
    out = _copy(converted, tmp_path / "out")
    manifest = json.loads((out / layout.MANIFEST).read_text())
    manifest["splits"]["train"]["files"][0]["path"] = path
    (out / layout.MANIFEST).write_text(json.dumps(manifest))
    assert verify_converted.main([str(out)]) == 2
    assert "unknown shape" in _err(capsys)


# --------------------------------------------------------------------------- L7, L9, L10

@pytest.mark.parametrize("temperature", ["0", "-0.07"])
def test_l7_a_knn_temperature_that_is_not_positive_is_refused(tmp_path, capsys, temperature):
    assert evaluate.main(["--checkpoint", str(tmp_path), "--knn-temperature", temperature]) == 2
    assert "--knn-temperature must be finite and > 0" in _err(capsys)
    feats = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(feats, torch.arange(6) % 2, feats, 2, k=3, temperature=float(temperature))


def test_l9_pruning_never_deletes_a_checkpoint_older_than_a_later_damaged_one(tmp_path):
    state = {"w": torch.zeros(2)}
    ckpt.save_checkpoint(state, tmp_path, 2, keep=2)
    ckpt.checkpoint_path(tmp_path, 99).write_bytes(b"damaged")
    ckpt.save_checkpoint(state, tmp_path, 4, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000000002.pt", "ckpt-000000004.pt", "ckpt-000000099.pt"]
    ckpt.save_checkpoint(state, tmp_path, 6, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000000004.pt", "ckpt-000000006.pt", "ckpt-000000099.pt"]


def test_l10_the_converters_subset_in_place_of_labeled_fraction_is_said(converted, tmp_path, caplog):
    cfg = tiny_config(converted, tmp_path / "run", **{"data.backend": "dali", "data.labeled_fraction": 0.1})
    with caplog.at_level("WARNING"):
        split = open_train_split(loader_spec(cfg, 0, 1, torch.device("cpu")))
    assert len(split.labeled) == 20  # the converter's 0.5 of 40, not 0.1
    assert "the labeled subset is the converter's (20 images of train, fraction 0.5 with seed 0)" in caplog.text
    caplog.clear()
    cfg = tiny_config(converted, tmp_path / "run", **{"data.backend": "dali", "data.labeled_fraction": 0.5})
    with caplog.at_level("WARNING"):
        open_train_split(loader_spec(cfg, 0, 1, torch.device("cpu")))
    assert caplog.text == ""  # the same rule: nothing to say


# --------------------------------------------------------------------------- H1, T1: a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only); skipped where the test may not mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(180)
def test_h1_a_full_disk_while_writing_the_beton_ends_the_converter_in_one_line(tree, small_disk, capsys):
    pytest.importorskip("ffcv")
    out = small_disk / "out"
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--formats", "ffcv", "--jobs", "2",
                                  "--no-progress"]) == 2
    assert "FFCV's .beton writer died: OSError: [Errno 28] No space left on device" in _err(capsys)
    assert (out / "ffcv").is_dir() and list((out / "ffcv").iterdir()) == []  # the space a failed write took is given back


WORKER_DIES = """
import os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tools.convert import ffcv_beton
real_load = ffcv_beton.load_rgb

def load_rgb(path):  # the OOM killer, as far as the writer can tell
    if path.endswith("die.JPEG"):
        os._exit(9)
    return real_load(path)

ffcv_beton.load_rgb = load_rgb
items = [({die!r}, 0)] + [({ok!r}, 0)] * 30000  # 300 chunks: more than FFCV's work-queue pipe holds
try:
    ffcv_beton.write_beton(Path({out!r}), items, ffcv_beton.BetonSettings(64, 90, 0.5), ffcv_beton.PagePlan(1 << 21, 2),
                           progress=False)
except ffcv_beton.WriterWorkerDied as exc:
    print(exc)
"""


def test_h1_a_writer_worker_killed_mid_write_ends_the_write_and_the_process(tmp_path):
    pytest.importorskip("ffcv")
    ok, die = make_image_folder(tmp_path / "src", 1, 2, 24)
    die = die.rename(die.with_name("die.JPEG"))
    script = WORKER_DIES.format(repo=str(REPO), die=str(die), ok=str(ok), out=str(tmp_path / "x.beton"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "a process of FFCV's .beton writer died: exit code 9"


def test_t1_a_full_disk_during_a_checkpoint_is_a_checkpoint_error_and_keeps_the_old_one(small_disk):
    ckpt.save_checkpoint({"w": torch.zeros(10)}, small_disk, 2, keep=2)
    before = ckpt.checkpoint_path(small_disk, 2).read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .* MiB free there"):
        ckpt.save_checkpoint({"w": torch.zeros(2_000_000)}, small_disk, 4, keep=2)
    assert ckpt.checkpoint_path(small_disk, 2).read_bytes() == before
    assert [p.name for p in small_disk.iterdir()] == ["ckpt-000000002.pt"]


def test_t1_a_full_disk_while_appending_metrics_is_a_checkpoint_error(tree, small_disk):
    logger = RunLogger(small_disk / "run", tiny_config(tree, small_disk / "run"), None, tensorboard=False)
    with open(small_disk / "filler", "wb") as f:  # fill the disk
        try:
            f.write(b"\0" * (4 << 20))
        except OSError:
            pass
    with pytest.raises(ckpt.CheckpointError, match="could not append to .*metrics.csv"):
        for step in range(2000):
            logger.log({"global_step": step, "loss": 1.0, "lr": 0.1})


# --------------------------------------------------------------------------- T2, T3, W5, W9, W11: resuming

def test_t2_resuming_from_an_exported_encoder_is_a_one_line_error(tree, tmp_path, capsys):
    export = tmp_path / "encoder.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, export)
    assert pretrain.main(_pretrain_args(tree, tmp_path / "run", "--resume", str(export))) == 2
    assert "cannot be resumed: it is an exported encoder" in _err(capsys)


@pytest.mark.timeout(60)
def test_t2_resuming_from_a_named_pipe_is_refused_without_opening_it(tree, tmp_path, capsys):
    os.mkfifo(tmp_path / "ckpt.pt")
    assert pretrain.main(_pretrain_args(tree, tmp_path / "run", "--resume", str(tmp_path / "ckpt.pt"))) == 2
    assert "no checkpoint file or run folder at" in _err(capsys)


def test_w5_resume_takes_a_run_folder(tmp_path):
    (tmp_path / "run").mkdir()
    ckpt.save_checkpoint({k: 0 for k in ckpt.TRAINING_KEYS}, tmp_path / "run", 3, keep=2)
    loaded, path = pretrain.resolve_resume(str(tmp_path / "run"), tmp_path / "other")
    assert path.name == "ckpt-000000003.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        pretrain.resolve_resume(str(tmp_path / "empty"), tmp_path / "other")


def test_w9_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    names = [".tmp-ckpt-000000004.pt.a1b2c3d4", ".tmp-summary.json.zz_9yx8w", ".tmp-notes", "notes.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert ckpt.remove_stale_temp_files(tmp_path) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


@pytest.mark.slow
def test_t3_a_mid_epoch_resume_on_a_smaller_dataset_is_a_one_line_error(tmp_path, capsys):
    data = make_split_tree(tmp_path / "data", classes=4, train_per_class=10, val_per_class=2)
    run_dir = tmp_path / "run"
    args = _pretrain_args(data, run_dir, **{"run.knn_every_epochs": 0, "run.checkpoint_every_steps": 4,
                                              "run.keep_checkpoints": 10})
    assert pretrain.main(args) == 0
    for ckpt_path in ckpt.list_checkpoints(run_dir)[1:]:
        ckpt_path.unlink()  # keep step 4 of epoch 0's 5: mid-epoch
    for cls in range(4):
        for i in range(5, 10):
            (data / "train" / f"n{cls:08d}" / f"n{cls:08d}_{i}.JPEG").unlink()
    capsys.readouterr()
    metrics = (run_dir / "metrics.csv").read_text()
    assert pretrain.main([*args, "--resume", "auto"]) == 2
    assert "checkpoint stopped at step 4 of epoch 0, but an epoch now has 2 steps" in _err(capsys)
    assert (run_dir / "metrics.csv").read_text() == metrics  # refused before anything was rewritten


def test_w11_a_read_only_run_folder_is_refused_at_start(tmp_path, monkeypatch):
    """A folder the user cannot write, holding a lock file they can: refused when the lock is
    taken, not at the first checkpoint. Root writes anywhere: as root, the kernel's answer for
    such a user is given by ``os.access``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")
    os.chmod(run_dir, 0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == run_dir and mode & os.W_OK
                            else real_access(p, mode, **k))
    try:
        with pytest.raises(RunDirError, match="cannot be written: the folder is read-only"):
            RunLock(run_dir)
    finally:
        os.chmod(run_dir, 0o755)


# --------------------------------------------------------------------------- T4-T6, W4, W6: values

@pytest.mark.parametrize("override, message", [
    ("model.head_hidden_dim=0", "model.head_hidden_dim must be >= 1"),
    ("data.prefetch_factor=0", "data.prefetch_factor must be >= 1"),
    ("run.seed=-1", "run.seed must be in [0, 2**32)"),
    (f"run.seed={2**32}", "run.seed must be in [0, 2**32)"),
    ("data.knn_max_samples=0", "data.knn_max_samples must be >= 1"),
    ("run.knn_every_epochs=-1", "run.knn_every_epochs must be >= 0"),
    ("loss.supervised_epochs=-1", "loss.supervised_epochs must be >= 0 or null"),
    ("augment.std=[0,0,0]", "augment.std must be >= 0.001"),
    ("augment.blur_kernel_fraction=5", "augment.blur_kernel_fraction must be in (0, 1]"),
    ("augment.crop_ratio=[0,0]", "augment.crop_ratio must be > 0 in every entry"),
])
def test_t4_t5_w6_impossible_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override]).validate()
    assert message in str(exc.value)


def test_t4_fp16_on_a_cpu_is_a_one_line_error(tree, tmp_path, capsys):
    assert pretrain.main(_pretrain_args(tree, tmp_path / "run", "--dry-run", **{"run.precision": "fp16"})) == 2
    assert "run.precision=fp16 needs CUDA" in _err(capsys)


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1e30", 1e30), ("+2E+2", 200.0)])
def test_w4_numbers_without_a_dot_are_numbers(text, value):
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == value


@pytest.mark.parametrize("flags, message", [
    (["--val-max-samples", "0"], "--val-max-samples must be >= 1"),
    (["--lr", "-1"], "--lr must be finite and > 0"),
])
def test_t6_t11_evaluate_values_are_checked_before_any_work(tmp_path, capsys, flags, message):
    assert evaluate.main(["--checkpoint", str(tmp_path), *flags]) == 2
    assert message in _err(capsys)


# --------------------------------------------------------------------------- T7, W7, W10: labeled lists

def test_t7_a_list_that_is_not_utf8_is_a_one_line_error(tree, tmp_path, capsys):
    listed = tmp_path / "list.txt"
    listed.write_bytes("n00000000_1.JPEG\nn00000000_\xe9.JPEG\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_list(listed, ["n00000000/n00000000_1.JPEG"], "train")
    assert convert_imagenet.main(["--src", str(tree), "--out", str(tmp_path / "out"), "--formats", "dali",
                                  "--jobs", "1", "--labeled-list", str(listed), "--no-progress"]) == 2
    assert "not UTF-8 text" in _err(capsys)


def test_w7_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_bytes("\ufeffa_1.JPEG\na_2.JPEG\n".encode("utf-8"))
    assert read_list_lines(listed) == ["a_1.JPEG", "a_2.JPEG"]
    assert read_list(listed, ["a/a_1.JPEG", "a/a_2.JPEG", "a/a_3.JPEG"], "train").tolist() == [0, 1]


def test_w10_a_file_named_like_a_comment_is_an_entry():
    paths = ["a/#1.JPEG", "a/b.JPEG", "a/c.JPEG"]
    subset = match_list(["# my 10 % list", "#1.JPEG", "a/c.JPEG", "#not-a-file.JPEG"], paths)
    assert subset.indices == [0, 2] and subset.missing == []


# --------------------------------------------------------------------------- T11, W3: evaluation

def test_t11_an_unwritable_output_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first"))
    assert evaluate.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "missing" / "x.json")]) == 2
    assert _err(capsys).endswith(f"folder {tmp_path / 'missing'} does not exist")


def test_t11_a_checkpoint_of_an_unknown_arch_is_a_one_line_error(tree, tmp_path, capsys):
    from train.config import config_to_dict
    cfg = config_to_dict(tiny_config(tree, tmp_path / "run"))
    cfg["model"]["arch"] = "resnet999"
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"model": {}, "config": cfg, "optimizer": {}, "train_state": {}, "world_size": 1}, path)
    assert evaluate.main(["--checkpoint", str(path), "--data", str(tree)]) == 2
    assert "resnet999" in _err(capsys)


def test_w3_a_safetensors_export_is_read_whatever_its_name(tmp_path):
    pytest.importorskip("safetensors")
    from model import build_model
    from train.export import EncoderInfo, export_encoder, load_encoder
    model = build_model("resnet18-small", channels_last=False, sync_bn=False)
    path = export_encoder(model, tmp_path / "encoder.pth", "safetensors",
                          EncoderInfo(arch="resnet18-small", resolution=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    loaded = load_encoder(path, "resnet18-small")
    for (name, a), b in zip(model.encoder.state_dict().items(), loaded.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert evaluate.load_for_evaluation(path, None, None)[0] is not None


# --------------------------------------------------------------------------- T12, W1: tools

def test_t12_throughput_checks_its_worker_counts_first(capsys):
    """(``--data`` missing: tests/test_throughput.py)"""
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--decode-workers", "-3"])
    assert exc.value.code == 2 and "--decode-workers must be >= 1, got -3" in capsys.readouterr().err


def test_w1_an_image_too_elongated_for_ffcv_is_skipped_not_fatal(tree, tmp_path):
    pytest.importorskip("ffcv")
    src = _copy(tree, tmp_path / "src")
    Image.fromarray(np.full((1, 600, 3), 128, np.uint8)).save(src / "train" / "n00000000" / "thin.JPEG")
    assert inspect_file(str(src / "train" / "n00000000" / "thin.JPEG"), max_side=512).reason == "too-elongated"
    out = tmp_path / "out"
    assert convert_imagenet.main(["--src", str(src), "--out", str(out), "--formats", "ffcv", "--jobs", "1",
                                  "--max-resolution", "512", "--no-progress"]) == 0
    skipped = layout.read_manifest(out)["splits"]["train"]["skipped"]
    assert [(s["path"], s["reason"]) for s in skipped] == [("n00000000/thin.JPEG", "too-elongated")]
