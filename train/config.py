"""Typed run configuration: the ``PretrainConfig`` tree of sections, loaded from YAML.

The public face of the config modules, which every caller imports from here:
``train.config_sections`` (``data``, ``model``, ``optim``, ``run``, ``compute``),
``train.config_loss`` (``loss``), ``pipelines.augment.recipe`` (``augment``),
``train.config_yaml`` (files, ``_base_`` chains, ``--set``, typed building) and
``train.config_checks`` (what every value and the sections together must satisfy).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.augment.recipe import AugmentConfig, SimCLRRecipe, views_per_image
from pipelines.settings import setting
from pipelines.spec import BACKENDS
from train.config_checks import check_values, config_warnings, validate_config
from train.config_fields import ConfigError
from train.config_loss import SUNCET_WEIGHT_RULES, LossConfig, PAWSConfig, SwAVConfig
from train.config_sections import (OPTIMIZERS, PRECISIONS, ComputeConfig, DataConfig, ModelConfig, OptimConfig,
                                   RunConfig)
from train.config_yaml import (BASE_KEY, NUMBER, build_dataclass, config_to_dict, find_config, merge_trees,
                               parse_overrides, read_config_tree, shipped_configs)

__all__ = [
    "BACKENDS", "BASE_KEY", "NUMBER", "OPTIMIZERS", "PAPER_SUPPORT", "PAPER_VIEWS", "PRECISIONS",
    "SUNCET_WEIGHT_RULES", "AugmentConfig", "ComputeConfig", "ConfigError", "DataConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "PAWSConfig", "PretrainConfig", "RunConfig", "SimCLRRecipe", "SwAVConfig",
    "config_from_dict", "config_to_dict", "effective_suncet_weight", "find_config", "load_config",
    "parse_overrides", "read_config_tree", "shipped_configs", "with_overlay",
]


@dataclass
class PretrainConfig:
    data: DataConfig = setting(doc="What the run reads: the image folder or conversion, the labeled subset, the "
                               "step's unlabeled images and its support set.", factory=DataConfig)
    augment: AugmentConfig = setting(doc="The views: SimCLR's recipe, and the view groups of multi-crop.",
                                     factory=AugmentConfig)
    model: ModelConfig = setting(doc="The encoder and the objective's heads.", factory=ModelConfig)
    optim: OptimConfig = setting(doc="The optimizer and its learning-rate schedule: linear warm-up, then cosine "
                                 "decay, a pure function of the global step.", factory=OptimConfig)
    loss: LossConfig = setting(doc="The objective: SimCLR, SwAV or PAWS, SuNCEt's weight, and what a non-finite "
                               "step does.", factory=LossConfig)
    run: RunConfig = setting(doc="The run folder, seed, precision, logging, checkpoints, kNN monitor and "
                             "preemption.", factory=RunConfig)
    compute: ComputeConfig = setting(doc="How the step runs on the device.", factory=ComputeConfig)

    @property
    def support_batch_size(self) -> int:
        d = self.data
        return d.support_classes * d.support_images_per_class * d.support_views

    @property
    def views_per_image(self) -> int:
        """Views of each unlabeled image, over all view groups (2 for SimCLR)."""
        return views_per_image(self.augment.view_groups())

    @property
    def eval_recipe(self) -> SimCLRRecipe:
        """The first view group's recipe: the resolution and normalisation evaluation uses."""
        return self.augment.view_groups()[0].recipe

    def validate(self, world_size: int = 1) -> None:
        """Refuse impossible values, naming the key (``train.config_checks``)."""
        validate_config(self, world_size)

    @property
    def uses_support(self) -> bool:
        """Whether the run has a support set: SuNCEt on (at some epoch), or PAWS."""
        return self.data.support_classes > 0 and (self.loss.method == "paws" or self.loss.suncet_weight > 0)

    def suncet_active(self, epoch: int) -> bool:
        """SuNCEt is on when it has a weight, until ``loss.supervised_epochs`` (from that epoch on it is off)."""
        loss = self.loss
        return loss.suncet_weight > 0 and (loss.supervised_epochs is None or epoch < loss.supervised_epochs)

    def support_active(self, epoch: int) -> bool:
        """Whether the step of ``epoch`` reads the support set: SuNCEt on, or PAWS (always)."""
        return self.data.support_classes > 0 and (self.loss.method == "paws" or self.suncet_active(epoch))

    def network_images_per_step(self, epoch: int) -> int:
        """Images through the network in one step of ``epoch`` on one rank: every view of every view
        group (a local crop counts as an image) and the support images when the step reads them."""
        return self.views_per_image * self.data.unlabeled_batch_size + (
            self.support_batch_size if self.support_active(epoch) else 0)


# The paper's per-GPU shapes: 44 unlabeled images x 2 views against 20 classes x 2 support images.
PAPER_VIEWS, PAPER_SUPPORT = 88, 40


def effective_suncet_weight(cfg: PretrainConfig) -> float:
    """The SuNCEt weight of the loss (``loss.suncet_weight_rule``).

    NT-Xent is a mean over the step's ``V B`` view anchors (``V`` views per image: 2 for SimCLR)
    and SuNCEt a mean over its ``S`` support images, so one support anchor weighs ``w VB / S``
    view anchors: 2.2 at the paper's shapes, 6.4 with 64 x 2 views and 10 x 2 support images.
    ``paper_ratio`` scales ``w`` by ``(88 / 40) / (VB / S)`` to keep the paper's 2.2 at any
    shapes (x1 at the paper's)."""
    loss, d = cfg.loss, cfg.data
    if loss.suncet_weight_rule == "fixed":
        return loss.suncet_weight
    views, support = cfg.views_per_image * d.unlabeled_batch_size, cfg.support_batch_size
    return loss.suncet_weight * (PAPER_VIEWS / PAPER_SUPPORT) * support / views


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a YAML config (or defaults when ``path`` is None), its ``_base_`` chain, and apply overrides;
    every value is checked on its own (``check_values``) and what is likely a mistake is printed."""
    tree = read_config_tree(path) if path is not None else {}
    tree = merge_trees(tree, parse_overrides(overrides or []))
    cfg = build_dataclass(PretrainConfig, tree)
    check_values(cfg)
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def with_overlay(cfg: PretrainConfig, path: str | Path) -> PretrainConfig:
    """``cfg`` with the values of config file ``path`` (and its ``_base_`` chain) merged over it."""
    return build_dataclass(PretrainConfig, merge_trees(config_to_dict(cfg), read_config_tree(path)))


def config_from_dict(tree: dict) -> PretrainConfig:
    """A checkpoint's or an export's config, typed; its values are not held to today's limits."""
    return build_dataclass(PretrainConfig, tree)
