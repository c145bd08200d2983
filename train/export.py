"""The pre-trained encoder as a file other tools load: from the end of a run or any checkpoint.

Formats (``FORMATS``):

- ``torchvision``: a ``torch.save``-d state dict keyed like ``torchvision.models.<arch>``
  without ``fc.*``::

      model = torchvision.models.resnet50()
      model.load_state_dict(torch.load("encoder.pth", weights_only=True), strict=False)  # only fc.* missing

- ``timm``: the same file; timm's ``resnet50`` / ``resnet18`` use torchvision's key names
  (checked against timm 1.0.31), so ``timm.create_model("resnet50").load_state_dict(sd, strict=False)``;
- ``safetensors``: the same tensors in a ``.safetensors`` file (``safetensors.torch.load_file``),
  with the arch, source checkpoint and step in its metadata.

Archs that are not torchvision's (``resnet18-small``) are written with the encoder's own key
names (``torchvision``/``timm`` are refused for them; ``safetensors`` works).

``load_pretrained`` reads a training checkpoint (file or run directory) into its model, and
``load_encoder`` reads an exported encoder back (``train.evaluate`` accepts both).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model import TORCHVISION_ARCHS, PretrainModel, build_encoder, build_model, export_torchvision_state_dict
from train.objectives import head_factory
from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import PretrainConfig, config_from_dict

FORMATS = ("torchvision", "timm", "safetensors")
SAFETENSORS_HINT = "pip install safetensors"


class ExportError(RuntimeError):
    """The encoder cannot be written or read in the format asked for; the message says why."""


def encoder_state(model: PretrainModel) -> dict[str, torch.Tensor]:
    """The encoder's tensors: torchvision's keys (no ``fc.*``) for torchvision archs, its own otherwise."""
    if model.arch in TORCHVISION_ARCHS:
        return export_torchvision_state_dict(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}


def export_encoder(model: PretrainModel, path: str | Path, fmt: str = "torchvision", metadata: dict | None = None) -> Path:
    """Write ``model``'s encoder to ``path`` in ``fmt`` (see the module docstring); returns ``path``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt in ("torchvision", "timm") and model.arch not in TORCHVISION_ARCHS:
        raise ExportError(f"model.arch {model.arch!r} has no {fmt} counterpart ({', '.join(TORCHVISION_ARCHS)} do); "
                          "use --format safetensors")
    path = Path(path)
    state = encoder_state(model)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as exc:
            raise ExportError(f"--format safetensors needs the safetensors package: {SAFETENSORS_HINT}") from exc
        info = {"arch": model.arch, **{k: str(v) for k, v in (metadata or {}).items()}}
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(state, str(tmp), metadata=info)
        tmp.replace(path)
    else:
        ckpt.save_atomic(state, path)
    return path


def load_encoder(path: str | Path, arch: str) -> PretrainModel:
    """An exported encoder (any of ``FORMATS``) as a ``PretrainModel`` of ``arch`` with no
    projection head (evaluation uses the encoder's features only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ExportError(f"reading {path} needs the safetensors package: {SAFETENSORS_HINT}") from exc
        with safe_open(str(path), "pt") as f:
            saved_arch = (f.metadata() or {}).get("arch")
        if saved_arch and saved_arch != arch:
            raise ExportError(f"{path} holds a {saved_arch} encoder, not {arch}: pass --arch {saved_arch}")
        state = load_file(str(path))
    else:
        state = ckpt.load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} is neither a training checkpoint nor an exported encoder")
    encoder, feature_dim = build_encoder(arch)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: another arch
        raise ExportError(f"{path} does not fit a {arch} encoder (tensor shapes differ): pass the --arch it was "
                          "trained with") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ExportError(f"{path} does not fit a {arch} encoder (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}): pass the --arch it was trained with")
    return PretrainModel(arch, encoder, feature_dim, nn.Identity())


def load_pretrained(path: str | Path) -> tuple[PretrainModel, PretrainConfig, Path, dict]:
    """A training checkpoint (a ``ckpt-*.pt`` file, or a run directory: its newest) as the
    pre-trained ``PretrainModel`` (CPU, eval mode), its config, the file read, and the file's contents."""
    path = Path(path)
    if path.is_dir():
        loaded = ckpt.load_latest(path)
        if loaded is None:
            raise DataError(f"no ckpt-*.pt checkpoint in {path}")
        state, path = loaded
    elif path.is_file():
        state = ckpt.load(path)
    else:
        raise DataError(f"checkpoint not found: {path}")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path} is not a pre-training checkpoint (needs 'model' and 'config')")
    cfg = config_from_dict(state["config"])
    m = cfg.model
    model = build_model(m.arch, channels_last=m.channels_last, sync_bn=False, head=head_factory(cfg))
    model.load_state_dict(state["model"])
    return model.eval(), cfg, path, state
