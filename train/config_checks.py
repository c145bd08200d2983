"""Checks of a whole config: every value, and what the sections ask of each other.

A function of ``train.config.PretrainConfig`` (not imported here: that module calls these
from ``PretrainConfig.validate``). Data-dependent checks (C larger than the number of
classes, ...) happen when loaders are built.
"""
from __future__ import annotations

import math

from model import check_arch
from pipelines.bad_images import POLICIES as BAD_IMAGE_POLICIES
from pipelines.spec import BACKENDS
from train.config_fields import ConfigError
from train.config_loss import SUNCET_WEIGHT_RULES
from train.config_sections import OPTIMIZERS, PRECISIONS
from train.losses import GATHERS
from train.objectives import METHODS
from train.preemption import signal_numbers
from train.step import HOST_SYNCS


def validate_config(cfg: "PretrainConfig", world_size: int = 1) -> None:
    """Refuse impossible values, naming the key. Data-dependent checks
    (C larger than the number of classes, ...) happen when loaders are built."""
    d, o, l, r = cfg.data, cfg.optim, cfg.loss, cfg.run
    if d.backend not in BACKENDS:
        raise ConfigError(f"data.backend must be one of {BACKENDS}, got {d.backend!r}")
    try:
        check_arch(cfg.model.arch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if r.precision not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {PRECISIONS}, got {r.precision!r}")
    if d.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"data.on_bad_image must be 'error' or 'skip', got {d.on_bad_image!r}")
    if d.on_bad_image == "skip" and d.backend == "ffcv":
        raise ConfigError("data.on_bad_image=skip is not supported with data.backend=ffcv: FFCV decodes inside "
                          "its compiled pipeline and cannot replace an image; the .beton's images were checked "
                          "at conversion (python -m tools.verify_converted checks the file)")
    if l.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"loss.on_nonfinite must be 'stop' or 'skip', got {l.on_nonfinite!r}")
    if r.logger not in ("none", "wandb"):
        raise ConfigError(f"run.logger must be 'none' or 'wandb', got {r.logger!r}")
    try:
        signal_numbers(r.preempt_signals)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if l.ntxent_gather not in GATHERS:
        raise ConfigError(f"loss.ntxent_gather must be one of {GATHERS}, got {l.ntxent_gather!r}")
    if l.suncet_weight_rule not in SUNCET_WEIGHT_RULES:
        raise ConfigError(f"loss.suncet_weight_rule must be one of {SUNCET_WEIGHT_RULES}, "
                          f"got {l.suncet_weight_rule!r}")
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    validate_method(cfg)
    positive_ints = {
        "data.unlabeled_batch_size": d.unlabeled_batch_size,
        "data.support_images_per_class": d.support_images_per_class,
        "data.support_views": d.support_views,
        "optim.epochs": o.epochs,
        "run.log_every_steps": r.log_every_steps,
        "run.checkpoint_every_steps": r.checkpoint_every_steps,
        "run.keep_checkpoints": r.keep_checkpoints,
        "run.knn_k": r.knn_k,
        "model.head_hidden_dim": cfg.model.head_hidden_dim,
        "model.head_out_dim": cfg.model.head_out_dim,
        "data.prefetch_factor": d.prefetch_factor,
        "data.knn_max_samples": d.knn_max_samples,
    }
    for key, value in positive_ints.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    nonnegative_ints = {"run.knn_every_epochs": r.knn_every_epochs, "loss.supervised_epochs": l.supervised_epochs}
    for key, value in nonnegative_ints.items():
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0{' or null' if key.startswith('loss') else ''}, got {value}")
    if not 0 <= r.seed < 2 ** 32:  # numpy's and torch's seeds are unsigned 32-bit integers
        raise ConfigError(f"run.seed must be in [0, 2**32), got {r.seed}")
    if d.unlabeled_batch_size < 2:
        raise ConfigError("data.unlabeled_batch_size must be >= 2 (NT-Xent needs negatives)")
    groups = len(cfg.augment.view_groups())
    if not 0 <= d.support_view_group < groups:
        raise ConfigError(f"data.support_view_group must be the index of a view group in augment.views "
                          f"(0 .. {groups - 1}), got {d.support_view_group}")
    if d.support_classes < 0 or d.num_workers < 0:
        raise ConfigError("data.support_classes and data.num_workers must be >= 0")
    if l.suncet_weight > 0 and d.support_classes < 2:
        raise ConfigError("data.support_classes must be >= 2 when loss.suncet_weight > 0 (SuNCEt needs negatives)")
    if l.suncet_weight > 0 and d.support_images_per_class * d.support_views < 2 and (
            world_size == 1 or d.unique_classes):
        where = "on one process" if world_size == 1 else "with data.unique_classes=true"
        raise ConfigError(
            f"data.support_images_per_class=1 with data.support_views=1 {where} gives SuNCEt no positive pair "
            "(each class appears once in a step's support set): set data.support_images_per_class >= 2 or "
            "data.support_views >= 2" + ("" if world_size == 1 else ", or data.unique_classes=false"))
    c = cfg.compute
    if c.host_sync not in HOST_SYNCS:
        raise ConfigError(f"compute.host_sync must be one of {HOST_SYNCS}, got {c.host_sync!r}")
    if c.max_host_lead_steps < 0:
        raise ConfigError(f"compute.max_host_lead_steps must be >= 0, got {c.max_host_lead_steps}")
    if c.cuda_graphs and not c.compile:
        raise ConfigError("compute.cuda_graphs needs compute.compile=true (the graphs come from torch.compile's "
                          "reduce-overhead mode)")
    if not 0 < d.labeled_fraction <= 1:
        raise ConfigError(f"data.labeled_fraction must be in (0, 1], got {d.labeled_fraction}")
    for key in ("start_lr", "lr", "final_lr", "weight_decay", "momentum", "trust_coefficient", "warmup_epochs"):
        value = getattr(o, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"optim.{key} must be finite and >= 0, got {value}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not math.isfinite(l.temperature) or l.temperature <= 0:
        raise ConfigError(f"loss.temperature must be finite and > 0, got {l.temperature}")
    if not math.isfinite(l.suncet_weight) or l.suncet_weight < 0:
        raise ConfigError(f"loss.suncet_weight must be finite and >= 0, got {l.suncet_weight}")
    if r.max_steps_per_epoch is not None and r.max_steps_per_epoch < 1:
        raise ConfigError("run.max_steps_per_epoch must be >= 1 or null")
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    g = cfg.model.sync_bn_group_size
    if g < 0:
        raise ConfigError(f"model.sync_bn_group_size must be >= 0 (0: every rank), got {g}")
    if 0 < g < world_size and world_size % g:
        raise ConfigError(f"model.sync_bn_group_size={g} does not divide the world size {world_size}: use a "
                          f"divisor of it, or 0 to synchronise every rank")


def validate_method(cfg: "PretrainConfig") -> None:
    """The objective's own settings (``loss.method``, ``loss.swav``, ``loss.paws``)."""
    l, d = cfg.loss, cfg.data
    if l.method not in METHODS:
        raise ConfigError(f"loss.method must be one of {METHODS}, got {l.method!r}")
    sw, pw = l.swav, l.paws
    checks = [
        (sw.prototypes >= 1, f"loss.swav.prototypes must be >= 1, got {sw.prototypes}"),
        (math.isfinite(sw.epsilon) and sw.epsilon > 0, f"loss.swav.epsilon must be > 0, got {sw.epsilon}"),
        (sw.sinkhorn_iterations >= 1, f"loss.swav.sinkhorn_iterations must be >= 1, got {sw.sinkhorn_iterations}"),
        (sw.queue_length >= 0, f"loss.swav.queue_length must be >= 0, got {sw.queue_length}"),
        (sw.queue_start_epoch >= 0, f"loss.swav.queue_start_epoch must be >= 0, got {sw.queue_start_epoch}"),
        (sw.freeze_prototypes_steps >= 0,
         f"loss.swav.freeze_prototypes_steps must be >= 0, got {sw.freeze_prototypes_steps}"),
        (math.isfinite(pw.sharpen) and pw.sharpen > 0, f"loss.paws.sharpen must be > 0, got {pw.sharpen}"),
        (0 <= pw.label_smoothing < 1, f"loss.paws.label_smoothing must be in [0, 1), got {pw.label_smoothing}"),
        (cfg.model.pred_hidden_dim is None or cfg.model.pred_hidden_dim >= 1,
         f"model.pred_hidden_dim must be >= 1 or null, got {cfg.model.pred_hidden_dim}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if l.method == "paws":
        if l.suncet_weight > 0:
            raise ConfigError("loss.suncet_weight applies to loss.method simclr and swav; PAWS reads the support "
                              "set through its own loss: set loss.suncet_weight=0")
        if d.support_classes < 2:
            raise ConfigError(f"loss.method=paws needs a support set of >= 2 classes (data.support_classes), "
                              f"got {d.support_classes}")
