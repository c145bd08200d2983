"""``SimCLRModel`` (encoder + projection head), its builder and weight export."""
from __future__ import annotations

import torch
from torch import nn

from model.encoder import TORCHVISION_ARCHS, build_encoder
from model.head import projection_head


class SimCLRModel(nn.Module):
    """Encoder followed by the projection head.

    ``forward(x)`` gives the projections ``z [N, out_dim]`` used by the losses;
    ``features(x)`` gives the encoder output ``[N, feature_dim]`` used by kNN
    and linear evaluation.
    """

    def __init__(self, arch: str, encoder: nn.Module, feature_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = encoder
        self.head = head
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_model(
    arch: str = "resnet50",
    head_hidden_dim: int = 2048,
    head_out_dim: int = 128,
    channels_last: bool = True,
    sync_bn: bool = False,
) -> SimCLRModel:
    """Build a randomly initialised ``SimCLRModel`` on the CPU.

    ``channels_last`` converts the 4-D weights to channels-last memory format
    (feed channels-last inputs too). ``sync_bn`` converts every BatchNorm layer
    (encoder and head) to ``nn.SyncBatchNorm``; it is the caller's choice, and
    only meaningful when a process group will exist: a SyncBatchNorm layer in
    training mode fails without one. Move the model to its device afterwards.
    """
    encoder, feature_dim = build_encoder(arch)
    model = SimCLRModel(arch, encoder, feature_dim, projection_head(feature_dim, head_hidden_dim, head_out_dim))
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
    and ``fc.bias`` are reported missing. Accepts a ``SimCLRModel``, possibly
    wrapped in DDP or torch.compile. Tensors are detached, contiguous, on CPU.
    """
    model = unwrap_model(model)
    if not isinstance(model, SimCLRModel):
        raise TypeError(f"expected a SimCLRModel (optionally DDP-wrapped), got {type(model).__name__}")
    if model.arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"arch {model.arch!r} is not a torchvision model; torchvision export supports {', '.join(TORCHVISION_ARCHS)}"
        )
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in model.encoder.state_dict().items()
        if not key.startswith("fc.")
    }
