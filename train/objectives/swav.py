"""SwAV (Caron et al. 2020), as facebookresearch/swav's ``main_swav.py`` trains it, and SwAV + SuNCEt.

Views: the two first views of group 0 are the crops codes are assigned from
(``crops_for_assign 0 1``); every view, local crops included, predicts the
codes of the other assigned crop(s) (swapped prediction). Head: a 2-layer
projection to ``model.head_out_dim``, L2-normalised, and ``loss.swav.prototypes``
prototype vectors (``model.head.SwAVHead``).

The loss, per assigned crop ``a``: codes ``q`` = Sinkhorn-Knopp
(``loss.swav.epsilon``, ``loss.swav.sinkhorn_iterations``) over the prototype
scores of crop ``a`` of the *global* batch (and of the queue, when it is on),
and for every other view ``v`` the cross-entropy ``-sum_k q_k log softmax(s_v /
t)_k``; averaged over the other views, then over the assigned crops. Sinkhorn
is distributed: its row and total sums are all-reduced, so the codes are those
of one process holding every rank's rows (tested). The prototypes are
normalised before every forward, as the official code does (so a checkpoint
holds them as the update left them, and a resumed run normalises them once,
as the uninterrupted run does: normalising is not idempotent in floating
point), and get no update for the first ``loss.swav.freeze_prototypes_steps``
global steps. With ``loss.swav.queue_length`` > 0 each rank keeps ``queue_length
/ world size`` earlier embeddings of each assigned crop from epoch
``loss.swav.queue_start_epoch`` on, used once full (as the official code), and
checkpointed with the count of rows pushed, which decides "full" on the host.

Nothing in the loss or the hooks waits for the device (``compute.host_sync:
log``): index tensors are built once, and the queue's fill is counted on the host.

SwAV + SuNCEt (no code in the paper; these choices are ours, README): SuNCEt on
the support images' normalised embeddings ``z`` (the ones the prototypes
score), the support views being global views (group 0's recipe), weighted by
``loss.suncet_weight`` and ``loss.suncet_weight_rule`` as with SimCLR (the rule
counts every view as an anchor), and off from ``loss.supervised_epochs``.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.head import SwAVHead
from train.distributed import all_gather_no_grad, all_reduce_no_grad
from train.losses import init_suncet_loss
from train.objectives import NoState, ObjectiveSpec, Outputs

VIEWS = "codes from the first two views of group 0; every view predicts them"
HEAD_PER_RESOLUTION = False  # facebookresearch/swav src/resnet50.py: the head runs once on every crop's features
ASSIGNED = 2  # crops codes are assigned from: views 0 and 1 (the global ones)


def head(cfg) -> Callable[[int], nn.Module]:
    m, sw = cfg.model, cfg.loss.swav
    return lambda feature_dim: SwAVHead(feature_dim, m.head_hidden_dim, m.head_out_dim, sw.prototypes)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's codes ``[N, K]`` of this rank's ``scores`` ``[N, K]``, with the marginals over every
    rank's rows: each prototype gets 1/K of the global mass, each sample 1/B, then each row is
    scaled to sum to 1. Sums over ranks are all-reduced; computed in float32 at least."""
    q = torch.exp(scores.to(torch.promote_types(scores.dtype, torch.float32)) / epsilon).T  # [K, N]
    k = q.shape[0]
    b = q.shape[1] * (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    q /= all_reduce_no_grad(q.sum())
    for _ in range(iterations):
        q /= all_reduce_no_grad(q.sum(dim=1, keepdim=True))  # every prototype: mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # every sample: mass 1/B
        q /= b
    return (q * b).T


class SwAV(NoState):
    def __init__(self, spec: ObjectiveSpec, prototypes: nn.Linear, normalize: Callable[[], None]):
        loss = spec.cfg.loss
        self.settings = loss.swav
        self.temperature = loss.temperature
        self.unlabeled, self.views = spec.unlabeled, spec.views
        self.prototypes, self.normalize = prototypes, normalize
        self.world_size, self.device = spec.world_size, spec.device
        global_batch = spec.unlabeled * spec.world_size
        length = self.settings.queue_length - self.settings.queue_length % global_batch  # as the official code
        self.queue_rows = length // spec.world_size
        self.queue: torch.Tensor | None = None
        self.queued = 0  # rows pushed into each assigned crop's queue so far, at most queue_rows
        self.use_queue = False  # this step reads the queue: it was full before the step
        self.global_step = 0
        # the views predicting each assigned crop's codes (every other view), as device indices
        self.predictors = tuple(torch.tensor([v for v in range(spec.views) if v != crop], device=spec.device)
                                for crop in range(ASSIGNED))
        self.weight = spec.suncet_weight
        self.suncet = (init_suncet_loss(spec.support, loss.temperature, spec.world_size, spec.device)
                       if spec.suncet_weight > 0 and spec.support > 0 else None)
        self.names = ("loss_swav", "loss_suncet", "loss") if self.suncet else ("loss_swav", "loss")

    def begin_step(self, epoch: int, global_step: int) -> None:
        """Normalise the prototypes; start the queue at its epoch; decide on the host whether this
        step reads it (full before the step, as the official check of its last row) and count the
        rows the step pushes."""
        self.global_step = global_step
        self.normalize()
        if self.queue is None and self.queue_rows > 0 and epoch >= self.settings.queue_start_epoch:
            dim = self.prototypes.weight.shape[1]
            self.queue = torch.zeros(ASSIGNED, self.queue_rows, dim, device=self.device)
            self.queued = 0
        if self.queue is not None:
            self.use_queue = self.queued >= self.queue_rows
            self.queued = min(self.queued + self.unlabeled, self.queue_rows)

    def codes(self, scores: torch.Tensor, z: torch.Tensor, crop: int) -> torch.Tensor:
        """The codes of assigned crop ``crop`` (its rows of ``scores``), through the queue when on."""
        b = self.unlabeled
        out = scores[crop * b : (crop + 1) * b].detach()
        if self.queue is not None:
            if self.use_queue:
                out = torch.cat([self.queue[crop] @ self.prototypes.weight.detach().T.to(self.queue.dtype),
                                 out.to(self.queue.dtype)])
            self.queue[crop, b:] = self.queue[crop, :-b].clone()
            self.queue[crop, :b] = z[crop * b : (crop + 1) * b].detach()
        return sinkhorn(out, self.settings.epsilon, self.settings.sinkhorn_iterations)[-b:]

    def swapped_prediction(self, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        b = self.unlabeled
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        log_p = F.log_softmax(scores / self.temperature, dim=1).view(self.views, b, -1)
        loss = scores.new_zeros(())
        for crop in range(ASSIGNED):
            q = self.codes(scores, z, crop).to(log_p.dtype)
            predicted = log_p.index_select(0, self.predictors[crop])
            loss = loss - (q[None] * predicted).sum(dim=2).mean()  # mean over the other views and images
        local = loss / ASSIGNED
        total = all_reduce_no_grad(local.detach()) / self.world_size
        return local + (total - local.detach())  # the value: the global mean; the gradient: this rank's

    def __call__(self, views: Outputs, support: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z, scores = views
        loss_swav = self.swapped_prediction(z, scores)
        if self.suncet is None:
            return loss_swav, loss_swav
        loss_sup = self.suncet(support[0], labels)
        return loss_swav, loss_sup, loss_swav + self.weight * loss_sup

    def before_update(self, model: nn.Module) -> None:
        if self.global_step < self.settings.freeze_prototypes_steps:
            self.prototypes.weight.grad = None  # no update from the optimizer, momentum included

    def state_dict(self) -> dict:
        """Every rank's queue, ``[world size, 2, rows, dim]`` (a collective: every rank calls it),
        and the rows pushed into it."""
        if self.queue is None:
            return {"queue": None, "queued": 0}
        return {"queue": all_gather_no_grad(self.queue[None]).cpu(), "queued": self.queued}

    def load_state_dict(self, state: dict) -> None:
        """This rank's queue; a queue saved on another number of ranks starts empty again (noted)."""
        queues = state.get("queue")
        self.queue, self.queued = None, 0
        if queues is None:
            return
        if queues.shape[0] != self.world_size or queues.shape[2] != self.queue_rows:
            print(f"note: SwAV's queue was saved on {queues.shape[0]} rank(s) with {queues.shape[2]} rows each; "
                  f"this run has {self.world_size} x {self.queue_rows}: it fills again from empty", file=sys.stderr)
            return
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.queue = queues[rank].to(self.device)
        self.queued = int(state["queued"]) if "queued" in state else filled_rows(queues[0, 0])


def filled_rows(queue: torch.Tensor) -> int:
    """The rows pushed into one crop's queue ``[rows, dim]``, read from a checkpoint written before the
    count was saved: the queue fills from its first row, and every pushed row is a unit vector."""
    return int(queue.ne(0).any(dim=1).sum())


def build(spec: ObjectiveSpec, model: nn.Module) -> SwAV:
    swav_head = model.head
    if not isinstance(swav_head, SwAVHead):
        raise TypeError(f"loss.method=swav needs SwAV's head, the model has {type(swav_head).__name__}")
    return SwAV(spec, swav_head.prototypes, swav_head.normalize_prototypes)
