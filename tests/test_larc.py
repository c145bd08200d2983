"""LARC (SwAV's optimizer) against a naive reference: apex LARC's gradient rescaling written as a
loop over parameters in Python floats, then torch's own ``torch.optim.SGD`` for the momentum step."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from train.larc import LARC, larc_param_groups

LR, MOMENTUM, WD, TC = 0.5, 0.9, 0.1, 0.02


def _toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _backward(model: nn.Module, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=next(model.parameters()).dtype)
    target = torch.randn(5, 2, generator=g, dtype=x.dtype)
    ((model(x) - target) ** 2).sum().backward()


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in t.flatten().tolist()))


def _larc_rescale_by_hand(model: nn.Module, weight_decay: float) -> None:
    """apex ``LARC.step`` (clip=False) before the wrapped SGD's step, parameter by parameter:
    the gradient becomes ``a * (grad + wd * p)`` with ``a = tc ||p|| / (||grad|| + wd ||p|| + 1e-8)``,
    left alone where a norm is zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is None:
                continue
            pn, gn = _norm(p), _norm(p.grad)
            if pn != 0 and gn != 0:
                a = TC * pn / (gn + pn * weight_decay + 1e-8)
                p.grad.add_(p, alpha=weight_decay).mul_(a)


def _reference(model: nn.Module, nesterov: bool) -> torch.optim.SGD:
    # weight_decay=0: LARC takes the decay out of the wrapped optimizer and applies it itself
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=0.0, nesterov=nesterov)


def _make(model: nn.Module, nesterov: bool = False, foreach: bool = False) -> LARC:
    return LARC(larc_param_groups(model, WD), lr=LR, momentum=MOMENTUM, trust_coefficient=TC, nesterov=nesterov,
                foreach=foreach)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_steps_match_sgd_with_larc_rescaling(steps, foreach, nesterov):
    model = _toy_model()
    reference = copy.deepcopy(model)
    opt, ref = _make(model, nesterov, foreach), _reference(reference, nesterov)
    for step, lr in enumerate([LR, 0.2, 0.05][:steps]):  # the schedule changes lr between steps
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"] = lr
        _backward(model, step)
        _backward(reference, step)
        opt.step()
        _larc_rescale_by_hand(reference, WD)
        ref.step()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                                       rtol=1e-12, atol=1e-14)


def test_every_parameter_gets_the_ratio_and_the_decay():
    """BatchNorm and bias parameters are adapted and decayed too (SwAV's ``model.parameters()``),
    unlike LARS's excluded group: a bias with gradient zero still moves by its weight decay."""
    model = _toy_model()
    groups = larc_param_groups(model, WD)
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}
    b = nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))  # ||b|| = 5
    b.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||grad|| = 1
    LARC([b], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001).step()
    a = 0.001 * 5.0 / (1.0 + 0.5 * 5.0 + 1e-8)
    expected = torch.tensor([3.0 - a * (0.6 + 0.5 * 3.0), -4.0 - a * (0.8 - 0.5 * 4.0)], dtype=torch.float64)
    torch.testing.assert_close(b.detach(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_norms_leave_the_gradient_alone(foreach):
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    p.grad = torch.full((2, 3), 2.0, dtype=torch.float64)
    LARC([p], lr=0.1, momentum=0.9, weight_decay=0.5, foreach=foreach).step()  # ||p|| == 0: plain SGD
    torch.testing.assert_close(p.detach(), torch.full((2, 3), -0.2, dtype=torch.float64))
    q = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    q.grad = torch.zeros(2, 2, dtype=torch.float64)
    LARC([q], lr=0.1, weight_decay=0.5, foreach=foreach).step()  # ||grad|| == 0: no decay either (apex)
    assert torch.equal(q.detach(), torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_the_learning_rate_scales_the_accumulated_velocity(foreach):
    """torch SGD's placement (outside the buffer), where LARS scales only the new gradient."""
    p = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))  # ||p|| = 0: no ratio, easy numbers
    opt = LARC([p], lr=1.0, momentum=0.5, foreach=foreach)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()  # v = 1, p = -1
    opt.param_groups[0]["lr"] = 0.1
    with torch.no_grad():
        p.zero_()
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()  # v = 0.5 * 1 + 1 = 1.5, p = 0 - 0.1 * 1.5
    torch.testing.assert_close(p.detach(), torch.tensor([-0.15], dtype=torch.float64))


def _copied_state(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _snapshot(model, opt):
    return [t.detach().clone() for t in model.parameters()] + [
        opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_skip_if_leaves_everything_bit_identical(foreach, nesterov):
    model = _toy_model()
    opt = _make(model, nesterov, foreach)
    _backward(model, 0)
    opt.step()
    reference = copy.deepcopy(model)
    ref_opt = _make(reference, nesterov)
    ref_opt.load_state_dict(_copied_state(opt))
    before = _snapshot(model, opt)
    _backward(model, 1)
    model[0].weight.grad[0, 0] = float("nan")
    model[1].bias.grad[1] = float("inf")
    opt.step(skip_if=torch.tensor(True))
    for a, b in zip(_snapshot(model, opt), before):
        assert torch.equal(a, b)
    _backward(model, 2)
    _backward(reference, 2)
    opt.step(skip_if=torch.tensor(False))
    ref_opt.step()
    for a, b in zip(_snapshot(model, opt), _snapshot(reference, ref_opt)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_grad_scaler_found_inf_handled_like_the_reference():
    """Under a GradScaler: the multi-tensor path unscales and skips itself, the loop leaves both
    to the scaler; both equal torch SGD + LARC on the unscaled gradients, overflow steps skipped."""
    poison = [False, True, False, False, True, False]
    runs = {}
    for foreach in (False, True):
        model = _toy_model().float()
        opt = _make(model, foreach=foreach)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        for seed, bad in enumerate(poison):
            model.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(seed)
            x, target = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
            scaler.scale(((model(x) - target) ** 2).sum()).backward()
            if bad:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        runs[foreach] = _snapshot(model, opt)
    reference = _toy_model().float()
    ref = _reference(reference, nesterov=False)
    for seed, bad in enumerate(poison):
        if bad:
            continue
        _backward(reference, seed)
        _larc_rescale_by_hand(reference, WD)
        ref.step()
    expected = _snapshot(reference, ref)
    for got in runs.values():
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": 0.1, "momentum": -0.5}, "momentum"),
     ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"), ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
     ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "nesterov")],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARC([nn.Parameter(torch.ones(2, 2))], **kwargs)
