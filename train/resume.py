"""What a checkpoint allows a resumed run to change, and how a new world size is absorbed.

A resumed run keeps the checkpoint's *global* batch, whatever the command says:
its ``unlabeled_batch_size x world size`` images per step, and its support set
(``support_images_per_class x world size`` images of each shared class per
step, or ``support_classes x world size`` classes with ``unique_classes``), are
split over the ranks of this run, every time it resumes (a run resumed twice on
one rank after two keeps the global batch; a per-rank value on the command line
that differs is noted and overridden). The steps per epoch (``N // global
batch``), hence the learning-rate schedule, stay the same, and since a global
step holds the same images on any number of ranks (``pipelines.plan``), the
epoch continues at the same image: none repeated or skipped across the change.
A world size that does not divide the global batch is refused, naming the sizes
that do.

Every other change, in any section, is named key by key with the checkpoint's
value and the new one. What the checkpoint's tensors cannot follow is refused in
one line: the objective (``loss.method``), the optimizer (``optim.name``), the
model's weight shapes (``model.*`` but SyncBN and memory format) and SwAV's
prototypes. The schedule's keys (``optim.epochs``, ``warmup_epochs``,
``start_lr``, ``lr``, ``final_lr``) are refused unless the run allows them
(``--allow-schedule-change``). What changes how the run trains (data, augment,
loss, optim, model, the seed) is warned about; how it runs and records (the
``compute`` section, logging, checkpoint cadence) is noted.

``config_history`` keeps the record a run's checkpoints carry of which settings
each stretch of steps trained with, so that an export can describe an encoder
trained at one resolution and resumed at another.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from train.config import ConfigError, PretrainConfig, config_from_dict, config_to_dict, effective_suncet_weight
from train.data import support_spec

# Model settings that change no weight: a checkpoint resumes with any value of them.
WEIGHTLESS_MODEL_KEYS = ("sync_bn", "sync_bn_group_size", "channels_last")
# Optimiser settings that change the learning-rate schedule of the steps still to come.
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "start_lr", "lr", "final_lr")
PER_RANK_KEYS = ("unlabeled_batch_size", "support_classes", "support_images_per_class")
# Settings of how a run runs and records, not of what it trains: a change is a note, not a warning.
RUNNING_KEYS = ("run.output_dir", "run.log_every_steps", "run.checkpoint_every_steps", "run.keep_checkpoints",
                "run.knn_every_epochs", "run.knn_k", "run.progress_bar", "run.logger", "run.preempt_signals",
                "run.preempt_grace_s", "data.num_workers", "data.prefetch_factor", "data.knn_max_samples")


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()  # a view group's key on one side of a comparison only
HISTORY_KEY = "config_history"  # the checkpoint's record (``config_history``)


def flat_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` by dotted key (``augment.views[1].resolution``; a view group's
    unset fields left out)."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else name)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                walk({k: v for k, v in item.items() if v is not None}, f"{key}[{i}]")
        else:
            out[key] = value

    walk(config_to_dict(cfg), "")
    return out


def config_changes(saved_cfg: PretrainConfig, cfg: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint's value, new value)}`` for every setting that differs ("absent"
    for a view group's key on one side only)."""
    before, after = flat_settings(saved_cfg), flat_settings(cfg)
    keys = list(before) + [k for k in after if k not in before]
    return {k: (before.get(k, ABSENT), after.get(k, ABSENT)) for k in keys
            if before.get(k, ABSENT) != after.get(k, ABSENT)}


def weight_keys(cfg: PretrainConfig) -> list[str]:
    """The settings the checkpoint's model and optimizer state depend on: the objective, the
    optimizer, the model's shapes and, for SwAV, its prototypes."""
    model = [f"model.{f.name}" for f in dataclasses.fields(cfg.model) if f.name not in WEIGHTLESS_MODEL_KEYS]
    return ["loss.method", "optim.name", *model] + (["loss.swav.prototypes"] if cfg.loss.method == "swav" else [])


def describe(changes: dict[str, tuple[Any, Any]], keys) -> list[str]:
    return [f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys]


def check_model(saved_cfg: PretrainConfig, cfg: PretrainConfig) -> None:
    """Refuse a checkpoint whose objective, optimizer, model shapes or SwAV prototypes differ from
    the config's (its head, weights or optimizer state would not load, or would train towards
    another loss)."""
    changes = config_changes(saved_cfg, cfg)
    refused = [k for k in weight_keys(saved_cfg) if k in changes]
    if refused:
        raise ConfigError("cannot resume: the checkpoint's weights or optimizer state do not fit this config ("
                          + "; ".join(describe(changes, refused)) + "); resume with the checkpoint's values ("
                          + ", ".join(f"{k}={changes[k][0]}" for k in refused) + ") or start another run.output_dir")


def _split(total: int, world_size: int, what: str, per_rank_key: str, saved: str) -> int:
    if total % world_size:
        fits = [w for w in range(1, total + 1) if total % w == 0]
        raise ConfigError(f"cannot resume on {world_size} rank(s): the checkpoint's {what} of {total} ({saved}) "
                          f"does not split evenly; resume on one of {fits} ranks (keeps {per_rank_key} x ranks)")
    return total // world_size


def per_rank_sizes(saved_cfg: PretrainConfig, saved_world: int, world_size: int) -> dict:
    """The ``data`` fields that keep the checkpoint's global batch and support set on ``world_size`` ranks."""
    d = saved_cfg.data
    batch = _split(d.unlabeled_batch_size * saved_world, world_size, "global batch", "data.unlabeled_batch_size",
                   f"{d.unlabeled_batch_size} x {saved_world}")
    classes, images = d.support_classes, d.support_images_per_class
    if support_spec(saved_cfg) is None:  # SimCLR alone: no support set to split
        pass
    elif d.unique_classes:
        classes = _split(classes * saved_world, world_size, "support classes per step", "data.support_classes",
                         f"{classes} x {saved_world}")
    else:
        images = _split(images * saved_world, world_size, "support images per class and step",
                        "data.support_images_per_class", f"{images} x {saved_world}")
    return {"unlabeled_batch_size": batch, "support_classes": classes, "support_images_per_class": images}


def saved_config(tree: dict) -> PretrainConfig:
    """A checkpoint's config. Checkpoints written before ``loss.suncet_weight_rule`` existed
    trained with the weight as given, which is the rule ``fixed``, not today's default."""
    if "suncet_weight_rule" not in tree.get("loss", {}):
        tree = {**tree, "loss": {**tree.get("loss", {}), "suncet_weight_rule": "fixed"}}
    return config_from_dict(tree)


def warn_if_suncet_weight_changed(saved_cfg: PretrainConfig, cfg: PretrainConfig) -> None:
    before, now = effective_suncet_weight(saved_cfg), effective_suncet_weight(cfg)
    if abs(before - now) > 1e-9 * max(1.0, abs(before)):
        print(f"warning: the SuNCEt weight is now {now:.4g} (loss.suncet_weight={cfg.loss.suncet_weight:g}, "
              f"loss.suncet_weight_rule={cfg.loss.suncet_weight_rule}); the checkpoint trained with {before:.4g} "
              f"(loss.suncet_weight={saved_cfg.loss.suncet_weight:g}, loss.suncet_weight_rule="
              f"{saved_cfg.loss.suncet_weight_rule}). To keep it, resume with those two settings", file=sys.stderr)


def global_batch(cfg: PretrainConfig, world_size: int) -> dict:
    """The global step's shape a checkpoint records: unlabeled images, and the support set as
    (classes, images of each class) over all ranks."""
    d = cfg.data
    classes, per_class = ((d.support_classes * world_size, d.support_images_per_class) if d.unique_classes
                          else (d.support_classes, d.support_images_per_class * world_size))
    return {"unlabeled_images": d.unlabeled_batch_size * world_size, "support_classes": classes,
            "support_images_per_class": per_class, "world_size": world_size}


def resumed_config(saved: dict, cfg: PretrainConfig, world_size: int,
                   allow_schedule_change: bool = False) -> PretrainConfig:
    """The config a run resumed from checkpoint contents ``saved`` trains with (see the module
    docstring): a changed model or method is refused, the global batch kept on any world size,
    other changes named."""
    saved_cfg = saved_config(saved["config"])
    check_model(saved_cfg, cfg)
    saved_world = saved["world_size"]
    sizes = per_rank_sizes(saved_cfg, saved_world, world_size)
    if saved_world != world_size:
        d = saved_cfg.data
        print(f"note: resuming a {saved_world}-rank run on {world_size} rank(s): per rank "
              f"{sizes['unlabeled_batch_size']} unlabeled images (was {d.unlabeled_batch_size}) and "
              f"{sizes['support_classes']} x {sizes['support_images_per_class']} support images (was "
              f"{d.support_classes} x {d.support_images_per_class}): the same global batch, schedule and image "
              "stream", file=sys.stderr)
    overridden = [f"data.{k}={getattr(cfg.data, k)} on the command line, {v} from the checkpoint's global batch"
                  for k, v in sizes.items() if getattr(cfg.data, k) != v]
    if overridden:
        print("note: a resumed run keeps its global batch: " + "; ".join(overridden), file=sys.stderr)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **sizes))
    saved_data = dataclasses.replace(saved_cfg.data, **sizes)
    changes = config_changes(dataclasses.replace(saved_cfg, data=saved_data), cfg)
    schedule = [f"optim.{k}" for k in SCHEDULE_KEYS if f"optim.{k}" in changes]
    if schedule and not allow_schedule_change:
        raise ConfigError("cannot resume: the learning-rate schedule differs from the checkpoint's ("
                          + "; ".join(describe(changes, schedule)) + "); resume with the checkpoint's values, or "
                          "pass --allow-schedule-change to continue on the new schedule from this step")
    trained = [k for k in changes if k not in RUNNING_KEYS and not k.startswith("compute.")]
    running = [k for k in changes if k not in trained]
    if trained:
        print("warning: resuming with settings other than the checkpoint's, used from this step on: "
              + "; ".join(describe(changes, trained)), file=sys.stderr)
    if running:
        print("note: resuming with other run settings: " + "; ".join(describe(changes, running)), file=sys.stderr)
    warn_if_suncet_weight_changed(dataclasses.replace(saved_cfg, data=saved_data), cfg)
    cfg.validate(world_size)
    return cfg



def config_history(saved: dict | None, cfg: PretrainConfig, global_step: int) -> list[dict]:
    """What a checkpoint records of the settings its run trained with: ``{"global_step", "config"}``
    for the start and for every resume that changed a setting, oldest first (``train.export`` reads
    it: an encoder trained at one resolution and resumed at another says so). ``saved``: the
    resumed checkpoint's contents (None for a fresh start, at step 0); one written before this
    record starts its history with its own config at step 0."""
    if saved is None:
        return [{"global_step": 0, "config": config_to_dict(cfg)}]
    history = list(saved.get(HISTORY_KEY) or [{"global_step": 0, "config": saved["config"]}])
    if config_changes(saved_config(history[-1]["config"]), cfg):
        history.append({"global_step": global_step, "config": config_to_dict(cfg)})
    return history
