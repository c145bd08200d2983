"""Encoders: ResNet trunks mapping images ``[N, 3, H, W]`` to features ``[N, F]``.

- ``resnet50`` / ``resnet18``: torchvision's models (random init, no
  zero-init of the residual BN by default) with ``fc`` replaced by
  ``nn.Identity``; feature dims 2048 / 512. Their state dicts keep
  torchvision's key names, so trained weights load into torchvision.
- ``resnet18-small``: a narrow ResNet-18 (base width 32, feature dim 256)
  with a CIFAR-style stem (3x3 conv, stride 1, no max-pool), for CPU tests
  and demos at 16-64 px. Same attribute names as torchvision's ResNet.
- ``timm/<name>``: any model of timm (``pip install suncet-pretrain[timm]``),
  built without pretrained weights and without its classifier
  (``num_classes=0``: the features before it); vision transformers take any
  image size (``dynamic_img_size``), so multi-crop's small views work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock


class SmallResNet(nn.Module):
    """ResNet-18 layout (2, 2, 2, 2 BasicBlocks) at widths w, 2w, 4w, 8w."""

    def __init__(self, width: int = 32, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # CIFAR stem: keep the resolution
        widths = (width, 2 * width, 4 * width, 8 * width)
        in_planes = width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_planes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            layer = nn.Sequential(BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes))
            setattr(self, f"layer{i + 1}", layer)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.feature_dim = in_planes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _torchvision(factory: Callable[..., nn.Module], feature_dim: int) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(zero_init_residual: bool) -> tuple[nn.Module, int]:
        net = factory(weights=None, zero_init_residual=zero_init_residual)
        net.fc = nn.Identity()
        return net, feature_dim

    return build


def _small(zero_init_residual: bool) -> tuple[nn.Module, int]:
    net = SmallResNet(width=32, zero_init_residual=zero_init_residual)
    return net, net.feature_dim


# name -> builder(zero_init_residual) returning (encoder, feature dim)
ENCODERS: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {
    "resnet50": _torchvision(resnet50, 2048),
    "resnet18": _torchvision(resnet18, 512),
    "resnet18-small": _small,
}
# Encoders whose state dict matches a torchvision model (see export_torchvision_state_dict).
TORCHVISION_ARCHS = ("resnet50", "resnet18")


TIMM_PREFIX = "timm/"


def check_arch(arch: str) -> None:
    """ValueError naming the problem for an arch ``build_encoder`` cannot build."""
    if arch.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise ValueError(f"model.arch {arch!r} needs timm: pip install 'suncet-pretrain[timm]' (or timm)") from None
        if not timm.is_model(arch[len(TIMM_PREFIX):]):
            raise ValueError(f"model.arch {arch!r}: timm has no model {arch[len(TIMM_PREFIX):]!r} "
                             "(timm.list_models() lists them)")
    elif arch not in ENCODERS:
        raise ValueError(f"model.arch must be one of {', '.join(ENCODERS)} or timm/<name>, got {arch!r}")


def _create_timm(name: str) -> tuple[nn.Module, bool]:
    """The timm model ``name`` without classifier, and whether it takes any image size."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True), True
    except TypeError:  # models without a fixed image size take no dynamic_img_size
        return timm.create_model(name, pretrained=False, num_classes=0), False


def _timm(name: str) -> tuple[nn.Module, int]:
    net, _ = _create_timm(name)
    return net, int(net.num_features)


@dataclass(frozen=True)
class InputGeometry:
    """What an encoder asks of its images: ``fixed_side``, the only image side it takes (None:
    any), and ``reduction``, the image side over its last feature map's side."""

    fixed_side: int | None
    reduction: int


# The built-in encoders: torchvision's ResNets reduce 32-fold; the CIFAR stem of resnet18-small 8-fold.
_REDUCTIONS = {"resnet50": 32, "resnet18": 32, "resnet18-small": 8}


def input_geometry(arch: str) -> InputGeometry:
    """``arch``'s ``InputGeometry``; a timm model is built on the meta device (no weights allocated)
    and read from its ``pretrained_cfg`` (``input_size``, ``fixed_input_size``) and ``feature_info``."""
    check_arch(arch)
    if not arch.startswith(TIMM_PREFIX):
        return InputGeometry(None, _REDUCTIONS[arch])
    with torch.device("meta"):
        net, any_size = _create_timm(arch[len(TIMM_PREFIX):])
    cfg = getattr(net, "pretrained_cfg", None) or {}
    info = getattr(net, "feature_info", None) or [{}]
    fixed = cfg.get("fixed_input_size") and not any_size and cfg.get("input_size")
    return InputGeometry(int(fixed[-1]) if fixed else None, int(info[-1].get("reduction", 32)))


def build_encoder(arch: str, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """Return ``(encoder, feature_dim)`` for ``arch``; ValueError for unknown names."""
    check_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        return _timm(arch[len(TIMM_PREFIX):])
    return ENCODERS[arch](zero_init_residual)
