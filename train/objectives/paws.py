"""PAWS (Assran et al. 2021), as the official suncet repository's ``src/losses.py``
(``init_paws_loss``) and ``src/paws_train.py`` train it.

Views: the support images (``data.support_views`` views of group 0's recipe;
PAWS takes one on ImageNet, ``15 classes x 7 images`` per GPU with
``data.unique_classes``) and every view of every unlabeled image. Head: SimCLR's
3-layer projection (``h``) and a 4x bottleneck prediction head (``p``),
``model.head.PAWSHead``.

The loss: a soft nearest-neighbour prediction of each view's anchor ``p``
against the support anchors of every rank (``softmax(cos / tau) @ Y``, tau =
``loss.temperature``, ``Y`` the support labels one-hot over the gathered batch's
classes with ``loss.paws.label_smoothing``: off value ``s / C``, on value ``1 - s
+ s / C``), trained by cross-entropy towards targets made the same way from the
projections ``h`` (detached) of the *other* global view, sharpened (``p^(1/T)``,
T = ``loss.paws.sharpen``, renormalised; values below 1e-4 zeroed as in the
official code); every local view takes the mean target of the two global views.
With ``loss.paws.me_max`` the loss adds ``sum(pbar log pbar)``, minus the entropy
of the mean sharpened prediction over the global batch. The support anchors are
gathered with their gradient (each rank's rows get every rank's gradient); the
mean prediction is averaged over ranks with an identity backward, the official
code's ``AllReduce``: with DDP's averaging, a W-rank step then equals one process
on the gathered batch (tested).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.head import PAWSHead
from train.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_mean_with_grad, all_reduce_no_grad
from train.objectives import NoState, ObjectiveSpec, Outputs

VIEWS = "the support images and every view; targets from the first two views of group 0"
HEAD_PER_RESOLUTION = True  # the suncet repository's src/resnet.py: backbone and head per resolution group
TARGET_FLOOR = 1e-4  # sharpened targets below this are zeroed (the official code's numerical guard)


def head(cfg) -> Callable[[int], nn.Module]:
    m = cfg.model
    return lambda feature_dim: PAWSHead(feature_dim, m.head_hidden_dim, m.head_out_dim, m.pred_hidden_dim)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    sharp = p ** (1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


def step_classes(spec: ObjectiveSpec) -> int:
    """The distinct classes of a step's gathered support set: ``data.support_classes``, times the
    ranks with ``data.unique_classes`` (the sampler draws a step's classes distinct, ``pipelines.sampler``)."""
    d = spec.cfg.data
    return d.support_classes * (spec.world_size if d.unique_classes else 1)


def smoothed_one_hot(labels: torch.Tensor, classes: int, smoothing: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[M, classes]`` label matrix of ``labels``, which hold ``classes`` distinct values, in sorted
    order (``torch.unique``'s, without its wait for the device: the number of classes is known)."""
    ordered, order = labels.sort(stable=True)
    first = torch.cat([torch.ones_like(ordered[:1], dtype=torch.bool), ordered[1:] != ordered[:-1]])
    column = torch.empty_like(order).scatter_(0, order, first.long().cumsum(0) - 1)  # classes below the row's
    off = smoothing / classes
    y = torch.full((len(labels), classes), off, device=labels.device, dtype=dtype)
    return y.scatter_(1, column[:, None], 1.0 - smoothing + off)


def snn(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft nearest-neighbour class probabilities of ``query`` rows: ``softmax(cos / tau) @ labels``."""
    return F.softmax(F.normalize(query, dim=1) @ supports.T / tau, dim=1) @ labels


class PAWS(NoState):
    def __init__(self, spec: ObjectiveSpec):
        loss = spec.cfg.loss
        self.settings, self.tau = loss.paws, loss.temperature
        self.unlabeled, self.views, self.world_size = spec.unlabeled, spec.views, spec.world_size
        self.classes = step_classes(spec)
        self.names = ("loss_paws", "loss_memax", "loss")

    def __call__(self, views: Outputs, support: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, p = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in views)
        hs, ps = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in support)
        b = self.unlabeled
        y = smoothed_one_hot(all_gather_no_grad(labels.to(p.device)), self.classes, self.settings.label_smoothing,
                             p.dtype)
        # 1. anchors: every view's prediction against every rank's support predictions (with gradient)
        probs = snn(p, all_gather_with_grad(F.normalize(ps, dim=1)), y, self.tau)  # [V*B, C]
        # 2. targets: the projections of the other global view, sharpened; local views take their mean
        with torch.no_grad():
            supports = all_gather_no_grad(F.normalize(hs, dim=1))
            t = sharpen(snn(h[: 2 * b], supports, y, self.tau), self.settings.sharpen)
            t = torch.cat([t[b:], t[:b]])  # view 0's target from view 1 and the reverse
            targets = torch.cat([t, (0.5 * (t[:b] + t[b:])).repeat(self.views - 2, 1)])
            targets = targets.masked_fill(targets < TARGET_FLOOR, 0.0)
        local = (-(targets * torch.log(probs)).sum(dim=1)).mean()
        loss = local + (all_reduce_no_grad(local.detach()) / self.world_size - local.detach())
        # 3. me-max: the entropy of the mean sharpened prediction over the global batch, maximised
        if self.settings.me_max:
            mean_p = all_reduce_mean_with_grad(sharpen(probs, self.settings.sharpen).mean(dim=0))
            memax = (mean_p * torch.log(mean_p)).sum()
        else:
            memax = loss.new_zeros(())
        return loss, memax, loss + memax


def build(spec: ObjectiveSpec, model: nn.Module) -> PAWS:
    if not isinstance(model.head, PAWSHead):
        raise TypeError(f"loss.method=paws needs PAWS's head, the model has {type(model.head).__name__}")
    return PAWS(spec)
