"""Typed run configuration: dataclasses with defaults, loaded from YAML.

Unknown keys and values of the wrong type are refused with a message naming
the dotted key, before any work starts. ``--set a.b=value`` overrides parse
``value`` as YAML (so ``--set optim.lr=0.3`` is a float).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import check_arch
from pipelines.augment.recipe import AugmentConfig, SimCLRRecipe, views_per_image
from pipelines.bad_images import POLICIES as BAD_IMAGE_POLICIES
from pipelines.spec import BACKENDS
from train.losses import GATHERS
from train.objectives import METHODS
from train.preemption import signal_numbers
from train.step import HOST_SYNCS

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
SUNCET_WEIGHT_RULES = ("fixed", "paper_ratio")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


@dataclass
class DataConfig:
    backend: str = "torch"
    root: str = ""  # ImageFolder root holding <train_split>/ and <val_split>/, or a converted dir for dali/ffcv
    train_split: str = "train"
    val_split: str = "val"
    labeled_list: str | None = None  # one relative path (or file name) per line, SimCLR's 10% list format
    labeled_fraction: float = 0.1  # used when labeled_list is None: class-stratified draw with run.seed
    unlabeled_batch_size: int = 44  # per rank, images (each gives the views of augment.views: 2 by default)
    support_classes: int = 20  # C, per rank
    support_images_per_class: int = 2  # K
    support_views: int = 1  # V augmented views of each support image
    support_view_group: int = 0  # whose recipe (and resolution) the support views take: an index into augment.views
    unique_classes: bool = False  # each rank draws disjoint classes
    num_workers: int = 8
    prefetch_factor: int = 2
    knn_max_samples: int = 10000  # cap of the held-out set used by the kNN monitor
    on_bad_image: str = "error"  # an image unreadable at training time: "error" names it, "skip" replaces and counts it


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    head_hidden_dim: int = 2048
    head_out_dim: int = 128  # SimCLR and SwAV: 128; PAWS: 2048
    pred_hidden_dim: int | None = None  # PAWS's prediction head: head_out_dim // 4 when null
    sync_bn: bool = True  # SyncBatchNorm with several ranks on CUDA
    sync_bn_group_size: int = 0  # ranks per SyncBN group, consecutive (SwAV's script: 8); 0: every rank
    channels_last: bool = True


OPTIMIZERS = ("lars", "larc")


@dataclass
class OptimConfig:
    # "lars": the suncet and PAWS code's LARS (train.lars: biases and BatchNorm excluded from the trust
    # ratio and weight decay, lr inside the momentum buffer); "larc": SwAV's script, SGD + apex LARC
    # (train.larc: every parameter adapted and decayed, lr outside the momentum buffer)
    name: str = "lars"
    epochs: int = 500
    start_lr: float = 0.6
    lr: float = 4.8
    final_lr: float = 0.048
    warmup_epochs: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    nesterov: bool = False


@dataclass
class SwAVConfig:
    """SwAV (Caron et al. 2020; facebookresearch/swav main_swav.py, scripts/swav_400ep_pretrain.sh)."""

    prototypes: int = 3000
    epsilon: float = 0.05  # Sinkhorn-Knopp's entropic regularisation
    sinkhorn_iterations: int = 3
    queue_length: int = 0  # embeddings kept from earlier steps (global, over ranks); 0: no queue
    queue_start_epoch: int = 15  # the queue starts filling at this epoch
    freeze_prototypes_steps: int = 313  # the prototypes get no update for this many global steps


@dataclass
class PAWSConfig:
    """PAWS (Assran et al. 2021; the official suncet repository's src/losses.py, configs/paws/imgnt_train.yaml)."""

    sharpen: float = 0.25  # target temperature T
    me_max: bool = True  # mean-entropy maximisation of the average prediction
    label_smoothing: float = 0.1


@dataclass
class LossConfig:
    method: str = "simclr"  # simclr (NT-Xent) | swav | paws; loss.suncet_weight adds SuNCEt to simclr and swav
    temperature: float = 0.1
    suncet_weight: float = 1.0  # 0 gives SimCLR alone
    # "paper_ratio": suncet_weight is scaled so that one support anchor weighs as much against one view
    # anchor as at the paper's per-GPU shapes (2.2x: 88 views, 40 support images); x1 at those shapes
    # (effective_suncet_weight; chosen on held-out images, RESULTS.md). "fixed": NT-Xent + suncet_weight x SuNCEt
    suncet_weight_rule: str = "paper_ratio"
    supervised_epochs: int | None = None  # SuNCEt switched off from this epoch on (None: never)
    # which NT-Xent rows carry gradient (train.losses.init_nt_xent_loss): "grad" every row (SimCLR's formula);
    # "official" only the anchors, every key a constant (the official SuNCEt code); "detached" a rank's own rows
    ntxent_gather: str = "grad"
    on_nonfinite: str = "stop"  # "stop" the run, or "skip" the step and count it
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    paws: PAWSConfig = field(default_factory=PAWSConfig)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    precision: str = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise
    deterministic: bool = False
    log_every_steps: int = 10
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    knn_every_epochs: int = 1  # 0 disables the kNN monitor
    knn_k: int = 20
    max_steps_per_epoch: int | None = None  # truncate epochs (smoke tests, profiling)
    progress_bar: bool = True  # a bar on a terminal, one line per log step elsewhere
    logger: str = "none"  # "wandb": also send metrics to Weights & Biases (metrics.csv and TensorBoard always)
    # signals that make the run write a checkpoint and exit with code 143 (train.preemption); several
    # ranks agree at log steps. SLURM sends SIGTERM before preemption and at the time limit
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


@dataclass
class ComputeConfig:
    """How the training step runs on the device. None of these switches changes
    the maths: each is tested against the eager step (per-parameter LARS, a
    host sync every step, no compilation). Measure them with
    ``python -m tools.throughput --mode compute --step-variants ...``."""

    lars_foreach: bool = False  # LARS as multi-tensor (torch._foreach_*) ops instead of a per-parameter loop
    # "step": the host waits for the device every step (.item() checks of the loss, the gradients and
    # GradScaler's inf check). "log": only at log steps, checkpoint steps and epoch ends; a non-finite
    # step is masked on the device and loss.on_nonfinite acts at the next of those steps.
    host_sync: str = "step"
    # host_sync=log on CUDA: the host may run at most this many steps ahead of the device.
    # With data.backend=ffcv on CUDA it is 0 whatever is set (FFCV's pinned buffers need the sync).
    max_host_lead_steps: int = 2
    compile: bool = False  # torch.compile of the model's forward and the losses
    cuda_graphs: bool = False  # with compile: torch.compile mode "reduce-overhead" (CUDA graphs); CUDA only
    cudnn_benchmark: bool = True  # CUDA; off anyway with run.deterministic


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

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
        """Refuse impossible values, naming the key. Data-dependent checks
        (C larger than the number of classes, ...) happen when loaders are built."""
        d, o, l, r = self.data, self.optim, self.loss, self.run
        if d.backend not in BACKENDS:
            raise ConfigError(f"data.backend must be one of {BACKENDS}, got {d.backend!r}")
        try:
            check_arch(self.model.arch)
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
        self._validate_method()
        positive_ints = {
            "data.unlabeled_batch_size": d.unlabeled_batch_size,
            "data.support_images_per_class": d.support_images_per_class,
            "data.support_views": d.support_views,
            "optim.epochs": o.epochs,
            "run.log_every_steps": r.log_every_steps,
            "run.checkpoint_every_steps": r.checkpoint_every_steps,
            "run.keep_checkpoints": r.keep_checkpoints,
            "run.knn_k": r.knn_k,
            "model.head_hidden_dim": self.model.head_hidden_dim,
            "model.head_out_dim": self.model.head_out_dim,
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
        groups = len(self.augment.view_groups())
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
        c = self.compute
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
        g = self.model.sync_bn_group_size
        if g < 0:
            raise ConfigError(f"model.sync_bn_group_size must be >= 0 (0: every rank), got {g}")
        if 0 < g < world_size and world_size % g:
            raise ConfigError(f"model.sync_bn_group_size={g} does not divide the world size {world_size}: use a "
                              f"divisor of it, or 0 to synchronise every rank")


    def _validate_method(self) -> None:
        """The objective's own settings (``loss.method``, ``loss.swav``, ``loss.paws``)."""
        l, d = self.loss, self.data
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
            (self.model.pred_hidden_dim is None or self.model.pred_hidden_dim >= 1,
             f"model.pred_hidden_dim must be >= 1 or null, got {self.model.pred_hidden_dim}"),
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


# --------------------------------------------------------------------------- loading


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:  # a list of any length
        item = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return tuple(_build(item, v, f"{key}[{i}].") for i, v in enumerate(value))
        return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(prefix + key + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}; known in {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, annotation)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # dataclass __post_init__ checks (e.g. the recipe)
        raise ConfigError(str(exc)) from exc


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


BASE_KEY = "_base_"  # a config file may name another file whose values it overrides


def shipped_configs() -> list[str]:
    """The names of the configs shipped with the package (``configs/*.yaml``)."""
    try:
        folder = importlib.resources.files("configs")
    except ModuleNotFoundError:  # not installed with its configs
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def find_config(path: str | Path) -> Path:
    """``path`` as given, or, when it does not exist, the config of that name shipped with
    the package (``configs/``), so that ``--config configs/demo.yaml``, ``--config demo.yaml``
    or ``--config demo`` works from an installed package too."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        names = shipped_configs()
        for name in (path.name, f"{path.name}.yaml"):
            if name in names:
                return Path(str(importlib.resources.files("configs").joinpath(name)))
        if names:
            raise ConfigError(f"config file not found: {path}; shipped configs: {', '.join(n[:-5] for n in names)}")
    raise ConfigError(f"config file not found: {path}")


def read_config_tree(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """The values of config file ``path`` merged over those of its ``_base_`` file(s), recursively
    (a base path is relative to the file that names it)."""
    path = find_config(path)
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: _base_ files form a cycle: {' -> '.join(str(p) for p in seen)}")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: {BASE_KEY} must be a file name, got {base!r}")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    return _merge(read_config_tree(base_path, seen + (path.resolve(),)), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a YAML config (or defaults when ``path`` is None), its ``_base_`` chain, and apply overrides."""
    tree = read_config_tree(path) if path is not None else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    return _build(PretrainConfig, tree, "")


def with_overlay(cfg: PretrainConfig, path: str | Path) -> PretrainConfig:
    """``cfg`` with the values of config file ``path`` (and its ``_base_`` chain) merged over it."""
    return _build(PretrainConfig, _merge(config_to_dict(cfg), read_config_tree(path)), "")


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [convert(v) for v in obj]
        return obj

    return convert(cfg)


def config_from_dict(tree: dict) -> PretrainConfig:
    return _build(PretrainConfig, tree, "")
