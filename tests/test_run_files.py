"""The run directory's files as people find and edit them: a hand-edited metrics.csv is refused
naming the file and line before anything is written, a resume says which rows it drops, a figure
that cannot be drawn is a warning, an unreadable summary.json is set aside, and a finished run
resumed writes nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.pretrain_helpers import make_split_tree, read_metrics, tiny_overrides
from tests.test_pretrain import _set_args
from train import checkpoint as ckpt
from train import pretrain

SETTINGS = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "run.keep_checkpoints": 10, "run.knn_every_epochs": 1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished 2-epoch run (5 steps an epoch, a checkpoint every 2 steps, kNN every epoch)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain.main(_args(data_root, run_dir)) == 0
    return run_dir


def _args(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", *_set_args(tiny_overrides(data_root, run_dir, **SETTINGS)), *extra]


def _stopped_at_step_4(finished: Path, run_dir: Path) -> Path:
    """The finished run as it was when stopped after the checkpoint of step 4 (rows up to 10 kept)."""
    shutil.copytree(finished, run_dir)
    for path in ckpt.list_checkpoints(run_dir):
        if ckpt.checkpoint_step(path) > 4:
            path.unlink()
    (run_dir / "summary.json").unlink()
    return run_dir


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _edit_line(path: Path, number: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("".join(lines))


def _set_field(line: str, column: int, value: str) -> str:
    values = line.rstrip("\n").split(",")
    values[column] = value
    return ",".join(values) + "\n"


HEADER = "global_step,epoch,step,lr,loss".split(",")
EDITS = {  # hand edits of metrics.csv: (line edited, how, what the refusal says)
    "header deleted": (1, lambda line: "", "metrics.csv line 1 is not metrics.csv's header"),
    "global_step abc": (4, lambda line: _set_field(line, 0, "abc"), "metrics.csv line 4: global_step is 'abc'"),
    "epoch x": (4, lambda line: _set_field(line, 1, "x"), "metrics.csv line 4: epoch is 'x'"),
    "loss oops": (5, lambda line: _set_field(line, HEADER.index("loss"), "oops"),
                  "metrics.csv line 5: loss is 'oops', not a number"),
    "a value too many": (3, lambda line: line.rstrip("\n") + ",7\n",
                         "metrics.csv line 3: 18 values for the header's 17 columns"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_metrics_csv_is_refused_naming_the_line_and_nothing_is_written(finished, tmp_path, capsys,
                                                                                       data_root, edit):
    """Before: the header deleted, resume exited 0 keeping only the new rows; global_step 'abc' a
    traceback; epoch 'x' or loss 'oops' trained to the end, then crashed drawing the curves."""
    run_dir = _stopped_at_step_4(finished, tmp_path / "run")
    line, change, message = EDITS[edit]
    _edit_line(run_dir / "metrics.csv", line, change)
    before = _files(run_dir)
    assert pretrain.main(_args(data_root, run_dir, "--resume", "auto")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], errors
    assert _files(run_dir) == before  # no row dropped, no TensorBoard file, no config rewritten


def test_a_resume_keeps_the_rows_before_its_checkpoint_says_what_it_drops_and_marks_itself(finished, tmp_path,
                                                                                             data_root, capsys):
    run_dir = _stopped_at_step_4(finished, tmp_path / "run")
    rows = read_metrics(run_dir)
    later = [r for r in rows if int(r["global_step"]) > 4]
    assert pretrain.main(_args(data_root, run_dir, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"{len(later)} row(s) after global step 4, the checkpoint's, dropped; those steps are trained again" in out
    after = read_metrics(run_dir)
    assert after[:len(rows) - len(later)] == [r for r in rows if int(r["global_step"]) <= 4]
    assert [(r["global_step"], r["epoch"], r["step"]) for r in after if r["resumed"]] == [("4", "0", "4")]
    assert [r["global_step"] for r in after if r["lr"] and not r["loss"]] == ["0"]  # the warm-up's start, logged
    assert [int(r["global_step"]) for r in after if r["loss"]] == list(range(1, 11))


def test_a_figure_that_cannot_be_drawn_is_a_warning_and_the_run_ends_as_usual(data_root, tmp_path, monkeypatch,
                                                                                capsys):
    import train.run_logger

    def broken_draw(*args):
        raise ValueError("could not convert string to float: 'oops'")

    monkeypatch.setattr(train.run_logger, "draw", broken_draw)
    run_dir = tmp_path / "run"
    assert pretrain.main(_args(data_root, run_dir)) == 0
    err = capsys.readouterr().err
    assert "curves.png not drawn (ValueError: could not convert string to float: 'oops'); training goes on" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["encoder"]).is_file() and summary["global_step"] == 10


def test_a_finished_run_resumed_says_so_and_writes_nothing(finished, tmp_path, data_root, capsys):
    """Before: 'resumed ... at epoch 2 step 0' and a new TensorBoard file."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = _files(run_dir)
    assert pretrain.main(_args(data_root, run_dir, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"note: the run in {run_dir} is finished (2 epochs, 10 steps; summary.json): nothing to train" in out
    assert "resumed from" not in out
    assert _files(run_dir) == before


def test_an_unreadable_summary_is_set_aside_and_the_run_finishes_it_again(finished, tmp_path, data_root, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    expected = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text('{"global_step": 10, "knn_to')  # cut short
    assert pretrain.main(_args(data_root, run_dir, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "summary.json could not be read" in out and "set aside as summary.json.unreadable" in out
    assert (run_dir / "summary.json.unreadable").read_text() == '{"global_step": 10, "knn_to'
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["knn_top1"] == expected["knn_top1"] and summary["global_step"] == 10
