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

Every export also carries what is needed to use it (``EncoderInfo``): the arch, the image side
and normalisation it was trained at, the run's labeled subset rule and objective, in a sidecar
``<file>.json`` (and in a ``.safetensors`` file's metadata). ``train.evaluate`` reads them, so an
export evaluates like the checkpoint it came from; ``load_encoder`` rebuilds any arch from it.

``load_pretrained`` reads a training checkpoint (file or run directory) into its model, and
``load_encoder`` reads an exported encoder back (``train.evaluate`` accepts both).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model import (TORCHVISION_ARCHS, PretrainModel, build_encoder, build_model, check_arch,
                   export_torchvision_state_dict)
from model.encoder import TIMM_PREFIX
from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import PretrainConfig, config_from_dict
from train.objectives import head_factory, head_per_resolution

FORMATS = ("torchvision", "timm", "safetensors", "native")
SAFETENSORS_HINT = "pip install safetensors"


class ExportError(RuntimeError):
    """The encoder cannot be written or read in the format asked for; the message says why."""


@dataclass(frozen=True)
class EncoderInfo:
    """What an exported encoder needs besides its tensors to be used as it was trained."""

    arch: str
    resolution: int  # the first view group's side: what evaluation resizes to
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str = "simclr"
    labeled_list: str | None = None  # the run's labeled subset: its list, or its stratified draw
    labeled_fraction: float = 0.1
    seed: int = 0
    checkpoint: str | None = None
    global_step: int | None = None

    @classmethod
    def of(cls, cfg: PretrainConfig, checkpoint: str | Path | None = None, step: int | None = None) -> EncoderInfo:
        recipe = cfg.eval_recipe
        return cls(cfg.model.arch, recipe.resolution, tuple(recipe.mean), tuple(recipe.std), cfg.loss.method,
                   cfg.data.labeled_list, cfg.data.labeled_fraction, cfg.run.seed,
                   None if checkpoint is None else str(checkpoint), step)

    def apply(self, cfg: PretrainConfig) -> PretrainConfig:
        """``cfg`` with this encoder's arch, image settings and labeled-subset rule."""
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, arch=self.arch),
            augment=dataclasses.replace(cfg.augment, resolution=self.resolution, mean=tuple(self.mean),
                                        std=tuple(self.std), views=()),
            data=dataclasses.replace(cfg.data, labeled_list=self.labeled_list,
                                     labeled_fraction=self.labeled_fraction),
            run=dataclasses.replace(cfg.run, seed=self.seed))


def sidecar(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_info(path: str | Path) -> EncoderInfo | None:
    """The ``EncoderInfo`` of an export (its sidecar, or a ``.safetensors`` file's metadata), if any."""
    path = Path(path)
    tree = None
    if sidecar(path).is_file():
        try:
            tree = json.loads(sidecar(path).read_text())
        except ValueError as exc:
            raise ExportError(f"{sidecar(path)} is not the JSON tools.export writes: {exc}") from exc
    elif is_safetensors(path):
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise ExportError(f"reading {path} needs the safetensors package: {SAFETENSORS_HINT}") from exc
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("encoder_info")
        tree = json.loads(raw) if raw else None
    if tree is None:
        return None
    try:
        return EncoderInfo(**{**tree, "mean": tuple(tree["mean"]), "std": tuple(tree["std"])})
    except (TypeError, KeyError) as exc:
        raise ExportError(f"{sidecar(path)} does not describe an encoder: {exc}") from exc


def encoder_state(model: PretrainModel) -> dict[str, torch.Tensor]:
    """The encoder's tensors: torchvision's keys (no ``fc.*``) for torchvision archs, its own otherwise."""
    if model.arch in TORCHVISION_ARCHS:
        return export_torchvision_state_dict(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}


def default_format(arch: str) -> str:
    """The format a run's own export takes: torchvision's keys where it is a torchvision model,
    timm's for ``timm/<name>``, the encoder's own otherwise."""
    return "torchvision" if arch in TORCHVISION_ARCHS else "timm" if arch.startswith(TIMM_PREFIX) else "native"


def export_encoder(model: PretrainModel, path: str | Path, fmt: str, info: EncoderInfo) -> Path:
    """Write ``model``'s encoder to ``path`` in ``fmt`` with ``info`` beside it (see the module
    docstring); returns ``path``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    timm_arch = model.arch.startswith(TIMM_PREFIX)
    if (fmt == "torchvision" and model.arch not in TORCHVISION_ARCHS) or (
            fmt == "timm" and not (timm_arch or model.arch in TORCHVISION_ARCHS)):
        raise ExportError(f"model.arch {model.arch!r} has no {fmt} counterpart; use --format "
                          f"{default_format(model.arch)} (or safetensors): the export carries what rebuilds it")
    path = Path(path)
    state = encoder_state(model)
    text = json.dumps(dataclasses.asdict(info), indent=2) + "\n"
    if fmt == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError as exc:
            raise ExportError(f"--format safetensors needs the safetensors package: {SAFETENSORS_HINT}") from exc
        data = save(state, metadata={"arch": model.arch, "encoder_info": text})
        ckpt.write_atomic(path, lambda f: f.write(data), "encoder")
    else:
        ckpt.save_atomic(state, path)
    ckpt.write_text_atomic(sidecar(path), text)
    return path


def load_encoder(path: str | Path, arch: str) -> PretrainModel:
    """An exported encoder (any of ``FORMATS``) as a ``PretrainModel`` of ``arch`` (its
    ``EncoderInfo``'s when ``read_info`` found one) with no projection head (evaluation uses the
    encoder's features only)."""
    path = Path(path)
    if is_safetensors(path):
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


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` holds a safetensors file (an 8-byte header length, then the JSON header),
    whatever its name: ``tools.export --format safetensors --out encoder.pth`` is one too."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


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
