"""What a training step needs, wired once from the config.

Shared by the training program (``train.pretrain``) and the benchmark
(``tools.throughput``), so that both measure and run the same step: the model
(bare and DDP-wrapped), LARS, the GradScaler, the precision (resolved once)
and the ``TrainStep`` of each phase of the run (with and without SuNCEt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from model import build_model
from train.config import ConfigError, PretrainConfig, effective_suncet_weight
from train.objectives import ObjectiveSpec, build_objective, head_factory, head_per_resolution
from train.distributed import DistContext, sync_bn_process_group
from train.larc import LARC, larc_param_groups
from train.lars import LARS, LayerwiseSGD, lars_param_groups
from train.precision import Precision
from train.step import HostLead, StepSettings, TrainStep


def configure_backends(cfg: PretrainConfig, device: torch.device) -> None:
    """Process-wide kernel choices: cuDNN autotuning (``compute.cudnn_benchmark``) unless ``run.deterministic``."""
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.compute.cudnn_benchmark


def build_model_and_optimizer(cfg: PretrainConfig, ctx: DistContext, precision: Precision):
    """(bare model, DDP-wrapped or bare model, optimizer, GradScaler) on ``ctx.device``.
    SyncBN only where it works: several ranks on CUDA."""
    m, o = cfg.model, cfg.optim
    sync_bn = m.sync_bn and ctx.distributed and ctx.device.type == "cuda"
    core = build_model(m.arch, channels_last=m.channels_last, sync_bn=sync_bn, head=head_factory(cfg),
                       head_per_resolution=head_per_resolution(cfg),
                       sync_bn_group=sync_bn_process_group(m.sync_bn_group_size) if sync_bn else None)
    core.to(ctx.device)
    model = core
    if ctx.distributed:
        model = DistributedDataParallel(core, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, core)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision.use_grad_scaler)
    return core, model, optimizer, scaler


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> LayerwiseSGD:
    """``optim.name``'s optimizer over ``model``'s parameters, at the schedule's first learning rate."""
    o = cfg.optim
    kind, groups = (LARC, larc_param_groups) if o.name == "larc" else (LARS, lars_param_groups)
    return kind(groups(model, o.weight_decay), lr=o.start_lr, momentum=o.momentum,
                trust_coefficient=o.trust_coefficient, nesterov=o.nesterov, foreach=cfg.compute.lars_foreach)


@dataclass
class StepKit:
    """The objects of the training step, built once; ``step_for_epoch`` builds
    each phase's ``TrainStep`` (loss closures, compiled forward) on first use."""

    cfg: PretrainConfig
    ctx: DistContext
    precision: Precision
    core: torch.nn.Module  # the bare model (checkpoints, kNN, export)
    model: torch.nn.Module  # DDP-wrapped when distributed
    optimizer: LayerwiseSGD
    scaler: torch.amp.GradScaler
    host_lead_steps: int  # see compute.max_host_lead_steps
    _steps: dict[bool, TrainStep] = field(default_factory=dict, repr=False)
    _current: TrainStep | None = field(default=None, repr=False)  # the step used last
    _resumed_objective: dict | None = field(default=None, repr=False)  # a checkpoint's, for the first step built

    def step_settings(self) -> StepSettings:
        loss, c = self.cfg.loss, self.cfg.compute
        return StepSettings(self.precision, skip_nonfinite=loss.on_nonfinite == "skip", host_sync=c.host_sync,
                            compile=c.compile, cuda_graphs=c.cuda_graphs)

    def objective_spec(self, epoch: int) -> ObjectiveSpec:
        cfg = self.cfg
        weight = effective_suncet_weight(cfg) if cfg.suncet_active(epoch) else 0.0
        return ObjectiveSpec(cfg, unlabeled=cfg.data.unlabeled_batch_size, views=cfg.views_per_image,
                             global_views=cfg.augment.view_groups()[0].count,
                             support=cfg.support_batch_size if cfg.support_active(epoch) else 0,
                             suncet_weight=weight, world_size=self.ctx.world_size, device=self.ctx.device)

    def step_for_epoch(self, epoch: int) -> TrainStep:
        """The step of ``epoch``'s phase (SuNCEt on or off), built on first use; the phases share
        one objective state (SwAV's queue)."""
        supervised = self.cfg.suncet_active(epoch)
        if supervised not in self._steps:
            objective = build_objective(self.objective_spec(epoch), self.core)
            state = self._current.objective.state_dict() if self._current is not None else self._resumed_objective
            if state:
                objective.load_state_dict(state)
            self._steps[supervised] = TrainStep(
                self.model, self.optimizer, self.scaler, self.step_settings(), objective,
                unlabeled=self.cfg.data.unlabeled_batch_size, uses_support=self.cfg.support_active(epoch),
                device=self.ctx.device, channels_last=self.cfg.model.channels_last, views=self.cfg.views_per_image)
        self._current = self._steps[supervised]
        return self._current

    def objective_state(self) -> dict:
        """The objective's state for a checkpoint; every rank calls it (SwAV gathers its queues)."""
        if self._current is None:
            return self._resumed_objective or {}
        return self._current.objective.state_dict()

    def resume_objective(self, state: dict) -> None:
        """A checkpoint's objective state, loaded into the first step built."""
        self._resumed_objective = state

    def host_lead(self) -> HostLead:
        return HostLead(self.host_lead_steps, self.ctx.device)


def build_step_kit(cfg: PretrainConfig, ctx: DistContext, precision: Precision) -> StepKit:
    """Model, optimizer and scaler for ``precision`` (resolve it once with
    ``train.precision.resolve_precision``). Refuses switches the device cannot run."""
    if cfg.compute.cuda_graphs and ctx.device.type != "cuda":
        raise ConfigError(f"compute.cuda_graphs needs a CUDA device; this run is on {ctx.device.type} "
                          "(set compute.cuda_graphs=false)")
    core, model, optimizer, scaler = build_model_and_optimizer(cfg, ctx, precision)
    return StepKit(cfg, ctx, precision, core, model, optimizer, scaler, host_lead_steps(cfg, ctx.device))


def host_lead_steps(cfg: PretrainConfig, device: torch.device) -> int:
    """How many steps the host may run ahead of the device with ``compute.host_sync=log``.

    FFCV copies each batch from a pinned host buffer that its threads refill once the consumer
    has moved on; only a device that has finished the previous step makes that safe (GPU
    preflight, item 3), so FFCV on CUDA gets no lead. DALI keeps it: its loader holds each batch's
    buffers until a CUDA event after the step that reads them has completed
    (``pipelines.backends.dali.OutputsInUse``)."""
    return 0 if cfg.data.backend == "ffcv" and device.type == "cuda" else cfg.compute.max_host_lead_steps
