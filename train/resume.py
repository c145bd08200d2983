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

Other changes are named, key by key, with the checkpoint's value and the new
one: data settings are warned about; the schedule's (``optim.epochs``,
``warmup_epochs``, ``start_lr``, ``lr``, ``final_lr``) are refused unless the
run allows them (``--allow-schedule-change``); the optimiser's other settings
are warned about.
"""
from __future__ import annotations

import dataclasses
import sys

from train.config import ConfigError, PretrainConfig, config_from_dict, config_to_dict, effective_suncet_weight
from train.data import support_spec

# Model settings that change no weight: a checkpoint resumes with any value of them.
WEIGHTLESS_MODEL_KEYS = ("sync_bn", "sync_bn_group_size", "channels_last")
# Optimiser settings that change the learning-rate schedule of the steps still to come.
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "start_lr", "lr", "final_lr")
PER_RANK_KEYS = ("unlabeled_batch_size", "support_classes", "support_images_per_class")


def check_model(saved_cfg: PretrainConfig, cfg: PretrainConfig) -> None:
    """Refuse a checkpoint whose objective, optimizer or model differs from the config's (its head,
    weights or optimizer state would not load, or would train towards another loss)."""
    if saved_cfg.loss.method != cfg.loss.method:
        raise ConfigError(f"cannot resume: the checkpoint trained loss.method={saved_cfg.loss.method}, this run asks "
                          f"for {cfg.loss.method}; resume with loss.method={saved_cfg.loss.method} or start another "
                          "run.output_dir")
    if saved_cfg.optim.name != cfg.optim.name:
        raise ConfigError(f"cannot resume: the checkpoint trained with optim.name={saved_cfg.optim.name}, this run "
                          f"asks for {cfg.optim.name} (their states do not load into each other); resume with "
                          f"optim.name={saved_cfg.optim.name} or start another run.output_dir")
    saved, now = config_to_dict(saved_cfg.model), config_to_dict(cfg.model)
    changed = [f"model.{k}: {v!r} in the checkpoint, {now[k]!r} now" for k, v in saved.items()
               if v != now[k] and k not in WEIGHTLESS_MODEL_KEYS]
    if changed:
        raise ConfigError("cannot resume: the model differs from the checkpoint's (" + "; ".join(changed) +
                          "); resume with the checkpoint's model settings or start another run.output_dir")


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


def changed_keys(section: str, saved, now, skip: tuple[str, ...] = ()) -> list[str]:
    """``section.key: old -> new`` for every field of two config sections that differs."""
    before, after = config_to_dict(saved), config_to_dict(now)
    return [f"{section}.{k}: {before[k]!r} -> {after[k]!r}" for k in before if k not in skip and before[k] != after[k]]


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
    data_changes = changed_keys("data", saved_data, cfg.data)
    if data_changes:
        print("warning: resuming with other data settings than the checkpoint's: " + "; ".join(data_changes),
              file=sys.stderr)
    schedule = changed_keys("optim", saved_cfg.optim, cfg.optim,
                            skip=tuple(k for k in config_to_dict(cfg.optim) if k not in SCHEDULE_KEYS))
    if schedule and not allow_schedule_change:
        raise ConfigError("cannot resume: the learning-rate schedule differs from the checkpoint's ("
                          + "; ".join(schedule) + "); resume with the checkpoint's values, or pass "
                          "--allow-schedule-change to continue on the new schedule from this step")
    other = changed_keys("optim", saved_cfg.optim, cfg.optim, skip=SCHEDULE_KEYS)
    if schedule or other:
        print("warning: resuming with other optimiser settings than the checkpoint's: " + "; ".join(schedule + other),
              file=sys.stderr)
    warn_if_suncet_weight_changed(dataclasses.replace(saved_cfg, data=saved_data), cfg)
    cfg.validate(world_size)
    return cfg
