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
    assert "model.arch must be one of resnet50, resnet18, resnet18-small, got 'resnet51'" in _one_line(capsys)


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
