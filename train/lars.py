"""LARS: momentum SGD with a layer-wise trust ratio (You et al. 2017), in the
form used by SimCLR and SuNCEt."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Momentum SGD with layer-wise adaptive rate scaling.

    For each parameter ``p`` with gradient ``grad`` in a group with
    ``lars_adapt=True`` (the default)::

        g     = grad + weight_decay * p
        trust = trust_coefficient * ||p|| / ||g||     (1.0 if ||p|| == 0 or ||g|| == 0)
        v     = momentum * v + lr * trust * g          (v starts at 0)
        p     = p - v                                   (nesterov: p - (momentum * v + lr * trust * g))

    In a group with ``lars_adapt=False`` (biases, normalisation parameters)
    neither weight decay nor the trust ratio is applied, whatever the group's
    ``weight_decay``: ``v = momentum * v + lr * grad; p = p - v``.

    The learning rate sits inside the momentum buffer (as in SimCLR's
    TensorFlow LARS), so a new ``group['lr']`` set by the schedule scales only
    the new gradient term, not the accumulated velocity. Norms are per
    parameter tensor, ``||.||`` the Frobenius norm. Parameters without a
    gradient are skipped. The state (``momentum_buffer`` per parameter) and
    the group options round-trip through ``state_dict``/``load_state_dict``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        nesterov: bool = False,
        lars_adapt: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            lars_adapt=lars_adapt,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("lr", "momentum", "weight_decay"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LARS: {key} must be a finite number >= 0, got {value!r}")
        tc = group["trust_coefficient"]
        if isinstance(tc, bool) or not isinstance(tc, (int, float)) or not math.isfinite(tc) or tc <= 0:
            raise ValueError(f"LARS: trust_coefficient must be a finite number > 0, got {tc!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("LARS: nesterov momentum requires momentum > 0")
        if not isinstance(group["lars_adapt"], bool):
            raise ValueError(f"LARS: lars_adapt must be True or False, got {group['lars_adapt']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                scale = lr
                if group["lars_adapt"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ok = (p_norm > 0) & (g_norm > 0)
                    trust = torch.where(ok, group["trust_coefficient"] * p_norm / torch.where(ok, g_norm, 1.0), 1.0)
                    scale = lr * trust  # 0-d tensor: no host sync
                step_g = g * scale  # lr * trust * g
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = state["momentum_buffer"]
                v.mul_(momentum).add_(step_g)
                p.sub_(v * momentum + step_g if group["nesterov"] else v)
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two LARS parameter groups for ``model``'s trainable parameters:
    tensors with ``ndim > 1`` (conv and linear weights) get weight decay and
    the trust ratio; tensors with ``ndim <= 1`` (biases, BatchNorm/LayerNorm
    weights and biases) get plain momentum SGD (``weight_decay=0``,
    ``lars_adapt=False``). Both groups are always returned, in this order,
    possibly with an empty ``params`` list."""
    adapted, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapted if p.ndim > 1 else excluded).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adapt": False},
    ]
