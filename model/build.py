"""``PretrainModel`` (encoder + an objective's head), its builder and weight export."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.encoder import TIMM_PREFIX, TORCHVISION_ARCHS, build_encoder
from model.head import projection_head


class PretrainModel(nn.Module):
    """Encoder followed by an objective's head (``model.head``).

    ``forward(x)`` gives what the head gives for the losses (SimCLR's projections
    ``z [N, out_dim]``; a tuple for SwAV's and PAWS's heads). ``x`` may be a list
    of image batches of several resolutions (multi-crop): the encoder runs once
    per resolution, on all the batches of that resolution together, in order of
    first use; the outputs come back in the list's order, in one call, so that
    DDP sees one forward per step. The head then runs

    - once on every feature (``head_per_resolution=False``): SwAV's official
      forward, and SimCLR's, so the head's BatchNorm sees every view;
    - per resolution group (``head_per_resolution=True``): PAWS's official
      forward (the suncet repository's ``src/resnet.py``), where backbone,
      projection and prediction run on [support + global views] and then on
      [local views], so the head's BatchNorm never mixes resolutions.

    ``features(x)`` the encoder output ``[N, feature_dim]`` used by kNN, linear
    evaluation and fine-tuning; ``embed(x)`` the embedding soft nearest-neighbour
    evaluation compares (the head's ``embed``, or its output).
    """

    def __init__(self, arch: str, encoder: nn.Module, feature_dim: int, head: nn.Module,
                 head_per_resolution: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = encoder
        self.head = head
        self.feature_dim = feature_dim
        self.head_per_resolution = head_per_resolution

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        if not isinstance(x, (list, tuple)):
            return self.head(self.encoder(x))
        if not self.head_per_resolution:
            return self.head(self.multi_resolution_features(x))
        return self._per_resolution(x, lambda batch: self.head(self.encoder(batch)))

    def multi_resolution_features(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features of every batch of ``batches``, concatenated in order, with one encoder
        pass per resolution (the batches of one resolution share BN statistics)."""
        return self._per_resolution(batches, self.encoder)

    @staticmethod
    def _per_resolution(batches: list[torch.Tensor], network: Callable):
        """``network`` once per resolution group (the group's batches concatenated, in order of
        first use), its outputs (a tensor or a tuple of tensors) put back in ``batches``' order."""
        sides = list(dict.fromkeys(tuple(x.shape[-2:]) for x in batches))
        if len(sides) == 1:
            return network(torch.cat(list(batches)) if len(batches) > 1 else batches[0])
        parts: list = [None] * len(batches)
        for side in sides:
            members = [k for k, x in enumerate(batches) if tuple(x.shape[-2:]) == side]
            out = network(torch.cat([batches[k] for k in members]))
            sizes = [batches[k].shape[0] for k in members]
            chunks = zip(*(o.split(sizes) for o in out)) if isinstance(out, tuple) else out.split(sizes)
            for k, chunk in zip(members, chunks):
                parts[k] = chunk
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)

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
    head_per_resolution: bool = False,
    sync_bn_group=None,
) -> PretrainModel:
    """Build a randomly initialised ``PretrainModel`` on the CPU.

    ``head`` builds the head from the encoder's feature dimension (an objective's, see
    ``train.objectives``); by default SimCLR's projection with ``head_hidden_dim`` and ``head_out_dim``.

    ``channels_last`` converts the 4-D weights to channels-last memory format
    (feed channels-last inputs too). ``sync_bn`` converts every BatchNorm layer
    (encoder and head) to ``nn.SyncBatchNorm``, synchronised over ``sync_bn_group`` (a
    process group; None: every rank). A ``timm/`` encoder is converted with timm's own
    function, which keeps the activation of its ``BatchNormAct2d`` layers (torch's would
    drop it silently). It is the caller's choice, and
    only meaningful when a process group will exist: a SyncBatchNorm layer in
    training mode fails without one. ``head_per_resolution``: see ``PretrainModel``
    (the objective's ``HEAD_PER_RESOLUTION``). Move the model to its device afterwards.
    """
    encoder, feature_dim = build_encoder(arch)
    head_module = head(feature_dim) if head is not None else projection_head(feature_dim, head_hidden_dim, head_out_dim)
    model = PretrainModel(arch, encoder, feature_dim, head_module, head_per_resolution)
    if sync_bn:
        model = convert_sync_batchnorm(model, sync_bn_group)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def convert_sync_batchnorm(model: PretrainModel, process_group=None) -> PretrainModel:
    """Every BatchNorm layer of ``model`` as a SyncBatchNorm over ``process_group``; timm's
    conversion for a timm encoder (its ``BatchNormAct2d`` becomes ``SyncBatchNormAct``, keeping
    the activation and drop that ``nn.SyncBatchNorm.convert_sync_batchnorm`` would lose)."""
    if model.arch.startswith(TIMM_PREFIX):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


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
