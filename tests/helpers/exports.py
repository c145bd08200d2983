"""Exports and training checkpoints for tests, without training: a freshly built model saved the way
``train.pretrain`` and ``tools.export`` save it (random weights serve every round-trip check)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model import PretrainModel, build_model
from tests.pretrain_helpers import tiny_config
from train import checkpoint as ckpt
from train.config import config_to_dict
from train.encoder_info import EncoderInfo
from train.export import export_encoder


def small_model(arch: str = "resnet18-small", seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    return build_model(arch, channels_last=False, sync_bn=False).eval()


def small_export(tmp_path: Path, name: str = "enc.pth", fmt: str = "native", **info) -> tuple[PretrainModel, Path]:
    """A resnet18-small export at 16 px with mean/std 0.5 (``info`` overrides fields of its sidecar)."""
    model = small_model()
    fields = {"arch": "resnet18-small", "resolution": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, **info}
    return model, export_encoder(model, tmp_path / name, fmt, EncoderInfo(**fields))


def tamper_sidecar(path: Path, **fields) -> None:
    """Rewrite fields of the sidecar of export ``path`` (``None`` removes a field)."""
    side = Path(f"{path}.json")
    tree = {**json.loads(side.read_text()), **fields}
    side.write_text(json.dumps({k: v for k, v in tree.items() if v is not None}))


def training_checkpoint(path: Path, data: Path, step: int = 10, history: list | None = None, **overrides) -> Path:
    """A ``ckpt-*.pt``-like file of a fresh model built from ``tiny_config(data, ...)`` with ``overrides``."""
    from train.objectives import head_factory

    cfg = tiny_config(data, path.parent / "run", **overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, channels_last=False, sync_bn=False, head=head_factory(cfg))
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "train_state": {"global_step": step}}
    if history is not None:
        state["config_history"] = history
    ckpt.save_atomic(state, path)
    return path
