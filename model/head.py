"""The SimCLR / SuNCEt projection head."""
from __future__ import annotations

from collections import OrderedDict

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
