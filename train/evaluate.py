"""Evaluate a pre-training checkpoint: ``python -m train.evaluate --checkpoint RUN_DIR_OR_FILE --data DIR``.

Four protocols, all trained on the labeled subset of the train split and
scored (top-1 / top-5) on the held-out split:

- ``knn``: weighted cosine kNN on frozen encoder features (``train.knn``);
- ``snn``: PAWS's soft nearest-neighbour classifier (the official ``snn_eval.py``):
  the head's embedding (``PretrainModel.embed``: PAWS's prediction, SimCLR's and
  SwAV's projection) of every labeled image, and for each held-out image
  ``softmax(cos / 0.1) @ one-hot labels``; needs a training checkpoint (an
  exported encoder has no head);
- ``linear``: multinomial logistic regression on frozen, standardised
  features, fitted by full-batch L-BFGS with an L2 penalty (no learning rate
  to tune);
- ``finetune``: encoder plus a new, zero-initialised linear layer trained end
  to end on the labeled images (random resized crop + flip; SGD with Nesterov
  momentum 0.9, cosine learning rate, no weight decay), with the official
  protocols' epochs and learning rate per 256 images (``--finetune-protocol``):
  ``suncet`` (``src/fine_tune.py``: 30 epochs, 0.05) or ``paws``
  (``configs/paws/imgnt_fine_tune.yaml``: 50 epochs, 0.02).

The labeled subset is the one the run used (its labeled list, or the same
stratified draw from its seed) unless ``--labeled-list`` / ``--labeled-fraction``
say otherwise. ``--data`` is an ImageFolder root (``<train>/<class>/<image>``,
``<val>/...``) for every backend, or a converted directory with DALI shards
(``tools.convert_imagenet``), read directly from the tars.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from pipelines.atomic_write import write_text_atomically
from pipelines.augment.reference import eval_transform
from pipelines.errors import DataError
from pipelines.eval_data import EvalImages, capped_ids, open_split_images
from pipelines.format.converted import is_converted, open_converted
from pipelines.labeled import LabeledSpec, choose_labeled
from train import checkpoint as ckpt
from train.config import ConfigError, PretrainConfig
from train.data import labeled_spec
from train.distributed import DeviceError, choose_device
from train.export import ExportError, is_safetensors, load_encoder, load_pretrained, read_info
from train.knn import extract_features, knn_accuracy

METHODS = ("knn", "snn", "linear", "finetune")
# Fine-tuning protocols of the official code: (epochs, learning rate per 256 images).
FINETUNE_PROTOCOLS = {"suncet": (30, 0.05), "paws": (50, 0.02)}
SNN_TEMPERATURE = 0.1


@dataclass
class EvalSettings:
    """How to evaluate; ``None`` fields fall back to the checkpoint's config."""

    method: str = "knn"
    train_split: str | None = None
    val_split: str | None = None
    labeled_list: str | None = None
    labeled_fraction: float | None = None
    val_max_samples: int | None = None  # random cap of the held-out set (seeded)
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_l2: float = 1e-4  # L2 penalty of the logistic regression (on the mean loss)
    linear_max_iter: int = 300
    finetune_epochs: int = 30  # FINETUNE_PROTOCOLS["suncet"]
    finetune_lr: float = 0.05  # per 256 images
    snn_temperature: float = SNN_TEMPERATURE
    finetune_batch_size: int = 64
    batch_size: int = 256  # feature extraction / scoring
    num_workers: int = 2
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.knn_k < 1 or self.finetune_epochs < 1 or self.batch_size < 1 or self.finetune_batch_size < 1:
            raise ConfigError("knn k, fine-tune epochs and batch sizes must be >= 1")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ConfigError(f"labeled fraction must be in (0, 1], got {self.labeled_fraction}")
        positive = {"--snn-temperature": self.snn_temperature, "--knn-temperature": self.knn_temperature,
                    "--lr": self.finetune_lr}
        for flag, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be finite and > 0, got {value}")
        if not (math.isfinite(self.linear_l2) and self.linear_l2 >= 0):
            raise ConfigError(f"--linear-l2 must be finite and >= 0, got {self.linear_l2}")
        if self.val_max_samples is not None and self.val_max_samples < 1:
            raise ConfigError(f"--val-max-samples must be >= 1 (or left out for the whole split), "
                              f"got {self.val_max_samples}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a ckpt-*.pt file, a run directory (newest checkpoint), or an encoder from tools.export")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint's data.root)")
    p.add_argument("--arch", default=None,
                   help="encoder architecture of an exported encoder (default: its sidecar's; resnet50 without one)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side for an exported encoder (default: its sidecar's; 224 without one; a training "
                        "checkpoint knows its own)")
    p.add_argument("--method", default="knn", choices=METHODS,
                   help="knn: weighted kNN on frozen features; snn: PAWS's soft nearest neighbours on the head's "
                        "embedding; linear: logistic regression on frozen features; finetune: encoder + a "
                        "zero-initialised linear layer trained on the labeled images")
    p.add_argument("--finetune-protocol", choices=sorted(FINETUNE_PROTOCOLS), default="suncet",
                   help="fine-tuning epochs and learning rate of the official code: suncet (30 epochs, 0.05 per "
                        "256 images) or paws (50 epochs, 0.02); --epochs and --lr override them")
    p.add_argument("--snn-temperature", type=float, default=SNN_TEMPERATURE, help="SNN softmax temperature")
    p.add_argument("--labeled-list", default=None, help="labeled subset file (SimCLR 10percent.txt format)")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="stratified labeled draw (default: the run's labeled list or fraction)")
    p.add_argument("--train-split", default=None, help="split holding the labeled images (default: the run's)")
    p.add_argument("--val-split", default=None, help="held-out split, e.g. test for CIFAR (default: the run's)")
    p.add_argument("--val-max-samples", type=int, default=None,
                   help="score a seeded random draw of this many held-out images (default: all)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="kNN vote weight exp(similarity / T)")
    p.add_argument("--linear-l2", type=float, default=1e-4, help="L2 penalty of the linear probe")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the protocol's)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate per 256 images (default: the "
                                                           "protocol's)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch for features and scoring")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of draws (held-out cap, fine-tuning order)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- checkpoint and data


@dataclass
class EvalData:
    labeled: Dataset  # eval transform
    labeled_augmented: Dataset  # fine-tuning transform
    val: Dataset
    num_classes: int


def finetune_transform(resolution: int, mean, std) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def labeled_for(cfg: PretrainConfig, s: EvalSettings, root: Path, paths, labels, where: str) -> np.ndarray:
    """The run's labeled-subset rule (``pipelines.labeled.choose_labeled``), with --labeled-list
    or --labeled-fraction taking precedence when given."""
    spec = labeled_spec(cfg)
    converted = open_converted(root, s.train_split or cfg.data.train_split).labeled if is_converted(root) else None
    if s.labeled_list is not None:
        spec = LabeledSpec(s.labeled_list, spec.fraction, spec.seed)
    elif s.labeled_fraction is not None:
        spec, converted = LabeledSpec(None, s.labeled_fraction, spec.seed), None
    return choose_labeled(spec, paths, labels, where, converted)


def build_eval_data(cfg: PretrainConfig, root: Path, s: EvalSettings) -> EvalData:
    """Labeled train subset and held-out split of ``root`` (an ImageFolder tree, or a conversion's shards)."""
    d = cfg.data
    train_split, val_split = s.train_split or d.train_split, s.val_split or d.val_split
    recipe = cfg.eval_recipe
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    train, val = open_split_images(root, train_split), open_split_images(root, val_split)
    if val.index.classes != train.index.classes:
        raise DataError(f"class folders of {val.index.root} differ from those of {train.index.root}")
    labeled = labeled_for(cfg, s, root, train.index.paths, train.labels, str(train.index.root))
    aug = finetune_transform(recipe.resolution, recipe.mean, recipe.std)
    return EvalData(EvalImages(train, labeled, eval_transform(recipe)), EvalImages(train, labeled, aug),
                    EvalImages(val, capped_ids(len(val), s.val_max_samples, s.seed), eval_transform(recipe)),
                    len(train.index.classes))


# --------------------------------------------------------------------------- protocols


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {"top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()}


def fit_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
                     max_iter: int = 300) -> nn.Module:
    """Multinomial logistic regression on standardised features (full-batch
    L-BFGS, mean cross-entropy + ``l2``/2 * ||W||^2). Returns a module mapping
    raw features to logits (the standardisation is folded in)."""
    feats = feats.double()
    mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
    x = (feats - mean) / std
    linear = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), labels) + 0.5 * l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # logits = W (f - mean) / std + b
        w = linear.weight / std
        probe.weight.copy_(w.float())
        probe.bias.copy_((linear.bias - w @ mean).float())
    return probe


def _features(model, dataset: Dataset, s: EvalSettings, device, channels_last: bool, desc: str):
    loader = DataLoader(dataset, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers)
    return extract_features(model.features, loader, device, channels_last, s.progress, desc)


def snn_probabilities(query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      temperature: float = SNN_TEMPERATURE) -> torch.Tensor:
    """PAWS's soft nearest-neighbour class probabilities ``[Q, C]``: ``softmax(cos(query, support)
    / temperature) @ one_hot(labels)``."""
    q, sup = F.normalize(query.float(), dim=1), F.normalize(support.float(), dim=1)
    one_hot = F.one_hot(labels.long(), num_classes).float()
    return F.softmax(q @ sup.T / temperature, dim=1) @ one_hot


@torch.no_grad()
def evaluate_snn(model, data: EvalData, s: EvalSettings, device, channels_last: bool) -> dict[str, float]:
    if not hasattr(model, "embed") or isinstance(model.head, nn.Identity):
        raise ConfigError("--method snn needs a training checkpoint: an exported encoder has no head to embed with")
    loader = lambda ds: DataLoader(ds, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers)  # noqa: E731
    train_e, train_y = extract_features(model.embed, loader(data.labeled), device, channels_last, s.progress,
                                        "embed labeled")
    val_e, val_y = extract_features(model.embed, loader(data.val), device, channels_last, s.progress, "embed val")
    return topk_accuracy(snn_probabilities(val_e, train_e, train_y, data.num_classes, s.snn_temperature), val_y)


@torch.no_grad()
def evaluate_frozen(model, data: EvalData, s: EvalSettings, device, channels_last: bool) -> dict[str, float]:
    """kNN or linear probe on frozen (L2-normalised) encoder features."""
    train_f, train_y = _features(model, data.labeled, s, device, channels_last, "features labeled")
    val_f, val_y = _features(model, data.val, s, device, channels_last, "features val")
    if s.method == "knn":
        res = knn_accuracy(train_f, train_y, val_f, val_y, data.num_classes, s.knn_k, s.knn_temperature)
        return {"top1": res["knn_top1"], "top5": res["knn_top5"]}
    probe = fit_linear_probe(train_f, train_y, data.num_classes, s.linear_l2, s.linear_max_iter)
    return topk_accuracy(probe(val_f), val_y)


def finetune_network(encoder: nn.Module, feature_dim: int, num_classes: int) -> nn.Sequential:
    """The encoder and a new linear classifier whose weight starts at zero (the official code's
    ``torch.nn.init.zeros_(encoder.fc.weight)``): every class starts with the same logit."""
    classifier = nn.Linear(feature_dim, num_classes)
    nn.init.zeros_(classifier.weight)
    return nn.Sequential(encoder, classifier)


def finetune_optimizer(net: nn.Module, lr: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 and no weight decay on every parameter (the official protocols)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)


def finetune(model, data: EvalData, s: EvalSettings, device, channels_last: bool) -> dict[str, float]:
    """Fine-tune encoder + a new linear layer on the labeled images; score on val."""
    torch.manual_seed(s.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = finetune_network(model.encoder, model.feature_dim, data.num_classes).to(device)
    batch = min(s.finetune_batch_size, len(data.labeled_augmented))
    gen = torch.Generator().manual_seed(s.seed)
    loader = DataLoader(data.labeled_augmented, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=s.num_workers, generator=gen)
    opt = finetune_optimizer(net, s.finetune_lr * batch / 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.finetune_epochs * len(loader))
    net.train()
    for epoch in tqdm(range(s.finetune_epochs), desc="fine-tune", disable=not s.progress, leave=False):
        for images, y in loader:
            loss = F.cross_entropy(net(images.to(device, memory_format=fmt)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    scores, labels = [], []
    val_loader = DataLoader(data.val, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers)
    with torch.no_grad():
        for images, y in tqdm(val_loader, desc="score val", disable=not s.progress, leave=False):
            scores.append(net(images.to(device, memory_format=fmt)).float().cpu())
            labels.append(y)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def load_for_evaluation(checkpoint: str | Path, arch: str | None, resolution: int | None):
    """(model, config, file) of a training checkpoint (file or run directory), or of an encoder
    exported by ``tools.export`` (any format), which needs ``arch`` and ``resolution`` given since
    it carries no config (defaults for the rest: ImageNet normalisation, the 10 % draw)."""
    path = Path(checkpoint)
    if path.is_file() and not is_safetensors(path):
        state = ckpt.load(path)
        is_training = isinstance(state, dict) and "model" in state and "config" in state
    else:
        is_training = path.is_dir() or not path.exists()
    if is_training:
        model, cfg, path, _ = load_pretrained(path)
        return model, cfg, path
    cfg = PretrainConfig()
    info = read_info(path)  # the export's arch, image settings and labeled-subset rule
    if info is not None:
        cfg = info.apply(cfg)
    else:
        print(f"note: {path} has no {path}.json beside it (an export from before it was written): ImageNet "
              "normalisation and --arch/--resolution are assumed", file=sys.stderr)
    cfg.model = replace(cfg.model, arch=arch or cfg.model.arch)
    cfg.augment = replace(cfg.augment, resolution=resolution or cfg.augment.resolution)
    return load_encoder(path, cfg.model.arch).eval(), cfg, path


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None, s: EvalSettings,
                        arch: str | None = None, resolution: int | None = None) -> dict:
    """Load ``checkpoint`` (a training checkpoint or an exported encoder), evaluate with
    ``s.method`` and return ``{"method", "top1", "top5", "checkpoint", "num_labeled", "num_val"}``."""
    model, cfg, path = load_for_evaluation(checkpoint, arch, resolution)
    if data is None and not cfg.data.root:
        raise ConfigError("--data is needed: an exported encoder does not record its data root")
    root = Path(data if data is not None else cfg.data.root)
    device = choose_device(s.device, 0)
    model.to(device)
    ev = build_eval_data(cfg, root, s)
    cl = cfg.model.channels_last
    if s.method == "finetune":
        res = finetune(model, ev, s, device, cl)
    elif s.method == "snn":
        res = evaluate_snn(model, ev, s, device, cl)
    else:
        res = evaluate_frozen(model, ev, s, device, cl)
    return {"method": s.method, **res, "checkpoint": str(path), "num_labeled": len(ev.labeled),
            "num_val": len(ev.val)}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    epochs, lr = FINETUNE_PROTOCOLS[a.finetune_protocol]
    try:
        s = EvalSettings(method=a.method, train_split=a.train_split, val_split=a.val_split,
                         labeled_list=a.labeled_list, labeled_fraction=a.labeled_fraction,
                         val_max_samples=a.val_max_samples, knn_k=a.k, knn_temperature=a.knn_temperature,
                         linear_l2=a.linear_l2, finetune_epochs=epochs if a.epochs is None else a.epochs,
                         finetune_lr=lr if a.lr is None else a.lr,
                         snn_temperature=a.snn_temperature, batch_size=a.batch_size, num_workers=a.num_workers,
                         seed=a.seed, device=a.device, progress=not a.no_progress)
        if a.output:  # before the evaluation, not after it
            check_writable(Path(a.output))
        result = evaluate_checkpoint(a.checkpoint, a.data, s, a.arch, a.resolution)
    except (ConfigError, DataError, ckpt.CheckpointError, ExportError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['method']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['num_labeled']} labeled, {result['num_val']} val; {result['checkpoint']})")
    if a.output:
        text = json.dumps({**result, "settings": asdict(s)}, indent=2) + "\n"
        try:
            write_text_atomically(a.output, text)
        except OSError as exc:
            print(f"error: --output {a.output} cannot be written ({exc.strerror or exc}); the result is above",
                  file=sys.stderr)
            return 2
    return 0


def check_writable(path: Path) -> None:
    """Refuse an ``--output`` that cannot be written, naming why, before any work is done."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output {path}: folder {path.parent} is not writable")


if __name__ == "__main__":
    sys.exit(main())
