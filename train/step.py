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
from train.objectives import Objective
from train.precision import Precision

HOST_SYNCS = ("step", "log")
OK, BAD_LOSS, BAD_GRADS = (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)  # (loss non-finite, gradients non-finite)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops and the last checkpoint stays intact."""

    remedy = "lower optim.lr or set loss.on_nonfinite=skip"


class SkipLimitError(NonFiniteLossError):
    """Too many non-finite steps in a row were skipped (``loss.on_nonfinite=skip``)."""

    remedy = "lower optim.lr, or raise loss.max_skipped_in_a_row"


@dataclass(frozen=True)
class StepSettings:
    precision: Precision
    skip_nonfinite: bool = False
    host_sync: str = "step"  # see the module docstring
    compile: bool = False  # torch.compile of the forward pass (model + losses)
    cuda_graphs: bool = False  # with compile: mode "reduce-overhead"

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
    over all view groups) and, when the objective reads it, the support set. The objective
    (``train.objectives``) turns the head's outputs into losses and acts around the update.
    Returns a ``StepResult``; read it through ``StepRecords``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 settings: StepSettings, objective: Objective, unlabeled: int, uses_support: bool,
                 device: torch.device, channels_last: bool = True, views: int = 2):
        if settings.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
        self.model, self.optimizer, self.scaler, self.settings = model, optimizer, scaler, settings
        self.objective, self.names = objective, objective.names
        self.unlabeled, self.views, self.use_support = unlabeled, views, uses_support
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
        """Every view group and the support images through the model in one call (one encoder
        pass per resolution, the head once: ``model.PretrainModel.forward``), then the
        objective's losses, in the order of ``self.names``."""
        parts = [x.contiguous(memory_format=self.memory_format) for x in views]
        if self.use_support:
            parts.append(support.contiguous(memory_format=self.memory_format))
        precision = self.settings.precision
        with torch.autocast(parts[0].device.type, dtype=precision.autocast_dtype or torch.float32,
                            enabled=precision.autocast_dtype is not None):
            out = self.model(parts if len(parts) > 1 else parts[0])
        out = out if isinstance(out, tuple) else (out,)
        out = tuple(x.to(torch.promote_types(x.dtype, torch.float32)) for x in out)  # fp16/bf16 -> fp32
        view_rows = self.views * self.unlabeled
        return self.objective(tuple(x[:view_rows] for x in out), tuple(x[view_rows:] for x in out), labels)

    def __call__(self, batch: PretrainBatch, global_step: int | None = None) -> StepResult:
        """One step on ``batch``; ``global_step`` (the trainer's count; the batch's step when not
        given) tells the objective where the run is."""
        self.objective.begin_step(batch.epoch, batch.step if global_step is None else global_step)
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
        self.objective.before_update(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.objective.after_update(self.model)
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
        self.objective.before_update(self.model)
        self.scaler.step(self.optimizer, skip_if=bad_loss | bad_grads)
        self.scaler.update()
        self.objective.after_update(self.model)
        return torch.stack([bad_loss, bad_grads]).float()


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


class StepRecords:
    """The ``StepResult``s since the last check, read back in one host sync.

    ``check`` returns the losses averaged over those steps (the finite ones) as
    floats, ``steps`` (how many were averaged) and ``skipped`` (the number of
    non-finite steps among them, whose updates were skipped). With
    ``skip_nonfinite=False`` it raises ``NonFiniteLossError`` for the first
    non-finite step instead, naming its epoch, step and losses.

    ``in_a_row`` counts the skipped steps since the last finite one, across
    checks (start it from a checkpoint's count); the step that makes it
    ``max_in_a_row`` raises ``SkipLimitError``, naming the count and the steps:
    a run whose every step is non-finite stops instead of skipping to its end."""

    def __init__(self, skip_nonfinite: bool, max_in_a_row: int | None = None, in_a_row: int = 0):
        self.skip_nonfinite, self.max_in_a_row, self.in_a_row = skip_nonfinite, max_in_a_row, in_a_row
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
        skipped, good = 0, []
        for record, row in zip(pending, rows):
            *losses, bad_loss, bad_grads = row
            if not (bad_loss or bad_grads):
                good.append(losses)
                self.in_a_row = 0
                continue
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(record.names, losses))
            if not self.skip_nonfinite:
                raise NonFiniteLossError(f"non-finite {'loss' if bad_loss else 'gradients'} at epoch {record.epoch} "
                                         f"step {record.step}: {values}")
            skipped += 1
            self.in_a_row += 1
            if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row:
                raise SkipLimitError(f"{self.in_a_row} steps in a row had a non-finite loss or gradients and were "
                                     f"skipped (loss.on_nonfinite=skip, loss.max_skipped_in_a_row="
                                     f"{self.max_in_a_row}): the {self.in_a_row} steps up to epoch {record.epoch} "
                                     f"step {record.step}, the last with {values}")
        kept = good or [rows[-1][:-2]]  # every step skipped: the last one's (non-finite) values
        means = [sum(column) / len(kept) for column in zip(*kept)]
        return dict(zip(pending[-1].names, means)) | {"skipped": float(skipped), "steps": float(len(kept))}


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
