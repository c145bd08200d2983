"""The pre-training objectives: SimCLR (+ SuNCEt), SwAV (+ SuNCEt) and PAWS, behind one interface.

Each objective is one module (``simclr``, ``swav``, ``paws``) that declares
three things (``../shared/STYLE.md`` 16):

- the views it reads (``VIEWS``, a sentence for the console; ``PretrainConfig.validate``
  refuses what it cannot train);
- its head: ``head(cfg)``, a factory of the encoder's feature dimension
  (``model.build_model(..., head=...)``), and ``HEAD_PER_RESOLUTION``, whether the head runs
  on each resolution group on its own (PAWS) or once on every view (SimCLR, SwAV), as the
  authors' code does (``model.PretrainModel``);
- its loss: ``build(spec)`` returns an ``Objective``, built once per phase of the
  run (with or without SuNCEt) by ``train.wiring``.

The trainer, checkpoint, resume, logging and throughput code take any
``Objective`` and never branch on its name: the training step hands it the
head's outputs for the views and for the support images, and calls its hooks
around the update.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

METHODS = ("simclr", "swav", "paws")  # loss.method
Outputs = tuple[torch.Tensor, ...]  # what a head gives, row-sliced (views: view-major, then support rows)


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective is built for: one rank's step shape and the run's settings.

    ``views`` counts every view of an unlabeled image over all view groups; the first
    ``global_views`` of them are the first group's (SwAV assigns codes from two of them, PAWS
    takes its targets from two). ``support`` rows come class-major (``pipelines.contract``)."""

    cfg: object  # the PretrainConfig (its loss section, model head settings, support classes)
    unlabeled: int
    views: int
    global_views: int
    support: int
    suncet_weight: float  # 0: no SuNCEt term in this phase
    world_size: int
    device: torch.device


class Objective(Protocol):
    """One objective's loss for one phase; built once, called every step. Neither the loss nor the
    hooks wait for the device (no ``.item()``, ``nonzero``, ``unique``, boolean-mask indexing or
    tensors made from Python lists): a step with ``compute.host_sync: log`` only launches work."""

    names: tuple[str, ...]  # the losses ``__call__`` returns, in order; the total last

    def begin_step(self, epoch: int, global_step: int) -> None:
        """Before the forward pass of ``global_step``, on the host (SwAV: the prototypes are normalised,
        the queue starts at an epoch)."""

    def __call__(self, views: Outputs, support: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The losses, each the mean over the global batch (identical on every rank)."""

    def before_update(self, model: nn.Module) -> None:
        """Between backward and the optimizer step (SwAV: frozen prototypes lose their gradient)."""

    def after_update(self, model: nn.Module) -> None:
        """After the optimizer step."""

    def state_dict(self) -> dict:
        """What resuming needs beyond the model and optimizer (SwAV: its queue)."""

    def load_state_dict(self, state: dict) -> None:
        ...


def objective_module(method: str):
    """The module of ``loss.method`` (``simclr``, ``swav`` or ``paws``; the config has checked it)."""
    if method not in METHODS:
        raise ValueError(f"loss.method must be one of {METHODS}, got {method!r}")
    return importlib.import_module(f"train.objectives.{method}")


def head_factory(cfg) -> Callable[[int], nn.Module]:
    """The head of ``cfg``'s objective, as a factory of the encoder's feature dimension."""
    return objective_module(cfg.loss.method).head(cfg)


def head_per_resolution(cfg) -> bool:
    """Whether ``cfg``'s objective runs its head per resolution group (``model.PretrainModel``)."""
    return objective_module(cfg.loss.method).HEAD_PER_RESOLUTION


def build_objective(spec: ObjectiveSpec, model: nn.Module) -> Objective:
    """``spec.cfg``'s objective for one phase; ``model`` is the bare model (SwAV reads its prototypes)."""
    return objective_module(spec.cfg.loss.method).build(spec, model)


class NoState:
    """Hooks that do nothing, for objectives without state or update-time work."""

    def begin_step(self, epoch: int, global_step: int) -> None:
        pass

    def before_update(self, model: nn.Module) -> None:
        pass

    def after_update(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
