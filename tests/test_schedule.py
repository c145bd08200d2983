"""Warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch

from train.schedule import WarmupCosineSchedule, lr_at

# 11 steps/epoch x 10 epochs = 110 steps (0..109); 1 warm-up epoch = 11 steps;
# the cosine phase runs over steps 11..109, i.e. 98 intervals, midpoint 60.
S = dict(steps_per_epoch=11, epochs=10, warmup_epochs=1.0, start_lr=0.1, lr=2.0, final_lr=0.02)


def test_warmup_endpoints_and_linearity():
    assert lr_at(0, **S) == pytest.approx(0.1)
    assert lr_at(11, **S) == pytest.approx(2.0)  # end of warm-up is the peak
    assert lr_at(5, **S) == pytest.approx(0.1 + 1.9 * 5 / 11)
    values = [lr_at(s, **S) for s in range(12)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_cosine_midpoint_and_a_quarter_by_hand():
    assert lr_at(60, **S) == pytest.approx((2.0 + 0.02) / 2)
    t = (30 - 11) / 98
    assert lr_at(30, **S) == pytest.approx(0.02 + (2.0 - 0.02) * 0.5 * (1 + math.cos(math.pi * t)))


def test_final_value_and_clamp():
    assert lr_at(109, **S) == 0.02
    assert lr_at(108, **S) > 0.02
    assert lr_at(110, **S) == 0.02
    assert lr_at(10_000, **S) == 0.02


def test_cosine_phase_is_monotonic_decreasing():
    values = [lr_at(s, **S) for s in range(11, 110)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_no_warmup_and_one_step_cosine():
    assert lr_at(0, **{**S, "warmup_epochs": 0.0}) == pytest.approx(2.0)
    # warm-up leaves only the last step to the cosine phase: it is final_lr
    tight = dict(steps_per_epoch=4, epochs=2, warmup_epochs=1.75, start_lr=0.0, lr=1.0, final_lr=0.5)
    assert [lr_at(s, **tight) for s in range(8)] == pytest.approx([0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 0.5])


def test_fractional_warmup_rounds_to_steps():
    # 0.29 * 100 is 28.999999999999996 in floating point: 29 warm-up steps
    s = dict(steps_per_epoch=100, epochs=2, warmup_epochs=0.29, start_lr=0.0, lr=1.0, final_lr=0.0)
    assert lr_at(29, **s) == pytest.approx(1.0)
    assert lr_at(28, **s) == pytest.approx(28 / 29)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"warmup_epochs": 10.0}, "cosine phase"),  # all steps would be warm-up
        ({"start_lr": float("nan")}, "start_lr"),
        ({"lr": -1.0}, "lr"),
        ({"final_lr": float("inf")}, "final_lr"),
    ],
)
def test_rejects_bad_settings(override, match):
    with pytest.raises(ValueError, match=match):
        lr_at(0, **{**S, **override})


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_rejects_bad_step(step):
    with pytest.raises(ValueError, match="step"):
        lr_at(step, **S)


def test_schedule_object_matches_function_and_sets_all_groups():
    sched = WarmupCosineSchedule(
        steps_per_epoch=11, epochs=10, warmup_epochs=1.0, start_lr=0.1, peak_lr=2.0, final_lr=0.02
    )
    assert sched.total_steps == 110
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(2)], lr=9.0)
    for step in (0, 7, 60, 109, 500):
        value = sched.apply(opt, step)
        assert value == lr_at(step, **S) == sched.lr(step)
        assert [g["lr"] for g in opt.param_groups] == [value, value]
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupCosineSchedule(steps_per_epoch=1, epochs=1, warmup_epochs=1.0, start_lr=0.0, peak_lr=1.0, final_lr=0.0)
