"""LARS against updates computed by hand from the documented formula."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from train.lars import LARS, lars_param_groups

LR, MOMENTUM, WD, TC = 0.5, 0.9, 0.1, 0.02


def _toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    with torch.no_grad():  # non-trivial BN affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _backward(model: nn.Module, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = torch.randn(5, 2, generator=g, dtype=torch.float64)
    ((model(x) - target) ** 2).sum().backward()


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in t.flatten().tolist()))


def _by_hand(p, grad, v, lr, adapt, nesterov=False):
    """One update from the docstring formula; returns (new p, new v)."""
    if adapt:
        g = grad + WD * p
        pn, gn = _norm(p), _norm(g)
        trust = TC * pn / gn if pn > 0 and gn > 0 else 1.0
        step = lr * trust * g
    else:
        step = lr * grad
    v = MOMENTUM * v + step
    update = MOMENTUM * v + step if nesterov else v
    return p - update, v


def _make(model, nesterov=False, foreach=False):
    return LARS(lars_param_groups(model, WD), lr=LR, momentum=MOMENTUM, trust_coefficient=TC, nesterov=nesterov,
                foreach=foreach)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_match_hand_computed_updates(nesterov, foreach):
    model = _toy_model()
    opt = _make(model, nesterov, foreach)
    adapt = {id(model[0].weight)}  # the only ndim > 1 parameter
    params = list(model.parameters())
    velocity = {id(p): torch.zeros_like(p) for p in params}
    expected = {id(p): p.detach().clone() for p in params}
    for step, lr in enumerate([LR, 0.2]):  # the schedule changes lr between steps
        _backward(model, seed=step)
        for p in params:
            expected[id(p)], velocity[id(p)] = _by_hand(
                expected[id(p)], p.grad.clone(), velocity[id(p)], lr, id(p) in adapt, nesterov
            )
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for p in params:
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], velocity[id(p)], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_excluded_group_is_plain_momentum_sgd_without_weight_decay(foreach):
    w = nn.Parameter(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    # weight_decay inherited from the defaults must not reach the excluded group
    opt = LARS([{"params": [w]}, {"params": [b], "lars_adapt": False}], lr=0.1, momentum=0.5, weight_decay=0.3,
               foreach=foreach)
    b.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([3.0 - 0.1, -4.0 - 0.1], dtype=torch.float64))
    b.grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    opt.step()  # v = 0.5 * [0.1, 0.1] + 0.1 * [2, 0] = [0.25, 0.05]
    torch.testing.assert_close(b.detach(), torch.tensor([2.9 - 0.25, -4.1 - 0.05], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_weight_decay_enters_before_the_trust_ratio(foreach):
    p = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||p|| = 5
    p.grad = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)  # g = grad + 0.5 p = 0 exactly
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001, foreach=foreach)
    opt.step()  # ||g|| == 0: trust 1, update 0
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    p.grad = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # g = [1.5, 3.0]
    opt.step()
    g = torch.tensor([[1.5, 3.0]], dtype=torch.float64)
    trust = 0.001 * 5.0 / math.sqrt(1.5**2 + 3.0**2)
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64) - trust * g)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_norm_parameter_uses_trust_one(foreach):
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    p.grad = torch.full((2, 3), 2.0, dtype=torch.float64)
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.001, foreach=foreach)
    opt.step()  # ||p|| == 0: trust 1, g = grad
    torch.testing.assert_close(p.detach(), torch.full((2, 3), -0.2, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    q.grad = torch.zeros(2, 2, dtype=torch.float64)
    LARS([q], lr=0.1, foreach=foreach).step()  # both norms zero
    assert torch.equal(q.detach(), torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_parameters_without_grad_are_skipped(foreach):
    model = _toy_model()
    opt = _make(model, foreach=foreach)
    before = model[1].weight.detach().clone()
    _backward(model, seed=0)
    model[1].weight.grad = None
    opt.step()
    assert torch.equal(model[1].weight.detach(), before)
    assert model[1].weight not in opt.state


def test_lars_param_groups_splits_by_ndim():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))
    model[3].bias.requires_grad_(False)  # frozen: in no group
    groups = lars_param_groups(model, 1e-6)
    assert [g["lars_adapt"] for g in groups] == [True, False]
    assert [g["weight_decay"] for g in groups] == [1e-6, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(model[0].weight), id(model[3].weight)}
    assert ids[1] == {id(p) for p in (model[0].bias, model[1].weight, model[1].bias, model[4].weight, model[4].bias)}


def test_state_dict_round_trip_continues_identically():
    model = _toy_model()
    opt = _make(model)
    for seed in range(2):
        _backward(model, seed)
        opt.step()
    clone = copy.deepcopy(model)
    restored = _make(clone)
    for group in restored.param_groups:
        group["lr"] = 123.0  # overwritten by the loaded state
    buffer = io.BytesIO()  # through bytes, as a checkpoint would: no shared tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    assert [g["lars_adapt"] for g in restored.param_groups] == [True, False]
    assert [g["lr"] for g in restored.param_groups] == [LR, LR]
    _backward(model, 2)
    _backward(clone, 2)
    opt.step()
    restored.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def _copied_state(opt) -> dict:
    """The optimizer's state through bytes, as a checkpoint would: no tensor shared with ``opt``."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _snapshot(model, opt):
    return [t.detach().clone() for t in model.parameters()] + [
        opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_skip_if_leaves_everything_bit_identical_and_false_changes_nothing(foreach, nesterov):
    model = _toy_model()
    opt = _make(model, nesterov, foreach)
    _backward(model, 0)
    opt.step()
    reference = copy.deepcopy(model)
    ref_opt = _make(reference, nesterov)
    ref_opt.load_state_dict(_copied_state(opt))
    before = _snapshot(model, opt)
    _backward(model, 1)
    model[0].weight.grad[0, 0] = float("nan")  # what a non-finite step leaves behind
    model[1].bias.grad[1] = float("inf")
    opt.step(skip_if=torch.tensor(True))
    for a, b in zip(_snapshot(model, opt), before):
        assert torch.equal(a, b)  # bit for bit: no NaN/inf reached parameters or momentum
    # A step that is not skipped is the unmasked update, bit for bit.
    _backward(model, 2)
    _backward(reference, 2)
    opt.step(skip_if=torch.tensor(False))
    ref_opt.step()
    for a, b in zip(_snapshot(model, opt), _snapshot(reference, ref_opt)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def _scaled_backward(model, scaler, seed, poison=False):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    scaler.scale(((model(x) - target) ** 2).sum()).backward()
    if poison:  # an fp16 overflow
        model[0].weight.grad[0, 0] = float("inf")


def test_grad_scaler_hands_unscaling_and_the_inf_check_to_the_foreach_path():
    """Under a GradScaler the multi-tensor path unscales and skips itself
    (``_step_supports_amp_scaling``); the per-parameter path leaves both to the
    scaler (unscale_ + .item()). Same parameters, momentum and scale."""
    runs = {}
    for foreach in (False, True):
        model = _toy_model().float()
        opt = _make(model, nesterov=True, foreach=foreach)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        assert opt._step_supports_amp_scaling is foreach
        for seed, poison in enumerate([False, True, False, False, True, False]):
            _scaled_backward(model, scaler, seed, poison)
            scaler.step(opt)
            scaler.update()
        runs[foreach] = (_snapshot(model, opt), scaler.get_scale())
    (loop, loop_scale), (multi, multi_scale) = runs[False], runs[True]
    # ok, inf (back off), ok, ok (grow: 2 in a row), inf (back off), ok
    assert loop_scale == multi_scale == 2.0**12 / 2 * 2 / 2
    for a, b in zip(multi, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_foreach_and_loop_checkpoints_are_interchangeable():
    model = _toy_model()
    opt = _make(model, foreach=True)
    for seed in range(2):
        _backward(model, seed)
        opt.step()
    clone = copy.deepcopy(model)
    loop = _make(clone, foreach=False)
    loop.load_state_dict(_copied_state(opt))
    _backward(model, 2)
    _backward(clone, 2)
    opt.step()
    loop.step()
    for a, b in zip(_snapshot(model, opt), _snapshot(clone, loop)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.1, "momentum": -0.5}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"lr": 0.1, "lars_adapt": 1}, "lars_adapt"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.ones(2, 2))], **kwargs)
