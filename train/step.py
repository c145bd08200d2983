"""One training step: a batch contract in, the step's losses (on the device) out.

``TrainStep`` is built once per batch shape (``train.wiring.StepKit`` builds
it): the loss closures, the optional ``torch.compile`` of the forward pass and
the host-sync policy are fixed at construction, so a step only launches work.

Host syncs (``compute.host_sync``):

- ``"step"`` (the eager reference): the host reads the loss before backward
  and, without a GradScaler, the gradient norm before the update; a
  non-finite value stops the run (or skips the step) at once.
- ``"log"``: nothing in the step waits for the device. The non-finite checks
  become device flags that mask the LARS update (``LARS.step(skip_if=...)``;
  with a GradScaler the multi-tensor LARS also takes the scaler's inf flag
  without a sync). ``StepRecords.check`` reads the flags and losses of all
  steps since the last check in one transfer, at log steps, checkpoint steps
  and epoch ends, and raises ``NonFiniteLossError`` there, naming the first
  non-finite step. ``HostLead`` bounds how far the host runs ahead.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from pipelines.contract import PretrainBatch
from train.losses import init_nt_xent_loss, init_suncet_loss
from train.precision import Precision

HOST_SYNCS = ("step", "log")
OK, BAD_LOSS, BAD_GRADS = (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)  # (loss non-finite, gradients non-finite)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops and the last checkpoint stays intact."""


@dataclass(frozen=True)
class StepSettings:
    temperature: float
    suncet_weight: float  # 0 for SimCLR alone or after supervised_epochs
    precision: Precision
    skip_nonfinite: bool = False
    host_sync: str = "step"  # see the module docstring
    compile: bool = False  # torch.compile of the forward pass (model + losses)
    cuda_graphs: bool = False  # with compile: mode "reduce-overhead"
    ntxent_gather: str = "grad"  # see train.losses.init_nt_xent_loss

    def __post_init__(self) -> None:
        if self.host_sync not in HOST_SYNCS:
            raise ValueError(f"host_sync must be one of {HOST_SYNCS}, got {self.host_sync!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile=True")


@dataclass
class StepResult:
    """One step's losses and non-finite flags, still on the device."""

    values: torch.Tensor  # [len(names) + 2]: the losses, then 1.0 where the loss / the gradients were non-finite
    names: tuple[str, ...]
    epoch: int
    step: int


class TrainStep:
    """Forward, backward and LARS step for batches of ``unlabeled`` images (``views`` views each,
    over all view groups) and ``support`` labelled rows. Returns a ``StepResult``; read it
    through ``StepRecords``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 settings: StepSettings, unlabeled: int, support: int, world_size: int, device: torch.device,
                 channels_last: bool = True, views: int = 2):
        if settings.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
        self.model, self.optimizer, self.scaler, self.settings = model, optimizer, scaler, settings
        self.unlabeled, self.views = unlabeled, views
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.use_support = settings.suncet_weight > 0 and support > 0
        self.nt_xent = init_nt_xent_loss(unlabeled, settings.temperature, world_size, device,
                                         gather=settings.ntxent_gather, views=views)
        self.suncet = init_suncet_loss(support, settings.temperature, world_size, device) if self.use_support else None
        self.names = ("loss_ntxent", "loss_suncet", "loss") if self.use_support else ("loss_ntxent", "loss")
        # (loss non-finite, gradients non-finite) as device tensors, for the host-synced path
        self._flags = {key: torch.tensor(key, dtype=torch.float32, device=device) for key in (OK, BAD_LOSS, BAD_GRADS)}
        self.forward = self._forward
        if settings.compile:
            mode = "reduce-overhead" if settings.cuda_graphs else None
            self.forward = torch.compile(self._forward, mode=mode, dynamic=False)

    @property
    def syncs_every_step(self) -> bool:
        return self.settings.host_sync == "step"

    def _forward(self, views: tuple[torch.Tensor, ...], support: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode every view group and the support images, one forward per resolution (the
        images of one resolution share BN statistics and one kernel launch stream, as in SwAV;
        SimCLR's two views and the support set are one forward), then NT-Xent over the views
        and SuNCEt on the support. Returns the losses in the order of ``self.names``."""
        parts = list(views) + ([support] if self.use_support else [])
        sides = list(dict.fromkeys(tuple(x.shape[-2:]) for x in parts))  # resolutions, in order of first use
        embeddings: list[torch.Tensor | None] = [None] * len(parts)
        for side in sides:
            members = [k for k, x in enumerate(parts) if tuple(x.shape[-2:]) == side]
            z = self._encode(torch.cat([parts[k] for k in members]))
            for k, chunk in zip(members, z.split([parts[k].shape[0] for k in members])):
                embeddings[k] = chunk
        z = z if len(sides) == 1 else torch.cat(embeddings)  # one resolution: already in order
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp16/bf16 -> fp32; an fp64 model stays fp64
        view_rows = self.views * self.unlabeled
        loss_unsup = self.nt_xent(z[:view_rows])
        if not self.use_support:
            return loss_unsup, loss_unsup
        loss_sup = self.suncet(z[view_rows:], labels)
        return loss_unsup, loss_sup, loss_unsup + self.settings.suncet_weight * loss_sup

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        precision = self.settings.precision
        images = images.contiguous(memory_format=self.memory_format)
        with torch.autocast(images.device.type, dtype=precision.autocast_dtype or torch.float32,
                            enabled=precision.autocast_dtype is not None):
            return self.model(images)

    def __call__(self, batch: PretrainBatch) -> StepResult:
        if self.settings.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.forward(batch.views, batch.support_images, batch.support_labels)
        self.optimizer.zero_grad(set_to_none=True)
        verdict = None
        if self.syncs_every_step:
            verdict = self._update_synced(losses[-1])
            flags = self._flags[verdict]
        else:
            flags = self._update_unsynced(losses[-1])
        # A fresh tensor: compiled (CUDA-graph) outputs are overwritten by the next step.
        values = torch.cat([torch.stack([x.detach().float() for x in losses]), flags])
        result = StepResult(values, self.names, batch.epoch, batch.step)
        if verdict not in (None, OK) and not self.settings.skip_nonfinite:
            StepRecords(skip_nonfinite=False).add(result).check()  # raises now, naming the step and losses
        return result

    def _update_synced(self, loss: torch.Tensor) -> tuple[float, float]:
        """The reference path: a NaN/inf loss, or NaN/inf gradients without a
        GradScaler (with one, fp16 overflow steps are skipped by the scaler as
        usual), skip the update, checked on the host."""
        if not torch.isfinite(loss).item():
            return BAD_LOSS
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled():
            if not torch.isfinite(_grad_norm(self.model)).item():
                self.optimizer.zero_grad(set_to_none=True)
                return BAD_GRADS
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return OK

    def _update_unsynced(self, loss: torch.Tensor) -> torch.Tensor:
        """The same decisions as device flags; the update is masked, not skipped
        by the host. A non-finite loss under a GradScaler also counts as an
        overflow for the scaler (its gradients are non-finite), which then
        lowers the scale."""
        bad_loss = ~torch.isfinite(loss)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            bad_grads = torch.zeros_like(bad_loss)  # overflow: the scaler's business, not counted
        else:
            bad_grads = ~torch.isfinite(_grad_norm(self.model))
        self.scaler.step(self.optimizer, skip_if=bad_loss | bad_grads)
        self.scaler.update()
        return torch.stack([bad_loss, bad_grads]).float()


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class StepRecords:
    """The ``StepResult``s since the last check, read back in one host sync.

    ``check`` returns the last step's losses as floats plus ``skipped`` (the
    number of non-finite steps among them, whose updates were skipped). With
    ``skip_nonfinite=False`` it raises ``NonFiniteLossError`` for the first
    non-finite step instead, naming its epoch, step and losses."""

    def __init__(self, skip_nonfinite: bool):
        self.skip_nonfinite = skip_nonfinite
        self.pending: list[StepResult] = []

    def add(self, result: StepResult) -> StepRecords:
        if self.pending and result.names != self.pending[0].names:
            raise ValueError("StepRecords: check() before steps with other losses are added")
        self.pending.append(result)
        return self

    def check(self) -> dict[str, float]:
        if not self.pending:
            return {"skipped": 0.0}
        pending, self.pending = self.pending, []
        rows = torch.stack([r.values for r in pending]).tolist()  # the one host sync
        skipped = 0
        for record, row in zip(pending, rows):
            *losses, bad_loss, bad_grads = row
            if not (bad_loss or bad_grads):
                continue
            if not self.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite {'loss' if bad_loss else 'gradients'} at epoch {record.epoch} step {record.step}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in zip(record.names, losses)))
            skipped += 1
        return dict(zip(pending[-1].names, rows[-1])) | {"skipped": float(skipped)}


class HostLead:
    """Keeps the host at most ``max_steps`` steps ahead of the device: ``wait``
    (before taking the next batch) blocks on the CUDA event of the step
    ``max_steps + 1`` back; ``record`` marks the end of a step's launches.
    ``max_steps=0`` waits for every step, like a per-step sync. A no-op off
    CUDA, where every op has finished when it returns."""

    def __init__(self, max_steps: int, device: torch.device):
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        self.max_steps = max_steps
        self.enabled = device.type == "cuda"
        self._events: collections.deque = collections.deque()

    def record(self) -> None:
        if self.enabled:
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)

    def wait(self) -> None:
        while len(self._events) > self.max_steps:
            self._events.popleft().synchronize()
