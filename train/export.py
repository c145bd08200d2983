"""The pre-trained encoder as a file other tools load: from the end of a run or any checkpoint.

Formats (``FORMATS``):

- ``torchvision``: a ``torch.save``-d state dict keyed like ``torchvision.models.<arch>``
  without ``fc.*``::

      model = torchvision.models.resnet50()
      model.load_state_dict(torch.load("encoder.pth", weights_only=True), strict=False)  # only fc.* missing

- ``timm``: the same file; timm's ``resnet50`` / ``resnet18`` use torchvision's key names
  (checked against timm 1.0.31), so ``timm.create_model("resnet50").load_state_dict(sd, strict=False)``;
- ``safetensors``: the same tensors in a ``.safetensors`` file (``safetensors.torch.load_file``),
  with the arch, source checkpoint and step in its metadata;
- ``native``: the encoder's own key names (``model.encoder.state_dict()``), for archs that are
  no torchvision model (``resnet18-small``; ``timm/<name>`` writes timm's own keys, so ``timm``
  is its native format).

Every export also carries what is needed to use it (``EncoderInfo``, ``train.encoder_info``):
the arch, the image side and normalisation it was trained at, the run's labeled subset rule and
objective, in a sidecar ``<file>.json`` (and in a ``.safetensors`` file's metadata).
``train.evaluate`` reads them, so an export evaluates like the checkpoint it came from.
A fine-tuned model (``train.finetune``) is an export too, with its linear layer under ``fc.*``
and its class names in the sidecar.

``load_encoder`` is the one public loader of every export (``encoder, info = load_encoder(path)``);
``load_pretrained`` reads a training checkpoint (file or run directory) into its model.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from model import (TORCHVISION_ARCHS, PretrainModel, build_encoder, build_model, check_arch,
                   export_torchvision_state_dict)
from model.encoder import TIMM_PREFIX
from pipelines.augment.recipe import IMAGENET_MEAN, IMAGENET_STD
from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import PretrainConfig, config_from_dict
from train.encoder_info import (SAFETENSORS_HINT, EncoderInfo, ExportError, info_json, is_safetensors, read_info,
                                safetensors_metadata, sidecar)
from train.objectives import head_factory, head_per_resolution

FORMATS = ("torchvision", "timm", "safetensors", "native")
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")  # a fine-tuned model's linear layer, beside its encoder's tensors
# A checkpoint's record of the configs its run trained with: [{"global_step", "config"}], one per start
# or resume, oldest first (EncoderInfo.trained_resolutions reads it; a checkpoint without it: unknown).
CONFIG_HISTORY_KEY = "config_history"


def encoder_state(model: PretrainModel) -> dict[str, torch.Tensor]:
    """The encoder's tensors: torchvision's keys (no ``fc.*``) for torchvision archs, its own otherwise."""
    if model.arch in TORCHVISION_ARCHS:
        return export_torchvision_state_dict(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}


def default_format(arch: str) -> str:
    """The format a run's own export takes: torchvision's keys where it is a torchvision model,
    timm's for ``timm/<name>``, the encoder's own otherwise."""
    return "torchvision" if arch in TORCHVISION_ARCHS else "timm" if arch.startswith(TIMM_PREFIX) else "native"


def check_format(arch: str, fmt: str) -> None:
    """Refuse a format ``arch``'s encoder has no counterpart in, naming the one to use."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    timm_arch = arch.startswith(TIMM_PREFIX)
    if (fmt == "torchvision" and arch not in TORCHVISION_ARCHS) or (
            fmt == "timm" and not (timm_arch or arch in TORCHVISION_ARCHS)):
        raise ExportError(f"model.arch {arch!r} has no {fmt} counterpart; use --format "
                          f"{default_format(arch)} (or safetensors): the export carries what rebuilds it")


def export_files(path: str | Path) -> tuple[Path, Path]:
    """Every file an export to ``path`` writes: the tensors and the sidecar."""
    return Path(path), sidecar(path)


def export_encoder(model: PretrainModel, path: str | Path, fmt: str, info: EncoderInfo,
                   classifier: nn.Linear | None = None) -> Path:
    """Write ``model``'s encoder to ``path`` in ``fmt`` with ``info`` beside it (see the module
    docstring), and a fine-tuned model's ``classifier`` under ``fc.*``; returns ``path``."""
    check_format(model.arch, fmt)
    path, side = export_files(path)
    state = encoder_state(model)
    if classifier is not None:
        state.update({k: v.detach().cpu().contiguous() for k, v in zip(CLASSIFIER_KEYS, (classifier.weight,
                                                                                         classifier.bias))})
    text = info_json(info)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError as exc:
            raise ExportError(f"--format safetensors needs the safetensors package: {SAFETENSORS_HINT}") from exc
        data = save(state, metadata={"arch": model.arch, "encoder_info": text})
        ckpt.write_atomic(path, lambda f: f.write(data), "encoder")
    else:
        ckpt.save_atomic(state, path, "encoder")
    ckpt.write_text_atomic(side, text, "the encoder's sidecar")
    return path


def read_tensors(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The tensors of an export of ``arch`` (any of ``FORMATS``)."""
    if is_safetensors(path):
        saved_arch = safetensors_metadata(path).get("arch")
        if saved_arch and saved_arch != arch:
            raise ExportError(f"{path} holds a {saved_arch} encoder, not {arch}: pass --arch {saved_arch}")
        from safetensors.torch import load_file  # safetensors_metadata checked it is installed
        try:
            state = load_file(str(path))
        except Exception as exc:  # a damaged file: safetensors raises its own error types
            raise ExportError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    else:
        state = ckpt.load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} is neither a training checkpoint nor an exported encoder")
    return state


def encoder_model(path: str | Path, arch: str, classes: int = 0) -> tuple[PretrainModel, nn.Linear | None]:
    """An exported encoder of ``arch`` as a ``PretrainModel`` with no projection head (evaluation
    uses the encoder's features only), and the linear classifier of a fine-tuned model of
    ``classes`` classes (its sidecar's ``classes``; None when ``classes`` is 0)."""
    path = Path(path)
    state = read_tensors(path, arch)
    head = {k: state.pop(k) for k in CLASSIFIER_KEYS if k in state} if classes else {}
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
    classifier = None
    if classes:
        if sorted(head) != sorted(CLASSIFIER_KEYS) or tuple(head["fc.weight"].shape) != (classes, feature_dim):
            raise ExportError(f"{path}: its sidecar names {classes} classes but the file holds no "
                              f"{classes} x {feature_dim} classifier (fc.weight, fc.bias); re-save it")
        classifier = nn.Linear(feature_dim, classes)
        classifier.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
    return PretrainModel(arch, encoder, feature_dim, nn.Identity()), classifier


class LoadedEncoder(NamedTuple):
    encoder: nn.Module  # eval mode; images [N, 3, r, r] prepared by info.transform() -> features [N, F]
    info: EncoderInfo  # arch, image side, normalisation, labeled-subset rule, classes (fine-tuned)


def load_encoder(path: str | Path, arch: str | None = None, classifier: bool = False) -> LoadedEncoder:
    """Any export of this project (every format, every arch, fine-tuned models too) as
    ``(encoder, info)``: the encoder module in eval mode and its sidecar's ``EncoderInfo``.

    ``arch`` is needed only for an export without a sidecar (written before sidecars existed):
    then ``info`` assumes ImageNet's normalisation at 224 px. With ``classifier=True``, a
    fine-tuned model (``train.evaluate --method finetune``) comes back as encoder + its linear
    layer, giving logits over ``info.classes``."""
    path = Path(path)
    info = read_info(path)
    if info is None:
        if arch is None:
            raise ExportError(f"{path} has no sidecar {sidecar(path)} to say its arch: pass arch=")
        try:
            check_arch(arch)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        info = EncoderInfo(arch, 224, IMAGENET_MEAN, IMAGENET_STD)
    if classifier and not info.classes:
        raise ExportError(f"{path} holds no classifier (not a fine-tuned model): load it with classifier=False")
    model, head = encoder_model(path, arch or info.arch, len(info.classes or ()))
    module = nn.Sequential(model.encoder, head) if classifier else model.encoder
    return LoadedEncoder(module.eval(), info)


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
    try:
        cfg = config_from_dict(state["config"])
        check_arch(cfg.model.arch)
    except ValueError as exc:  # ConfigError too: a config this version does not know, or an arch it cannot build
        raise DataError(f"{path}: its config cannot be used by this version ({exc})") from None
    m = cfg.model
    model = build_model(m.arch, channels_last=m.channels_last, sync_bn=False, head=head_factory(cfg),
                        head_per_resolution=head_per_resolution(cfg))
    model.load_state_dict(state["model"])
    return model.eval(), cfg, path, state
