"""Nothing silently lost, duplicated or mislabeled (issue 19): each hostile-tree case, from a tiny
generated tree, asserts the intended behaviour; a refusal names the file and the reason."""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.encoded_images import FileImages, MAX_PIXELS
from pipelines.errors import BadImageError, DataError
from pipelines.format import layout
from pipelines.image_folder import index_image_folder
from pipelines.images import open_rgb
from tests.helpers.imagefolder import make_image_folder
from tests.pretrain_helpers import make_split_tree, tiny_config, tiny_overrides
from tools import convert_imagenet, verify_converted
from tools.convert_imagenet import ConvertOptions, convert
from train import pretrain
from train.config import ConfigError, load_config
from train.data import build_loaders
from train.distributed import DistContext
from train.run_lock import RunLock

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _convert(src: Path, out: Path, **options) -> dict:
    return convert(ConvertOptions(src=str(src), out=str(out), jobs=1, progress=False,
                                  **{"formats": ("dali",), "shard_size": 8, "shard_multiple": 1, **options}))


def _overrides(root: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(root, run_dir, **{"data.support_classes": 2, **extra})  # the trees here have 2 classes


def _cfg(root: Path, run_dir: Path, **extra):
    return tiny_config(root, run_dir, **{"data.support_classes": 2, **extra})


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 1, 2: the tree's shape


def test_1_a_symlink_loop_is_refused_by_the_converter_and_the_loaders(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    os.symlink("..", root / "train" / "n00000001" / "loop")
    assert convert_imagenet.main(["--src", str(root), "--out", str(tmp_path / "out"), "--formats", "dali",
                                  "--jobs", "1", "--no-progress"]) == 2
    assert "n00000001/loop leads to" in _one_line_error(capsys)
    assert not (tmp_path / "out" / "samples").exists()  # nothing written under one label 40 times
    with pytest.raises(DataError, match="n00000001/loop leads to"):
        build_loaders(_cfg(root, tmp_path / "run"), 0, 1, torch.device("cpu"))


def test_2_images_in_nested_folders_are_the_same_samples_for_the_converter_and_the_loaders(tmp_path):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    make_image_folder(root / "train" / "n00000000", ["nested"], 3, 24, seed=7)
    _convert(root, tmp_path / "out", splits=("train",))
    samples = [(s["path"], s["label"]) for s in layout.read_samples(tmp_path / "out", "train")]
    index = index_image_folder(root / "train")
    assert samples == list(zip(index.paths, index.labels.tolist()))
    assert sum("nested/" in p for p, _ in samples) == 3
    loader = build_loaders(_cfg(root, tmp_path / "run", **{"data.unlabeled_batch_size": 11}), 0, 1,
                           torch.device("cpu")).train
    loader.set_epoch(0)
    assert sorted(next(iter(loader)).sample_ids.tolist()) == list(range(11))  # every one of the 11 images


# --------------------------------------------------------------------------- 3: 16-bit images


def test_3_a_16_bit_png_keeps_its_content_everywhere(tmp_path):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    png = root / "train" / "n00000000" / "z_sixteen.png"
    Image.fromarray(ramp).save(png)
    expected = np.round(ramp / 257.0)
    assert Image.open(png).mode == "I;16"
    decoded = np.asarray(open_rgb(str(png)))  # the torch loader's and evaluation's decode
    assert decoded.shape == (32, 32, 3) and np.abs(decoded[..., 0] - expected).max() <= 1
    formats = ("dali", "ffcv") if _has_ffcv() else ("dali",)
    manifest = _convert(root, tmp_path / "out", splits=("train",), formats=formats)
    assert {r["path"]: r["reason"] for r in manifest["splits"]["train"]["reencoded"]}[
        "n00000000/z_sixteen.png"] == "format:PNG"
    from pipelines.encoded_images import shard_images
    from pipelines.format.converted import open_converted
    images = shard_images(open_converted(tmp_path / "out", "train"))
    i = images.index.paths.index("n00000000/z_sixteen.png")
    stored = np.asarray(images.decode(i), dtype=np.float64)[..., 0]
    assert np.abs(stored - expected).mean() < 2.0  # JPEG re-encode of the scaled image, not a white one
    if "ffcv" in formats:
        from ffcv.reader import Reader
        reader = Reader(str(layout.beton_path(tmp_path / "out", "train")))
        assert int(reader.metadata["f0"][i]["height"]) == 32  # stored (the round trip is test_convert_imagenet's)


def test_3_images_without_an_8_bit_scale_are_refused_with_a_reason(tmp_path):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    tif = root / "train" / "n00000001" / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((16, 16), dtype=np.float32)).save(tif)
    manifest = _convert(root, tmp_path / "out", splits=("train",))
    skipped = {r["path"]: r["reason"] for r in manifest["splits"]["train"]["skipped"]}
    assert skipped["n00000001/float.tif"] == "unsupported-mode"
    with pytest.raises(BadImageError, match="float.tif.*no defined 8-bit scaling"):
        open_rgb(str(tif))


def _has_ffcv() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- 4: stale conversions


def test_4_a_rerun_after_the_source_changed_is_refused_naming_the_change(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    argv = ["--src", str(root), "--out", str(tmp_path / "out"), "--formats", "dali", "--jobs", "1", "--no-progress"]
    assert convert_imagenet.main(argv) == 0
    assert convert_imagenet.main(argv) == 0  # unchanged: skipped
    capsys.readouterr()
    make_image_folder(root / "train", ["n00000001"], 4, 24, seed=9)  # adds n00000001_3.JPEG
    assert convert_imagenet.main(argv) == 2
    err = _one_line_error(capsys)
    assert "1 added (e.g. n00000001/n00000001_3.JPEG)" in err and "--overwrite" in err
    os.utime(root / "train" / "n00000000" / "n00000000_0.JPEG", ns=(1, 1))  # same names, one file touched
    assert convert_imagenet.main(argv + ["--overwrite"]) == 0
    os.utime(root / "train" / "n00000000" / "n00000000_1.JPEG", ns=(1, 1))
    assert convert_imagenet.main(argv) == 2
    assert "changed in size or modification time" in capsys.readouterr().err
    assert len(layout.read_samples(tmp_path / "out", "train")) == 7


# --------------------------------------------------------------------------- 5: two runs, one directory


def test_5_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    code = f"from train.run_lock import RunLock; lock = RunLock({str(tmp_path / 'run')!r}); print('held', flush=True); " \
           "import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert pretrain.main(["--device", "cpu", *sum((["--set", o] for o in _overrides(root, tmp_path / "run")),
                                                      [])]) == 2
        err = _one_line_error(capsys)
        assert "in use by another run" in err and f"pid {holder.pid}" in err
        assert not (tmp_path / "run" / "metrics.csv").exists()
    finally:
        holder.kill()


def test_5_the_lock_of_a_killed_run_does_not_block_resuming(tmp_path):
    """The holder forks a child, as DataLoader workers are forked, and is killed; the child lives on."""
    code = (f"import os, time\nfrom train.run_lock import RunLock\nlock = RunLock({str(tmp_path / 'run')!r})\n"
            "child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print('held', child, flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = None
    try:
        word, child = holder.stdout.readline().split()
        assert word == "held"
        with pytest.raises(RuntimeError, match="in use by another run"):
            RunLock(tmp_path / "run")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert os.path.exists(f"/proc/{child}")  # the forked child still runs
        RunLock(tmp_path / "run").release()  # the kernel dropped the dead holder's lock all the same
    finally:
        holder.kill()
        if child is not None:
            try:
                os.kill(int(child), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- 7: kNN on converted data


def test_7_the_knn_monitor_reads_the_converted_val_split_after_the_source_is_gone(tmp_path):
    pytest.importorskip("nvidia.dali")
    src = make_split_tree(tmp_path / "src", classes=2, train_per_class=8, val_per_class=3)
    _convert(src, tmp_path / "out", labeled_fraction=0.5)
    os.rename(src, tmp_path / "gone")
    cfg = _cfg(tmp_path / "out", tmp_path / "run", **{"data.backend": "dali", "data.support_classes": 2,
                                                              "optim.epochs": 2, "run.knn_every_epochs": 1})
    summary = pretrain.run(cfg, CPU)
    assert 0 <= summary["knn_top1"] <= 100


def test_7_the_epoch_checkpoint_is_written_before_evaluating(tmp_path, monkeypatch):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=8)
    cfg = _cfg(root, tmp_path / "run", **{"data.support_classes": 2, "run.knn_every_epochs": 1})

    def failing_eval(tr):
        raise DataError("evaluation failed")

    monkeypatch.setattr(pretrain, "evaluate_knn", failing_eval)
    with pytest.raises(DataError, match="evaluation failed"):
        pretrain.run(cfg, CPU)
    from train import checkpoint as ckpt
    state, _ = ckpt.load_latest(tmp_path / "run")
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["step"] == 0  # epoch 0 kept


# --------------------------------------------------------------------------- 8: the pixel limit on raw trees


def _huge_header_jpeg(path: Path, height: int, width: int) -> None:
    """A small valid JPEG whose frame header claims ``height`` x ``width`` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_8_raw_tree_images_over_the_pixel_limit_are_refused_by_name(tmp_path):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    huge = root / "train" / "n00000000" / "huge.JPEG"
    _huge_header_jpeg(huge, 30000, 30000)
    assert 30000 * 30000 > MAX_PIXELS
    images = FileImages(index_image_folder(root / "train"))
    i = images.index.paths.index("n00000000/huge.JPEG")
    with pytest.raises(BadImageError, match="huge.JPEG has 30000x30000 pixels"):
        images.checked(i)
    with pytest.raises(BadImageError, match="huge.JPEG"):
        open_rgb(str(huge))  # the torch backend (PIL) refuses it too


# --------------------------------------------------------------------------- 9: K = 1


def test_9_one_image_per_class_is_refused_unless_ranks_share_classes():
    cfg = load_config(None, ["data.support_images_per_class=1"])
    with pytest.raises(ConfigError, match="support_images_per_class=1.*one process.*>= 2"):
        cfg.validate(world_size=1)
    cfg.validate(world_size=2)  # two ranks share the classes: two images of each class per step
    with pytest.raises(ConfigError, match="unique_classes"):
        load_config(None, ["data.support_images_per_class=1", "data.unique_classes=true"]).validate(world_size=2)
    load_config(None, ["data.support_images_per_class=1", "data.support_views=2"]).validate(world_size=1)


def test_9_the_sampler_suggests_only_values_validation_accepts(tmp_path):
    from pipelines.sampler import ClassBalancedSampler
    with pytest.raises(ValueError) as info:
        ClassBalancedSampler([0, 0, 1], 2, 2)  # class 1 has one labeled image
    assert "<= 1" not in str(info.value) and "add labeled images of class 1" in str(info.value)
    with pytest.raises(ValueError) as info:
        ClassBalancedSampler([0, 0, 0], 2, 2)  # one class only
    assert "support_classes to <=" not in str(info.value)


# --------------------------------------------------------------------------- 10: one-line errors


def _train_main(root: Path, run_dir: Path, *extra: str) -> int:
    return pretrain.main(["--device", "cpu", *sum((["--set", o] for o in _overrides(root, run_dir)), []),
                          *extra])


def test_10_the_converter_names_an_output_it_cannot_write(tmp_path, capsys, monkeypatch):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "out":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert convert_imagenet.main(["--src", str(root), "--out", str(tmp_path / "out"), "--formats", "dali",
                                  "--jobs", "1", "--no-progress"]) == 2
    assert f"--out {tmp_path / 'out'} cannot be written: Read-only file system" in _one_line_error(capsys)


def test_10_run_directory_a_file_or_not_writable(tmp_path, capsys, monkeypatch):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    (tmp_path / "file").write_text("x")
    assert _train_main(root, tmp_path / "file") == 2
    assert "is a file" in _one_line_error(capsys)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert _train_main(root, tmp_path / "ro") == 2
    assert "cannot be written: Read-only file system" in _one_line_error(capsys)


def test_10_an_invalid_manifest_at_training_time(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    _convert(root, tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    assert _train_main(tmp_path / "out", tmp_path / "run", "--set", "data.backend=dali") == 2
    assert "manifest.json cannot be read as JSON" in _one_line_error(capsys)


def test_10_resuming_with_another_model_names_the_keys(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    assert _train_main(root, tmp_path / "run", "--set", "run.max_steps_per_epoch=1", "--set", "run.knn_every_epochs=0") == 0
    capsys.readouterr()
    assert _train_main(root, tmp_path / "run", "--set", "model.head_out_dim=8", "--resume", "auto") == 2
    error = _one_line_error(capsys)
    assert "do not fit this config (model.head_out_dim: 16 -> 8)" in error, error
    assert "resume with the checkpoint's values (model.head_out_dim=16)" in error, error


@pytest.mark.parametrize("content", ["[]", "null", '{"splits": []}', '{"splits": {"train": {"files": [1]}}}'])
def test_10_verify_converted_on_a_manifest_of_the_wrong_shape_exits_2(tmp_path, capsys, content):
    (tmp_path / "manifest.json").write_text(content)
    assert verify_converted.main([str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "not a converter manifest" in err or "lists its files in an unknown shape" in err


# --------------------------------------------------------------------------- 11, 12


def test_11_a_labeled_list_naming_absent_files_is_refused_by_the_converter(tmp_path, capsys):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=3)
    listing = tmp_path / "list.txt"
    listing.write_text("n00000000_0.JPEG\nnot_there.JPEG\n")
    assert convert_imagenet.main(["--src", str(root), "--out", str(tmp_path / "out"), "--formats", "dali",
                                  "--labeled-list", str(listing), "--jobs", "1", "--no-progress"]) == 2
    assert "not_there.JPEG" in _one_line_error(capsys)
    listing.write_text("not_there.JPEG\n")
    assert convert_imagenet.main(["--src", str(root), "--out", str(tmp_path / "out"), "--formats", "dali",
                                  "--labeled-list", str(listing), "--allow-missing", "--jobs", "1",
                                  "--no-progress"]) == 2
    assert "names no usable image" in _one_line_error(capsys)


def test_12_a_broken_symlink_is_refused_by_the_torch_loader_or_counted_with_skip(tmp_path):
    root = make_split_tree(tmp_path / "src", classes=2, train_per_class=4)
    os.symlink(root / "nowhere.JPEG", root / "train" / "n00000001" / "broken.JPEG")
    with pytest.raises(DataError, match="n00000001/broken.JPEG"):
        build_loaders(_cfg(root, tmp_path / "run"), 0, 1, torch.device("cpu"))
    cfg = _cfg(root, tmp_path / "run", **{"data.on_bad_image": "skip", "data.unlabeled_batch_size": 9,
                                                 "data.support_classes": 2})
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert any("broken.JPEG" in name for name in batch.bad_images)
    manifest = _convert(root, tmp_path / "out", splits=("train",))
    assert {r["path"]: r["reason"] for r in manifest["splits"]["train"]["skipped"]}[
        "n00000001/broken.JPEG"] == "unreadable"
