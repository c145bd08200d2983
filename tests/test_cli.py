"""The command lines a user meets first: wrong usage gets one line naming the problem and a
non-zero exit, every option explains itself, and ``prog`` reads the way it is run (issue 15)."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from tests.pretrain_helpers import make_split_tree, tiny_overrides
from tools import convert_imagenet
from train import evaluate, pretrain

PROGRAMS = ["train.pretrain", "train.evaluate", "tools.convert_imagenet", "tools.verify_converted", "tools.export",
            "tools.reproduce", "tools.make_demo_data", "tools.throughput"]


def _parser(module: str) -> argparse.ArgumentParser:
    mod = importlib.import_module(module)
    if hasattr(mod, "build_parser"):
        return mod.build_parser()
    captured = {}
    real_parse = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        mod.main([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    return captured["parser"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_every_option_has_help_and_prog_reads_python_m(module):
    parser = _parser(module)
    assert parser.prog == f"python -m {module}"
    undocumented = [a.option_strings or a.dest for a in parser._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert undocumented == []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("cli"), classes=4, train_per_class=4)


def _train(tree: Path, run_dir: Path, *extra: str) -> int:
    return pretrain.main(["--device", "cpu", *[a for o in tiny_overrides(tree, run_dir) for a in ("--set", o)],
                          *extra])


def test_unknown_model_arch(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", "--set", "model.arch=resnet51") == 2
    assert "model.arch must be one of resnet50, resnet18, resnet18-small or timm/<name>, got 'resnet51'" in \
        _one_line(capsys)


def test_a_typo_suggests_the_key(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", "--set", "optim.learning_rate=1") == 2
    assert "optim.learning_rate" in _one_line(capsys)
    assert _train(tree, tmp_path / "run", "--set", "data.labeled_fractoin=0.2") == 2
    assert "did you mean data.labeled_fraction?" in _one_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_device_cuda_without_cuda(tree, tmp_path, capsys):
    assert pretrain.main(["--device", "cuda", "--set", f"data.root={tree}"]) == 2
    assert "--device cuda: CUDA is not available here" in _one_line(capsys)


def test_data_root_is_a_file(tree, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tree, tmp_path / "run", "--set", f"data.root={tmp_path / 'file'}") == 2
    assert "is a file" in _one_line(capsys)


def test_a_converted_directory_given_to_the_torch_backend_says_so(tree, tmp_path, capsys):
    assert convert_imagenet.main(["--src", str(tree), "--out", str(tmp_path / "conv"), "--formats", "dali",
                                  "--jobs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert _train(tree, tmp_path / "run", "--set", f"data.root={tmp_path / 'conv'}") == 2
    assert "is a converted dataset" in _one_line(capsys)


def test_evaluate_on_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert evaluate.main(["--checkpoint", str(tmp_path / "notes.txt"), "--data", str(tmp_path)]) == 2
    assert "is not a readable checkpoint" in _one_line(capsys)


def test_convert_out_on_an_existing_file(tree, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert convert_imagenet.main(["--src", str(tree), "--out", str(tmp_path / "out"), "--jobs", "1",
                                  "--no-progress"]) == 2
    assert "--out" in _one_line(capsys)


def test_converter_messages_use_flag_names(tree, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_imagenet.main(["--src", str(tree), "--out", str(tmp_path / "o"), "--labeled-fraction", "2"])
    assert "--labeled-fraction must be in (0, 1], got 2.0" in capsys.readouterr().err


# --------------------------------------------------------------------------- a console that says what it does


def test_print_config_prints_the_resolved_yaml(capsys):
    import yaml
    assert pretrain.main(["--config", "configs/imagenet_simclr.yaml", "--set", "optim.epochs=7",
                          "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["suncet_weight"] == 0.0 and printed["optim"]["epochs"] == 7  # overlay and --set
    assert printed["data"]["unlabeled_batch_size"] == 44  # from the _base_ file


def test_dry_run_trains_one_step_and_writes_nothing(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run: one step trained, loss" in out and "nothing written" in out
    assert "data: torch backend reading ImageFolder tree" in out and "16 images in 4 classes" in out
    assert not (tmp_path / "run").exists()


def test_a_run_logs_plain_lines_when_stdout_is_no_terminal(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", "--set", "run.knn_every_epochs=0", "--set", "run.log_every_steps=1",
                  "--set", "run.progress_bar=true") == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # no redrawn bars in a log file
    step_lines = [line for line in out.splitlines() if line.startswith("epoch 1/")]
    assert step_lines and "loss" in step_lines[0] and "img/s" in step_lines[0]
    lines = out.splitlines()
    assert lines[0].startswith("building ") and lines[1].startswith("device cpu")  # what it builds, then the banner
    assert "encoder " in out.splitlines()[-1]  # the final line names the exported encoder


def test_wandb_logger_sends_every_metrics_row_and_resumes_the_same_run(tree, tmp_path, monkeypatch):
    import sys
    import types
    calls = []

    class FakeRun:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = ("--set", "run.logger=wandb", "--set", "run.knn_every_epochs=0", "--set", "run.log_every_steps=1")
    assert _train(tree, tmp_path / "run", *args, "--set", "optim.epochs=2", "--set", "run.max_steps_per_epoch=1") == 0
    inits = [c for c in calls if c[0] == "init"]
    assert len(inits) == 1 and inits[0][1]["resume"] == "allow"
    from tests.pretrain_helpers import read_metrics
    rows = read_metrics(tmp_path / "run")
    assert [c[1] for c in calls if c[0] == "log"] == [int(r["global_step"]) for r in rows]
    run_id = inits[0][1]["id"]
    calls.clear()
    assert _train(tree, tmp_path / "run", *args, "--set", "optim.epochs=3", "--set", "run.max_steps_per_epoch=1",
                  "--resume", "auto", "--allow-schedule-change") == 0  # a longer run: a new schedule
    assert [c[1]["id"] for c in calls if c[0] == "init"] == [run_id]


def test_wandb_logger_without_the_package_is_a_one_line_error(tree, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert _train(tree, tmp_path / "run", "--set", "run.logger=wandb") == 2
    assert "run.logger=wandb needs the wandb package" in _one_line(capsys)


def test_dry_run_refuses_what_the_run_would_refuse(tree, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tree, tmp_path / "file", "--dry-run") == 2
    assert "is a file" in _one_line(capsys)
    assert _train(tree, tmp_path / "run", "--set", "run.max_steps_per_epoch=1", "--set", "optim.epochs=2",
                  "--set", "run.knn_every_epochs=0") == 0
    capsys.readouterr()
    assert _train(tree, tmp_path / "run", "--dry-run") == 2  # holds checkpoints, and no --resume
    assert "already holds checkpoints" in _one_line(capsys)


def test_the_banner_names_the_suncet_weight_in_use():
    import types

    import torch

    from train.config import load_config
    from train.console import banner

    loaders = types.SimpleNamespace(source="tree", num_images=100, num_classes=10, num_labeled=10)
    shapes = ["data.unlabeled_batch_size=64", "data.support_classes=10", "data.support_images_per_class=2"]
    scaled = banner(load_config(None, shapes), 1, torch.device("cpu"), "fp32", loaders, 10, None)
    assert "SuNCEt weight 0.344 (1, paper_ratio)" in scaled  # 1 x (88 / 40) x 20 / 128
    fixed = banner(load_config(None, [*shapes, "loss.suncet_weight_rule=fixed"]), 1, torch.device("cpu"), "fp32",
                   loaders, 10, None)
    assert "SuNCEt weight 1 (1, fixed)" in fixed


@pytest.mark.parametrize("value, message", [
    ("[{count: 1}]", "augment.views[0].count must be >= 2"),
    ("[{count: 2}, {count: 0, resolution: 96}]", "augment.views[1].count must be >= 1"),
    ("[{count: 2}, {count: 6, resolution: 4}]", "augment.views[1].resolution must be >= 8, got 4"),
    ("[{count: 2}, {count: 6, crop_scale: [0.14, 0.05]}]", "augment.views[1].crop_scale must be in order (low <= high)"),
    ("[{count: 2}, {count: 6, solarize_prob: 2}]", "augment.views[1].solarize_prob must be in [0, 1]"),
    ("[{count: 2, resolutoin: 96}]", "augment.views[0].resolutoin (did you mean augment.views[0].resolution?)"),
    ("[{count: 40}, {count: 40}]", "ask for 80 views per image; at most 64"),
    ("6x96", "augment.views must be a list"),
])
def test_impossible_view_groups_are_one_line_errors(tree, tmp_path, capsys, value, message):
    assert _train(tree, tmp_path / "run", "--set", f"augment.views={value}", "--dry-run") == 2
    assert message in _one_line(capsys)


def test_the_support_views_name_an_existing_group(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", "--set", "data.support_view_group=1", "--dry-run") == 2
    assert "data.support_view_group must be the index of a view group in augment.views (0 .. 0), got 1" \
        in _one_line(capsys)


def test_the_banner_shows_the_view_groups():
    import types

    from train.config import load_config
    from train.console import banner

    loaders = types.SimpleNamespace(source="tree", num_images=100, num_classes=10, num_labeled=10)
    cfg = load_config(None, ["data.unlabeled_batch_size=64",
                             "augment.views=[{count: 2, resolution: 224}, {count: 6, resolution: 96}]"])
    assert "64 images x 2 x 224 px + 6 x 96 px views + " in banner(cfg, 1, torch.device("cpu"), "fp32", loaders, 10,
                                                                   None)
    assert "64 images x 2 views + " in banner(load_config(None, ["data.unlabeled_batch_size=64"]), 1,
                                              torch.device("cpu"), "fp32", loaders, 10, None)


def test_a_shipped_config_is_found_without_its_suffix_and_a_wrong_name_lists_them(capsys):
    from train.config import load_config

    assert load_config("repro_imagenette").data.val_split == "val"
    assert pretrain.main(["--config", "repro_imagenete", "--print-config"]) == 2
    err = _one_line(capsys)
    assert "config file not found: repro_imagenete (did you mean repro_imagenette?); shipped configs: demo," in err


def test_a_conversions_sub_folder_as_data_root_names_the_out_folder(tree, tmp_path, capsys):
    out = tmp_path / "converted"
    (out / "dali" / "train").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    assert _train(tree, tmp_path / "run", "--set", f"data.root={out / 'dali'}", "--dry-run") == 2
    err = _one_line(capsys)
    assert f"inside the converted dataset {out}: set data.root={out}, the conversion itself" in err
