"""Progress lines: every line, plain or the terminal bar's, names the epoch of all, the step in the
epoch and the run, the elapsed time and the whole run's ETA (fields checked with a fake clock, not
timed); --dry-run says what a step takes and what the run would."""
from __future__ import annotations

import io
import re
import types

import torch

from tests.pretrain_helpers import make_split_tree, tiny_overrides
from tests.test_pretrain import _set_args
from train import pretrain
from train.config import load_config
from train.console import Progress, banner, duration


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_duration_is_hours_minutes_seconds():
    assert [duration(s) for s in (0, 59.6, 61, 3600 * 27 + 5)] == ["0:00:00", "0:01:00", "0:01:01", "27:00:05"]


def test_a_plain_line_names_the_epoch_of_all_the_step_the_elapsed_time_and_the_runs_eta():
    clock, out = Clock(100.0), io.StringIO()  # not a terminal: plain lines at log steps
    progress = Progress(epochs=4, steps_per_epoch=5, global_step=0, enabled=True, stream=out, clock=clock)
    clock.now = 130.0  # the first step, with the one-time work: no rate yet
    progress.update(1)
    assert progress.line({}) == "epoch 1/4 step 1/5 (run 1/20)  elapsed 0:00:30  ETA ?"
    clock.now = 138.0  # then 2 s a step: the 15 steps left after the 5th take 30 s
    for step in (2, 3, 4, 5):
        progress.update(step)
    progress.show({"loss": "4.1000", "lr": "0.1"}, log_step=True)
    assert out.getvalue() == "epoch 1/4 step 5/5 (run 5/20)  elapsed 0:00:38  ETA 0:00:30  loss 4.1000  lr 0.1\n"
    progress.show({"loss": "4.0"}, log_step=False)  # not a log step: no line
    clock.now = 140.0
    progress.update(6)
    assert progress.line({}) == "epoch 2/4 step 1/5 (run 6/20)  elapsed 0:00:40  ETA 0:00:28"


def test_a_resumed_run_counts_its_eta_from_the_steps_it_trains():
    clock = Clock(0.0)
    progress = Progress(epochs=4, steps_per_epoch=5, global_step=12, enabled=True, stream=io.StringIO(), clock=clock)
    assert progress.line({}) == "epoch 3/4 step 2/5 (run 12/20)  elapsed 0:00:00  ETA ?"
    clock.now = 50.0
    progress.update(13)
    clock.now = 60.0
    progress.update(15)  # 5 s a step since the first step of this process: 5 left, 25 s
    assert progress.line({}) == "epoch 3/4 step 5/5 (run 15/20)  elapsed 0:01:00  ETA 0:00:25"


def test_the_terminal_bar_carries_the_same_fields():
    clock, out = Clock(0.0), Terminal()
    progress = Progress(epochs=2, steps_per_epoch=5, global_step=0, enabled=True, stream=out, clock=clock)
    clock.now = 10.0
    progress.update(1)
    progress.show({"loss": "4.2"}, log_step=True)
    clock.now = 12.0
    progress.update(2)
    progress.note("epoch 1/2: kNN top-1 30.00%")
    progress.close()
    drawn = out.getvalue()
    assert "epoch 1/2 step 2/5 (run 2/10)" in drawn and "elapsed 0:00:12  ETA 0:00:16  loss 4.2" in drawn
    assert "epoch 1/2: kNN top-1 30.00%\n" in drawn


def test_dry_run_says_what_a_step_takes_and_what_the_run_would(tmp_path, capsys):
    root = make_split_tree(tmp_path / "data")
    argv = ["--device", "cpu", *_set_args(tiny_overrides(root, tmp_path / "run")), "--dry-run"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    said = re.search(r"dry run: one step trained, loss [\d.]+ \((\d+:\d\d:\d\d) with the one-time work\); one more, "
                     r"timed: ([\d.e-]+) s a step, so the run's 10 steps \(2 epochs x 5\) take about "
                     r"(\d+:\d\d:\d\d), kNN evaluations and checkpoints aside; nothing written", out)
    assert said, out
    assert not (tmp_path / "run").exists()


def test_the_banner_says_once_why_a_paws_loss_can_be_negative():
    loaders = types.SimpleNamespace(source="tree", num_images=100, num_classes=10, num_labeled=10)

    def said(*overrides: str) -> str:
        return banner(load_config(None, list(overrides)), 1, torch.device("cpu"), "fp32", loaders, 10, None)

    paws = said("loss.method=paws")
    assert paws.count("can be negative") == 1 and "me-max" in paws
    assert "negative" not in said("loss.method=paws", "loss.paws.me_max=false") + said("loss.method=swav")
