"""What a run trains with and where it is: ``Trainer`` (the objects a step needs, built once by
``build_trainer``), ``TrainState`` (the position a checkpoint records), and what the trainer
writes from them: checkpoints and, at the end, the encoder.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from train import checkpoint as ckpt
from train import export
from train.config import ConfigError, PretrainConfig, config_to_dict
from train.data import Loaders, build_loaders
from train.distributed import DistContext
from train.lars import LayerwiseSGD
from train.precision import resolve_precision
from train.resume import HISTORY_KEY, global_batch
from train.run_logger import RunLogger
from train.schedule import WarmupCosineSchedule
from train.wiring import StepKit, build_step_kit


@dataclass
class TrainState:
    """Where the run is: the next step to train is ``step`` of ``epoch``."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0  # the non-finite steps skipped since the last good one (loss.on_nonfinite=skip)
    bad_images: int = 0  # unreadable images replaced (data.on_bad_image=skip), all ranks


@dataclass
class Trainer:
    """The objects a step needs, built once by ``build_trainer``."""

    cfg: PretrainConfig
    ctx: DistContext
    kit: StepKit  # model, optimizer, scaler, precision and the training steps
    schedule: WarmupCosineSchedule
    loaders: Loaders
    steps_per_epoch: int
    logger: RunLogger | None  # main rank of a run; attached after the resume checks
    # the settings each stretch of the run trained with (``train.resume.config_history``), set once at
    # start: every checkpoint carries it, and the exported encoder's sidecar reads its resolutions
    history: list[dict] = field(default_factory=list)

    @property
    def model(self) -> torch.nn.Module:  # DDP-wrapped when distributed
        return self.kit.model

    @property
    def core(self) -> torch.nn.Module:  # the bare model (checkpoints, kNN, export)
        return self.kit.core

    @property
    def optimizer(self) -> LayerwiseSGD:
        return self.kit.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.kit.scaler

    def checkpoint_state(self, state: TrainState, objective: dict, rng: dict) -> dict:
        return {
            "model": self.core.state_dict(),
            "objective": objective,  # SwAV's queue; empty for the others
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": asdict(state),
            "config": config_to_dict(self.cfg),
            HISTORY_KEY: self.history,
            "world_size": self.ctx.world_size,
            "global_batch": global_batch(self.cfg, self.ctx.world_size),  # what a resumed run keeps
            "rng": rng,  # every rank's generators (ckpt.gather_rng_states)
            "loader": self.loaders.train.state_dict(),  # what the stream needs beyond (epoch, step)
        }

    def save(self, state: TrainState) -> None:
        objective = self.kit.objective_state()  # on every rank: SwAV gathers every rank's queue
        rng = ckpt.gather_rng_states(self.ctx.device)  # on every rank: each saves its own generators
        if self.ctx.is_main:
            ckpt.save_checkpoint(self.checkpoint_state(state, objective, rng), Path(self.cfg.run.output_dir),
                                 state.global_step, self.cfg.run.keep_checkpoints)
        if self.ctx.distributed:
            torch.distributed.barrier()

    def load(self, saved: dict) -> None:
        """A checkpoint's model, optimizer, scaler, objective, random and stream state."""
        self.core.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.kit.resume_objective(saved.get("objective") or {})
        ckpt.set_rng_state(saved["rng"], self.ctx.rank, self.ctx.device)
        if saved.get("loader") is not None:
            self.loaders.train.load_state_dict(saved["loader"])

    def export_encoder(self, global_step: int) -> Path:
        """The encoder for other tools (``train.export``) with its ``EncoderInfo`` beside it:
        torchvision's format where the arch is a torchvision one, timm's for timm models, the
        encoder's own keys otherwise (``python -m tools.export`` writes more formats)."""
        run_dir, arch = Path(self.cfg.run.output_dir), self.cfg.model.arch
        fmt = export.default_format(arch)
        name = arch.replace("/", "-")
        path = run_dir / (f"encoder_{name}.pth" if fmt == "native" else f"encoder_{name}_{fmt}.pth")
        info = export.EncoderInfo.of(self.cfg, run_dir, global_step, history=self.history or None)
        return export.export_encoder(self.core, path, fmt, info)


def build_trainer(cfg: PretrainConfig, ctx: DistContext) -> Trainer:
    """Everything a run builds, writing nothing: the run attaches its ``RunLogger`` once it has
    checked that the checkpoint fits (``train.pretrain``)."""
    try:
        precision = resolve_precision(cfg.run.precision, ctx.device)  # once per run
    except ValueError as exc:  # fp16 without CUDA
        raise ConfigError(str(exc)) from None
    loaders = build_loaders(cfg, ctx.rank, ctx.world_size, ctx.device, precision.input_dtype)
    kit = build_step_kit(cfg, ctx, precision)
    o = cfg.optim
    steps = len(loaders.train)
    if cfg.run.max_steps_per_epoch is not None:
        steps = min(steps, cfg.run.max_steps_per_epoch)
    try:
        schedule = WarmupCosineSchedule(steps_per_epoch=steps, epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                        start_lr=o.start_lr, peak_lr=o.lr, final_lr=o.final_lr)
    except ValueError as exc:
        raise ConfigError(f"optim (epochs/warmup_epochs): {exc}") from exc
    return Trainer(cfg, ctx, kit, schedule, loaders, steps, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
