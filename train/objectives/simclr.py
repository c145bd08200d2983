"""SimCLR's objective (Chen et al. 2020) with SuNCEt (Assran et al. 2020): NT-Xent over the views,
plus ``suncet_weight`` x SuNCEt over the support set, both on the projection head's output.

Views: every view of every group (two views: SimCLR's NT-Xent; more: every other view of an
image is a positive, ``train.losses.init_nt_xent_loss``). Head: the 3-layer MLP of the official
SuNCEt code (``model.head.projection_head``)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from model.head import projection_head
from train.losses import init_nt_xent_loss, init_suncet_loss
from train.objectives import NoState, ObjectiveSpec, Outputs

VIEWS = "every view of every group: the other views of an image are its positives"
HEAD_PER_RESOLUTION = False  # SimCLR's multi-crop: one head call on every view


def head(cfg) -> Callable[[int], nn.Module]:
    m = cfg.model
    return lambda feature_dim: projection_head(feature_dim, m.head_hidden_dim, m.head_out_dim)


class SimCLR(NoState):
    def __init__(self, spec: ObjectiveSpec):
        loss = spec.cfg.loss
        self.view_rows = spec.views * spec.unlabeled
        self.nt_xent = init_nt_xent_loss(spec.unlabeled, loss.temperature, spec.world_size, spec.device,
                                         gather=loss.ntxent_gather, views=spec.views)
        self.weight = spec.suncet_weight
        self.suncet = (init_suncet_loss(spec.support, loss.temperature, spec.world_size, spec.device)
                       if spec.suncet_weight > 0 and spec.support > 0 else None)
        self.names = ("loss_ntxent", "loss_suncet", "loss") if self.suncet else ("loss_ntxent", "loss")

    def __call__(self, views: Outputs, support: Outputs, labels):
        (z,) = views
        loss_unsup = self.nt_xent(z)
        if self.suncet is None:
            return loss_unsup, loss_unsup
        loss_sup = self.suncet(support[0], labels)
        return loss_unsup, loss_sup, loss_unsup + self.weight * loss_sup


def build(spec: ObjectiveSpec, model: nn.Module) -> SimCLR:
    return SimCLR(spec)
