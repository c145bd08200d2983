"""``PretrainModel`` (encoder + an objective's head), its builder and weight export."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.encoder import TORCHVISION_ARCHS, build_encoder
from model.head import projection_head


class PretrainModel(nn.Module):
    """Encoder followed by an objective's head (``model.head``).

    ``forward(x)`` gives what the head gives for the losses (SimCLR's projections
    ``z [N, out_dim]``; a tuple for SwAV's and PAWS's heads). ``x`` may be a list
    of image batches of several resolutions (multi-crop): the encoder runs once
    per resolution, on all the batches of that resolution together, and the
    head once on every feature, in the list's order (SwAV's multi-resolution
    forward; one call, so that DDP sees one forward per step). ``features(x)``
    the encoder output ``[N, feature_dim]`` used by kNN, linear evaluation and
    fine-tuning; ``embed(x)`` the embedding soft nearest-neighbour evaluation
    compares (the head's ``embed``, or its output).
    """

    def __init__(self, arch: str, encoder: nn.Module, feature_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = encoder
        self.head = head
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        return self.head(self.multi_resolution_features(x) if isinstance(x, (list, tuple)) else self.encoder(x))

    def multi_resolution_features(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features of every batch of ``batches``, concatenated in order, with one encoder
        pass per resolution (the batches of one resolution share BN statistics)."""
        sides = list(dict.fromkeys(tuple(x.shape[-2:]) for x in batches))  # in order of first use
        if len(sides) == 1:
            return self.encoder(torch.cat(list(batches)) if len(batches) > 1 else batches[0])
        features: list[torch.Tensor | None] = [None] * len(batches)
        for side in sides:
            members = [k for k, x in enumerate(batches) if tuple(x.shape[-2:]) == side]
            out = self.encoder(torch.cat([batches[k] for k in members]))
            for k, chunk in zip(members, out.split([batches[k].shape[0] for k in members])):
                features[k] = chunk
        return torch.cat(features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        return head.embed(self.encoder(x)) if hasattr(head, "embed") else head(self.encoder(x))


def build_model(
    arch: str = "resnet50",
    head_hidden_dim: int = 2048,
    head_out_dim: int = 128,
    channels_last: bool = True,
    sync_bn: bool = False,
    head: Callable[[int], nn.Module] | None = None,
) -> PretrainModel:
    """Build a randomly initialised ``PretrainModel`` on the CPU.

    ``head`` builds the head from the encoder's feature dimension (an objective's, see
    ``train.objectives``); by default SimCLR's projection with ``head_hidden_dim`` and ``head_out_dim``.

    ``channels_last`` converts the 4-D weights to channels-last memory format
    (feed channels-last inputs too). ``sync_bn`` converts every BatchNorm layer
    (encoder and head) to ``nn.SyncBatchNorm``; it is the caller's choice, and
    only meaningful when a process group will exist: a SyncBatchNorm layer in
    training mode fails without one. Move the model to its device afterwards.
    """
    encoder, feature_dim = build_encoder(arch)
    head_module = head(feature_dim) if head is not None else projection_head(feature_dim, head_hidden_dim, head_out_dim)
    model = PretrainModel(arch, encoder, feature_dim, head_module)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def export_torchvision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights keyed as torchvision's model of the same arch, minus ``fc.*``.

    Load with ``tv_model.load_state_dict(sd, strict=False)``: only ``fc.weight``
    and ``fc.bias`` are reported missing. Accepts a ``PretrainModel``, possibly
    wrapped in DDP or torch.compile. Tensors are detached, contiguous, on CPU.
    """
    model = unwrap_model(model)
    if not isinstance(model, PretrainModel):
        raise TypeError(f"expected a PretrainModel (optionally DDP-wrapped), got {type(model).__name__}")
    if model.arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"arch {model.arch!r} is not a torchvision model; torchvision export supports {', '.join(TORCHVISION_ARCHS)}"
        )
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in model.encoder.state_dict().items()
        if not key.startswith("fc.")
    }
