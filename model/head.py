"""The heads of the objectives: SimCLR's (and SuNCEt's) projection, SwAV's projection with
prototypes, PAWS's projection with a prediction head. Each maps encoder features ``[N, F]`` to
what its loss reads; ``embed`` gives the embedding its soft nearest-neighbour evaluation compares."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def projection_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """3-layer MLP of the official SuNCEt code::

        fc1: Linear(in, hidden) -> bn1: BatchNorm1d -> relu1
        fc2: Linear(hidden, hidden) -> bn2: BatchNorm1d -> relu2
        fc3: Linear(hidden, out)            (no BN, no ReLU: z is used as is)

    All Linear layers have biases. Submodule names follow the official code
    (``fc1``, ``bn1``, ...), whose optimizer excludes parameters named
    ``bias`` or ``bn`` from weight decay and LARS adaptation.
    """
    for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if value < 1:
            raise ValueError(f"projection head {name} must be >= 1, got {value}")
    return nn.Sequential(
        OrderedDict(
            [
                ("fc1", nn.Linear(in_dim, hidden_dim)),
                ("bn1", nn.BatchNorm1d(hidden_dim)),
                ("relu1", nn.ReLU(inplace=True)),
                ("fc2", nn.Linear(hidden_dim, hidden_dim)),
                ("bn2", nn.BatchNorm1d(hidden_dim)),
                ("relu2", nn.ReLU(inplace=True)),
                ("fc3", nn.Linear(hidden_dim, out_dim)),
            ]
        )
    )


class SwAVHead(nn.Module):
    """SwAV's head (facebookresearch/swav ``src/resnet50.py``): a 2-layer projection
    (``fc1`` Linear, ``bn1``, ``relu1``, ``fc2`` Linear) to ``out_dim``, L2-normalised, and
    ``prototypes``, a Linear layer without bias scoring the embedding against K prototype vectors.

    ``forward`` gives ``(z, scores)``: the normalised embeddings ``[N, out_dim]`` and their
    prototype scores ``[N, K]`` (cosines once the prototypes are normalised, which the SwAV
    objective does before every forward)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, prototypes: int):
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("out_dim", out_dim), ("prototypes", prototypes)):
            if value < 1:
                raise ValueError(f"SwAV head {name} must be >= 1, got {value}")
        self.projection = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(in_dim, hidden_dim)), ("bn1", nn.BatchNorm1d(hidden_dim)),
            ("relu1", nn.ReLU(inplace=True)), ("fc2", nn.Linear(hidden_dim, out_dim)),
        ]))
        self.prototypes = nn.Linear(out_dim, prototypes, bias=False)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(features)
        return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))


class PAWSHead(nn.Module):
    """PAWS's head (the official suncet repository's ``src/resnet.py``, ``snn_eval.py``): the
    3-layer projection of ``projection_head`` to ``out_dim``, then a 4x bottleneck prediction
    head (``bn1``, ``fc1`` to ``out_dim // 4`` or ``pred_hidden_dim``, ``bn2``, ``relu``, ``fc2``).

    ``forward`` gives ``(h, p)``: the projection (PAWS's targets come from it) and the prediction
    (its anchors), both ``[N, out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, pred_hidden_dim: int | None = None):
        super().__init__()
        pred_hidden = pred_hidden_dim or max(1, out_dim // 4)
        self.projection = projection_head(in_dim, hidden_dim, out_dim)
        self.prediction = nn.Sequential(OrderedDict([
            ("bn1", nn.BatchNorm1d(out_dim)), ("fc1", nn.Linear(out_dim, pred_hidden)),
            ("bn2", nn.BatchNorm1d(pred_hidden)), ("relu", nn.ReLU(inplace=True)),
            ("fc2", nn.Linear(pred_hidden, out_dim)),
        ]))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.projection(features))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.projection(features)
        return h, self.prediction(h)
