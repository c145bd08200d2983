"""One training step: a batch contract in, a dict of floats out."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipelines.contract import PretrainBatch
from train.losses import nt_xent, suncet
from train.precision import Precision


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops and the last checkpoint stays intact."""


@dataclass(frozen=True)
class StepSettings:
    temperature: float
    suncet_weight: float  # 0 for SimCLR alone or after supervised_epochs
    precision: Precision
    skip_nonfinite: bool = False


def forward_losses(model: torch.nn.Module, batch: PretrainBatch, settings: StepSettings) -> dict[str, torch.Tensor]:
    """Encode views and support images in one forward (shared BN statistics,
    one kernel launch stream), then NT-Xent on the views and SuNCEt on the support."""
    b = batch.view1.shape[0]
    use_support = settings.suncet_weight > 0 and batch.support_images.shape[0] > 0
    parts = [batch.view1, batch.view2] + ([batch.support_images] if use_support else [])
    images = torch.cat(parts).contiguous(memory_format=torch.channels_last)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=settings.precision.autocast_dtype or torch.float32,
                        enabled=settings.precision.autocast_dtype is not None):
        z = model(images)
    z = z.float()
    loss_unsup = nt_xent(z[: 2 * b], settings.temperature)
    out = {"loss_ntxent": loss_unsup}
    loss = loss_unsup
    if use_support:
        loss_sup = suncet(z[2 * b :], batch.support_labels, settings.temperature)
        out["loss_suncet"] = loss_sup
        loss = loss + settings.suncet_weight * loss_sup
    out["loss"] = loss
    return out


def train_step(model, batch: PretrainBatch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               settings: StepSettings) -> dict[str, float]:
    """Forward, backward, LARS step. A NaN/inf loss, or NaN/inf gradients
    without a GradScaler (with one, fp16 overflow steps are skipped by the
    scaler as usual), raise NonFiniteLossError unless ``skip_nonfinite`` (then
    no update, and ``skipped`` = 1). The loss is global (gathered over ranks)
    and DDP averages gradients, so every rank takes the same decision."""
    losses = forward_losses(model, batch, settings)
    loss = losses["loss"]
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss).item():
        return _nonfinite(settings, batch, "loss", losses)
    scaler.scale(loss).backward()
    if not scaler.is_enabled():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item():
            optimizer.zero_grad(set_to_none=True)
            return _nonfinite(settings, batch, "gradients", losses)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.item() for k, v in losses.items()} | {"skipped": 0.0}


def _nonfinite(settings: StepSettings, batch: PretrainBatch, what: str, losses: dict) -> dict[str, float]:
    if settings.skip_nonfinite:
        return {"loss": math.nan, "skipped": 1.0}
    raise NonFiniteLossError(
        f"non-finite {what} at epoch {batch.epoch} step {batch.step}: "
        + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    )
