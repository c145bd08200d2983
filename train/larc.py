"""LARC: SGD wrapped in a layer-wise trust ratio on every parameter, as SwAV's script trains
(facebookresearch/swav ``main_swav.py``: ``torch.optim.SGD`` with weight decay inside apex's
``LARC(trust_coefficient=0.001, clip=False)``). Written from that formula, without apex."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from train.lars import LayerwiseSGD, _mask_factors, _zero_if

EPS = 1e-8  # apex LARC's eps, in the trust ratio's denominator


class LARC(LayerwiseSGD):
    """Momentum SGD on a gradient rescaled by a per-tensor trust ratio, every parameter alike
    (biases and normalisation parameters too). For each parameter ``p`` with gradient ``grad``::

        if ||p|| > 0 and ||grad|| > 0:
            a = trust_coefficient * ||p|| / (||grad|| + weight_decay * ||p|| + eps)
            g = a * (grad + weight_decay * p)
        else:
            g = grad                                  (no trust ratio, no weight decay)
        v = momentum * v + g                          (v starts at 0: torch SGD's first step v = g)
        p = p - lr * v                                (nesterov: p - lr * (g + momentum * v))

    Against ``LARS`` (the suncet and SimCLR form): the learning rate multiplies *outside* the
    momentum buffer (torch SGD), so a new ``group['lr']`` scales the accumulated velocity too;
    the trust ratio divides by ``||grad|| + wd ||p||``, not ``||grad + wd p||``; and no
    parameter is excluded from the trust ratio or the weight decay (``clip=False``: the ratio
    is not capped at 1). ``foreach``, ``skip_if`` and a GradScaler's unscaling and inf flag
    work as in ``LARS`` (``train.lars.LayerwiseSGD``).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False, *, foreach: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, nesterov=nesterov)
        super().__init__(params, defaults, foreach)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("lr", "momentum", "weight_decay"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LARC: {key} must be a finite number >= 0, got {value!r}")
        tc = group["trust_coefficient"]
        if isinstance(tc, bool) or not isinstance(tc, (int, float)) or not math.isfinite(tc) or tc <= 0:
            raise ValueError(f"LARC: trust_coefficient must be a finite number > 0, got {tc!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("LARC: nesterov momentum requires momentum > 0")

    @staticmethod
    def _ratio(group: dict, p_norm: torch.Tensor, g_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trust ratio ``a``, weight decay applied) per tensor: ``(1, 0)`` where a norm is zero."""
        wd = group["weight_decay"]
        ok = (p_norm > 0) & (g_norm > 0)
        ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + EPS)
        return torch.where(ok, ratio, 1.0), torch.where(ok, ratio * wd, 0.0)

    def _update_per_parameter(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None) -> None:
        """The reference: one parameter at a time."""
        lr, momentum = group["lr"], group["momentum"]
        keep = m = None
        if skip is not None:
            keep, m = _mask_factors(skip, momentum, params[0])
        for p, v in zip(params, self._buffers(params)):
            grad = p.grad if skip is None else torch.where(skip, 0.0, p.grad)
            ratio, decay = self._ratio(group, torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad))
            if keep is not None:
                ratio, decay = ratio * keep, decay * keep
            g = grad * ratio + p * decay  # a * (grad + wd * p)
            v.mul_(momentum if m is None else m).add_(g)
            update = g + momentum * v if group["nesterov"] else v
            p.sub_(update * (lr if keep is None else lr * keep))

    def _update_foreach(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None,
                        inv_scale: torch.Tensor | None) -> None:
        """The same update with multi-tensor ops; the gradients are overwritten with ``g``."""
        lr, momentum = group["lr"], group["momentum"]
        bufs = self._buffers(params)
        g = [p.grad for p in params]
        keep = m = None
        if skip is not None:
            _zero_if(skip, g)
            keep, m = _mask_factors(skip, momentum, params[0])
        if inv_scale is not None:
            torch._foreach_mul_(g, inv_scale)
        ratio, decay = self._ratio(group, torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(g)))
        if keep is not None:
            ratio, decay = ratio * keep, decay * keep
        torch._foreach_mul_(g, list(ratio.unbind(0)))
        torch._foreach_add_(g, torch._foreach_mul(params, list(decay.unbind(0))))
        torch._foreach_mul_(bufs, momentum if m is None else m)
        torch._foreach_add_(bufs, g)
        update = torch._foreach_add(g, torch._foreach_mul(bufs, momentum)) if group["nesterov"] else bufs
        torch._foreach_sub_(params, torch._foreach_mul(update, lr if keep is None else lr * keep))


def larc_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """One group of every trainable parameter, with weight decay (SwAV's ``model.parameters()``)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
