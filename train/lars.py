"""LARS: momentum SGD with a layer-wise trust ratio (You et al. 2017), in the
form used by SimCLR and SuNCEt."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


class LayerwiseSGD(torch.optim.Optimizer):
    """What LARS and LARC (``train.larc``) share: the step's handling of a GradScaler
    (``_step_supports_amp_scaling``: the multi-tensor path unscales and takes the inf flag
    without a host sync), ``skip_if`` masking, and the momentum buffers. A subclass gives the
    update: ``_update_per_parameter`` (the reference) and ``_update_foreach``."""

    def __init__(self, params: Iterable, defaults: dict, foreach: bool) -> None:
        super().__init__(params, defaults)
        self.foreach = bool(foreach)  # not a group option: checkpoints load into either path

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by ``torch.amp.GradScaler.step``: when True, the scaler does not
        unscale the gradients nor call ``.item()`` on its inf check; it sets
        ``self.grad_scale`` and ``self.found_inf`` (device tensors) for the
        duration of ``step`` and the optimizer unscales and masks the update itself.
        The multi-tensor path does; the per-parameter loop leaves both to the
        scaler, as before (one host sync per step)."""
        return self.foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *,
             skip_if: torch.Tensor | None = None) -> torch.Tensor | None:
        """One update. ``skip_if``: a 0-d bool tensor on the parameters' device;
        where it is True the step leaves parameters and momentum buffers exactly
        as they are, without a host sync (the training step passes it when it
        does not sync per step). With a GradScaler on the multi-tensor path the
        scaler's ``found_inf`` skips the same way."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            skip_if = found_inf > 0 if skip_if is None else skip_if | (found_inf > 0)
        inv_scale = None
        if grad_scale is not None:  # as GradScaler.unscale_: reciprocal in float64, then float32
            inv_scale = grad_scale.double().reciprocal().float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if not params:
                continue
            if self.foreach:
                self._update_foreach(group, params, skip_if, inv_scale)
            else:
                if inv_scale is not None:
                    raise RuntimeError(f"{type(self).__name__}: grad_scale is only handled by the multi-tensor path (foreach=True)")
                self._update_per_parameter(group, params, skip_if)
        return loss

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(state["momentum_buffer"])
        return out

    def _update_per_parameter(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _update_foreach(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None,
                        inv_scale: torch.Tensor | None) -> None:
        raise NotImplementedError


class LARS(LayerwiseSGD):
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

    ``foreach=True`` computes the same update with multi-tensor
    (``torch._foreach_*``) ops, and takes over GradScaler's unscaling and inf
    check so that an fp16 step needs no host sync (see
    ``_step_supports_amp_scaling``). ``foreach`` is a property of the
    optimizer, not of the state: a checkpoint of either path loads into the other.
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
        *,
        foreach: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            lars_adapt=lars_adapt,
        )
        super().__init__(params, defaults, foreach)

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

    def _update_per_parameter(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None) -> None:
        """The reference: one small tensor op after another, parameter by parameter."""
        lr, momentum = group["lr"], group["momentum"]
        keep = m = None
        if skip is not None:  # masked: a skipped step changes nothing, NaN/inf gradients included
            keep, m = _mask_factors(skip, momentum, params[0])
        for p, v in zip(params, self._buffers(params)):
            g = p.grad if skip is None else torch.where(skip, 0.0, p.grad)
            scale = lr
            if group["lars_adapt"]:
                g = g.add(p, alpha=group["weight_decay"])
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                ok = (p_norm > 0) & (g_norm > 0)
                trust = torch.where(ok, group["trust_coefficient"] * p_norm / torch.where(ok, g_norm, 1.0), 1.0)
                scale = lr * trust  # 0-d tensor: no host sync
            if keep is not None:
                scale = scale * keep
            step_g = g * scale  # lr * trust * g
            v.mul_(momentum if m is None else m).add_(step_g)
            update = v * momentum + step_g if group["nesterov"] else v
            p.sub_(update if keep is None else update * keep)

    def _update_foreach(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None,
                        inv_scale: torch.Tensor | None) -> None:
        """The same update with multi-tensor (``torch._foreach_*``) ops: a few
        kernels per group instead of a dozen per parameter. The trust ratios are
        one vectorised computation over the stacked norms; only multiplying each
        gradient by its own ratio is one op per tensor (the shapes differ, so
        ``_foreach_mul`` with a list of 0-d tensors runs tensor by tensor).
        The gradients are overwritten with the step (as ``GradScaler.unscale_``
        overwrites them), so no gradient-sized temporaries are allocated.
        Assumes the parameters of a group share dtype and device, as in
        ``lars_param_groups`` of one model."""
        lr, momentum = group["lr"], group["momentum"]
        bufs = self._buffers(params)
        g = [p.grad for p in params]
        keep = m = None
        if skip is not None:  # NaN/inf gradients of a skipped step must not reach the state
            _zero_if(skip, g)
            keep, m = _mask_factors(skip, momentum, params[0])
        if inv_scale is not None:  # as GradScaler.unscale_
            torch._foreach_mul_(g, inv_scale)
        if group["lars_adapt"]:
            torch._foreach_add_(g, params, alpha=group["weight_decay"])  # g = grad + weight_decay * p
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(g))
            ok = (p_norm > 0) & (g_norm > 0)
            trust = torch.where(ok, group["trust_coefficient"] * p_norm / torch.where(ok, g_norm, 1.0), 1.0)
            scale = lr * trust
            if keep is not None:
                scale = scale * keep
            torch._foreach_mul_(g, list(scale.unbind(0)))  # g = lr * trust * g
        else:
            torch._foreach_mul_(g, lr if keep is None else lr * keep)
        torch._foreach_mul_(bufs, momentum if m is None else m)
        torch._foreach_add_(bufs, g)
        if group["nesterov"]:
            update = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(update, g)
        else:
            update = bufs
        if keep is not None:
            update = torch._foreach_mul(update, keep)
        torch._foreach_sub_(params, update)


def _zero_if(skip: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Where ``skip`` is True, set every element of ``tensors`` to +0.0, NaN
    and inf included, in place and without a host sync: their bit patterns,
    viewed as integers, are multiplied by 0 (by 1 otherwise, which leaves them
    unchanged). One multi-tensor op per integer width, where ``torch.where``
    would be one op per tensor."""
    views: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
        views.setdefault((int_dtype, t.device), []).append(t.view(int_dtype))
    for (int_dtype, device), group in views.items():
        torch._foreach_mul_(group, (~skip).to(device=device, dtype=int_dtype))


def _mask_factors(skip: torch.Tensor, momentum: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, momentum) as 0-d tensors of ``like``'s dtype: (1, momentum) for a
    step that is taken, (0, 1) for one that is skipped (then ``v = 1 * v + 0``,
    ``p = p - 0 * update``: both unchanged, bit for bit)."""
    keep = (~skip).to(like.dtype)
    m = torch.where(skip, torch.ones((), dtype=like.dtype, device=like.device),
                    torch.full((), momentum, dtype=like.dtype, device=like.device))
    return keep, m


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
