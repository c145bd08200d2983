"""Checks of a whole config: every value, and what the sections ask of each other.

Functions of ``train.config.PretrainConfig`` (not imported here: that module calls them from
``load_config`` and ``PretrainConfig.validate``). Data-dependent checks (C larger than the
number of classes, ...) happen when loaders are built.
"""
from __future__ import annotations

import dataclasses
import math

from model import check_arch, input_geometry
from pipelines.settings import check_settings
from train.config_fields import ConfigError
from train.preemption import signal_numbers


MAX_IMAGES_PER_STEP = 65536  # per rank, every view and support image: 512 x the paper's 128 per GPU


def check_values(cfg: "PretrainConfig") -> None:
    """Every value on its own (each section's limits: ``pipelines.settings``), the encoder's name
    and the preemption signals: what needs neither the world size nor another section's value
    beyond the encoder's input size. Run when a config loads, so ``--print-config`` refuses too."""
    for section in dataclasses.fields(cfg):
        _check_section(getattr(cfg, section.name), section.name + ".")
    try:
        check_arch(cfg.model.arch)
        signal_numbers(cfg.run.preempt_signals)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_input_size(cfg)


def _check_section(section, prefix: str) -> None:
    fields = dataclasses.fields(section)
    try:
        check_settings(fields, section, prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for f in fields:
        if dataclasses.is_dataclass(getattr(section, f.name)):
            _check_section(getattr(section, f.name), f"{prefix}{f.name}.")


def check_input_size(cfg: "PretrainConfig") -> None:
    """A timm model with a fixed input size is refused unless every view has that size."""
    fixed = input_geometry(cfg.model.arch).fixed_side
    sides = sorted({g.resolution for g in cfg.augment.view_groups()})
    if fixed is not None and sides != [fixed]:
        raise ConfigError(f"model.arch {cfg.model.arch} takes {fixed} x {fixed} px images only, but the views are "
                          f"{' and '.join(map(str, sides))} px (augment.resolution, augment.views): set "
                          f"augment.resolution={fixed} (and no other view size), or choose a model that takes "
                          "any size (a CNN, or a ViT: timm/vit_*)")


def config_warnings(cfg: "PretrainConfig") -> list[str]:
    """What trains but is likely a mistake: an encoder that shrinks a view to a 1 x 1 feature map."""
    reduction = input_geometry(cfg.model.arch).reduction
    small = sorted({g.resolution for g in cfg.augment.view_groups() if g.resolution < 2 * reduction})
    if not small:
        return []
    return [f"model.arch {cfg.model.arch} reduces images {reduction}-fold: {' and '.join(map(str, small))} px views "
            f"end as a 1 x 1 feature map (no spatial detail; the kNN monitor may stay near chance). Use views of "
            f">= {2 * reduction} px (augment.resolution), or an encoder for small images (model.arch=resnet18-small "
            "reduces 8-fold)"]


def validate_config(cfg: "PretrainConfig", world_size: int = 1) -> None:
    """Refuse impossible values, naming the key: each value (``check_values``), then what the
    sections ask of each other on ``world_size`` ranks. Data-dependent checks (C larger than
    the number of classes, ...) happen when loaders are built."""
    check_values(cfg)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    _check_data(cfg, world_size)
    _check_schedule(cfg.optim)
    validate_method(cfg)
    if cfg.compute.cuda_graphs and not cfg.compute.compile:
        raise ConfigError("compute.cuda_graphs needs compute.compile=true (the graphs come from torch.compile's "
                          "reduce-overhead mode)")
    g = cfg.model.sync_bn_group_size
    if 0 < g < world_size and world_size % g:
        raise ConfigError(f"model.sync_bn_group_size={g} does not divide the world size {world_size}: use a "
                          f"divisor of it, or 0 to synchronise every rank")


def _check_data(cfg: "PretrainConfig", world_size: int) -> None:
    """The step's shape: view groups, the support set, the images through the network."""
    d, l = cfg.data, cfg.loss
    if d.on_bad_image == "skip" and d.backend == "ffcv":
        raise ConfigError("data.on_bad_image=skip is not supported with data.backend=ffcv: FFCV decodes inside "
                          "its compiled pipeline and cannot replace an image; the .beton's images were checked "
                          "at conversion (python -m tools.verify_converted checks the file)")
    groups = len(cfg.augment.view_groups())
    if not 0 <= d.support_view_group < groups:
        raise ConfigError(f"data.support_view_group must be the index of a view group in augment.views "
                          f"(0 .. {groups - 1}), got {d.support_view_group}")
    if l.suncet_weight > 0 and d.support_classes < 2:
        raise ConfigError("data.support_classes must be >= 2 when loss.suncet_weight > 0 (SuNCEt needs negatives)")
    if l.suncet_weight > 0 and d.support_images_per_class * d.support_views < 2 and (
            world_size == 1 or d.unique_classes):
        where = "on one process" if world_size == 1 else "with data.unique_classes=true"
        raise ConfigError(
            f"data.support_images_per_class=1 with data.support_views=1 {where} gives SuNCEt no positive pair "
            "(each class appears once in a step's support set): set data.support_images_per_class >= 2 or "
            "data.support_views >= 2" + ("" if world_size == 1 else ", or data.unique_classes=false"))
    images = cfg.views_per_image * d.unlabeled_batch_size + (cfg.support_batch_size if cfg.uses_support else 0)
    if images > MAX_IMAGES_PER_STEP:
        raise ConfigError(f"a step would put {images} images through the network on each rank ({cfg.views_per_image} "
                          f"views x data.unlabeled_batch_size={d.unlabeled_batch_size} + the support set's "
                          f"data.support_classes x support_images_per_class x support_views); at most "
                          f"{MAX_IMAGES_PER_STEP} (512 x the paper's 128 per GPU): use more ranks or a smaller batch")


def _check_schedule(o) -> None:
    """The warm-up ends before the last epoch (the cosine phase needs at least one step)."""
    if o.warmup_epochs >= o.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs:g} leaves no step of cosine decay in "
                          f"optim.epochs={o.epochs}: set optim.warmup_epochs below {o.epochs} (e.g. "
                          f"optim.warmup_epochs={o.epochs / 10:g}, a tenth of the run) or optim.epochs to at least "
                          f"{math.floor(o.warmup_epochs) + 1}")


def validate_method(cfg: "PretrainConfig") -> None:
    """What the objective (``loss.method``) asks of the other settings."""
    l, d = cfg.loss, cfg.data
    if l.method == "paws":
        if l.suncet_weight > 0:
            raise ConfigError("loss.suncet_weight applies to loss.method simclr and swav; PAWS reads the support "
                              "set through its own loss: set loss.suncet_weight=0")
        if d.support_classes < 2:
            raise ConfigError(f"loss.method=paws needs a support set of >= 2 classes (data.support_classes), "
                              f"got {d.support_classes}")
