"""Evaluate a pre-training checkpoint: ``python -m train.evaluate --checkpoint RUN_DIR_OR_FILE --data DIR``.

Three protocols, all trained on the labeled subset of the train split and
scored (top-1 / top-5) on the held-out split:

- ``knn``: weighted cosine kNN on frozen encoder features (``train.knn``);
- ``linear``: multinomial logistic regression on frozen, standardised
  features, fitted by full-batch L-BFGS with an L2 penalty (no learning rate
  to tune);
- ``finetune``: the paper's protocol: encoder plus a new linear layer trained
  end to end on the labeled images (random resized crop + flip; SGD with
  Nesterov momentum, cosine learning rate, no weight decay).

The labeled subset is the one the run used (its labeled list, or the same
stratified draw from its seed) unless ``--labeled-list`` / ``--labeled-fraction``
say otherwise. ``--data`` is an ImageFolder root (``<train>/<class>/<image>``,
``<val>/...``) for every backend, or a converted directory with DALI shards
(``tools.convert_imagenet``), read directly from the tars.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from model import build_model
from pipelines.build import EvalDataset, labeled_indices
from pipelines.datasets import DataError, index_image_folder
from pipelines.encoded_images import ShardImages, open_converted
from pipelines.reference_transforms import eval_transform
from train import checkpoint as ckpt
from train.config import ConfigError, PretrainConfig, config_from_dict
from train.knn import extract_features, knn_accuracy

METHODS = ("knn", "linear", "finetune")


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
    finetune_epochs: int = 30
    finetune_lr: float = 0.05  # per 256 images
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file, or a run directory (newest checkpoint)")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint's data.root)")
    p.add_argument("--method", default="knn", choices=METHODS)
    p.add_argument("--labeled-list", default=None, help="labeled subset file (SimCLR 10percent.txt format)")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="stratified labeled draw (default: the run's labeled list or fraction)")
    p.add_argument("--train-split", default=None)
    p.add_argument("--val-split", default=None, help="held-out split, e.g. test for CIFAR (default: the run's)")
    p.add_argument("--val-max-samples", type=int, default=None)
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--linear-l2", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate per 256 images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


# --------------------------------------------------------------------------- checkpoint and data


def load_checkpoint(path: str | Path) -> tuple[nn.Module, PretrainConfig, Path]:
    """The pre-trained ``SimCLRModel`` (CPU, eval mode), its config, and the file read."""
    path = Path(path)
    if path.is_dir():
        loaded = ckpt.load_latest(path)
        if loaded is None:
            raise DataError(f"no ckpt-*.pt checkpoint in {path}")
        state, path = loaded
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
    else:
        raise DataError(f"checkpoint not found: {path}")
    if "model" not in state or "config" not in state:
        raise DataError(f"{path} is not a pre-training checkpoint (needs 'model' and 'config')")
    cfg = config_from_dict(state["config"])
    m = cfg.model
    model = build_model(m.arch, m.head_hidden_dim, m.head_out_dim, channels_last=m.channels_last, sync_bn=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, path


class ShardDataset(Dataset):
    """(image, label) of a converted split, read from its webdataset shards (``ShardImages``)."""

    def __init__(self, images: ShardImages, transform):
        self.images, self.transform = images, transform
        self.labels = images.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.decode(i)), int(self.labels[i])


@dataclass
class EvalData:
    labeled: Dataset  # eval transform
    labeled_augmented: Dataset  # fine-tuning transform
    val: Dataset
    num_classes: int


def finetune_transform(resolution: int, mean, std) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _val_subset(n: int, cap: int | None, seed: int) -> list[int]:
    ids = np.arange(n)
    if cap is not None and n > cap:
        ids = np.sort(np.random.default_rng(seed).choice(ids, cap, replace=False))
    return ids.tolist()


def labeled_for(cfg: PretrainConfig, s: EvalSettings, index, converted: np.ndarray | None) -> np.ndarray:
    """The run's labeled-subset rule (``labeled_indices``), with --labeled-list or
    --labeled-fraction taking precedence when given."""
    d = cfg.data
    if s.labeled_list is not None:
        d = replace(d, labeled_list=s.labeled_list)
    elif s.labeled_fraction is not None:
        d, converted = replace(d, labeled_list=None, labeled_fraction=s.labeled_fraction), None
    return labeled_indices(replace(cfg, data=d), index, converted)


def build_eval_data(cfg: PretrainConfig, root: Path, s: EvalSettings) -> EvalData:
    """Labeled train subset and held-out split of ``root`` (ImageFolder or DALI shards)."""
    d = cfg.data
    train_split, val_split = s.train_split or d.train_split, s.val_split or d.val_split
    recipe = cfg.augment
    aug = finetune_transform(recipe.resolution, recipe.mean, recipe.std)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    if (root / "manifest.json").is_file():  # a converted directory
        from tools.convert import layout

        if not (layout.shard_dir(root, train_split).is_dir() and layout.shard_dir(root, val_split).is_dir()):
            raise DataError(f"{root} holds no DALI shards for {train_split}/{val_split}; pass the ImageFolder root "
                            "it was converted from as --data")
        train_images, converted = open_converted(root, train_split)
        val_images, _ = open_converted(root, val_split)
        train, train_aug = ShardDataset(train_images, eval_transform(recipe)), ShardDataset(train_images, aug)
        val = ShardDataset(val_images, eval_transform(recipe))
        labeled = labeled_for(cfg, s, train_images.index, converted)
        num_classes = len(train_images.index.classes)
    else:
        index = index_image_folder(root / train_split)
        val_index = index_image_folder(root / val_split)
        if val_index.classes != index.classes:
            raise DataError(f"class folders of {val_index.root} differ from those of {index.root}")
        labeled = labeled_for(cfg, s, index, None)
        train, val = EvalDataset(index, recipe), EvalDataset(val_index, recipe)
        train_aug = EvalDataset(index, recipe)
        train_aug.transform = aug
        num_classes = len(index.classes)
    ids = labeled.tolist()
    val_ids = _val_subset(len(val), s.val_max_samples, s.seed)
    return EvalData(Subset(train, ids), Subset(train_aug, ids), Subset(val, val_ids), num_classes)


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


def finetune(model, data: EvalData, s: EvalSettings, device, channels_last: bool) -> dict[str, float]:
    """Fine-tune encoder + a new linear layer on the labeled images; score on val."""
    torch.manual_seed(s.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = nn.Sequential(model.encoder, nn.Linear(model.feature_dim, data.num_classes)).to(device)
    batch = min(s.finetune_batch_size, len(data.labeled_augmented))
    gen = torch.Generator().manual_seed(s.seed)
    loader = DataLoader(data.labeled_augmented, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=s.num_workers, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=s.finetune_lr * batch / 256, momentum=0.9, nesterov=True)
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


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None, s: EvalSettings) -> dict:
    """Load ``checkpoint``, evaluate with ``s.method`` and return
    ``{"method", "top1", "top5", "checkpoint", "num_labeled", "num_val"}``."""
    model, cfg, path = load_checkpoint(checkpoint)
    root = Path(data if data is not None else cfg.data.root)
    if s.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(s.device)
    model.to(device)
    ev = build_eval_data(cfg, root, s)
    cl = cfg.model.channels_last
    if s.method == "finetune":
        res = finetune(model, ev, s, device, cl)
    else:
        res = evaluate_frozen(model, ev, s, device, cl)
    return {"method": s.method, **res, "checkpoint": str(path), "num_labeled": len(ev.labeled),
            "num_val": len(ev.val)}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        s = EvalSettings(method=a.method, train_split=a.train_split, val_split=a.val_split,
                         labeled_list=a.labeled_list, labeled_fraction=a.labeled_fraction,
                         val_max_samples=a.val_max_samples, knn_k=a.k, knn_temperature=a.knn_temperature,
                         linear_l2=a.linear_l2, finetune_epochs=a.epochs, finetune_lr=a.lr, batch_size=a.batch_size,
                         num_workers=a.num_workers, seed=a.seed, device=a.device, progress=not a.no_progress)
        result = evaluate_checkpoint(a.checkpoint, a.data, s)
    except (ConfigError, DataError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['method']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['num_labeled']} labeled, {result['num_val']} val; {result['checkpoint']})")
    if a.output:
        Path(a.output).write_text(json.dumps({**result, "settings": asdict(s)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
