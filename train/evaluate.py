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
  (``configs/paws/imgnt_fine_tune.yaml``: 50 epochs, 0.02); one line per epoch,
  and the fine-tuned model saved as an export (``train.finetune``).

The labeled subset is the one the run used (its labeled list, or the same
stratified draw from its seed) unless ``--labeled-list`` / ``--labeled-fraction``
say otherwise. ``--data`` is an ImageFolder root (``<train>/<class>/<image>``,
``<val>/...``) for every backend, or a converted directory with DALI shards
(``tools.convert_imagenet``), read directly from the tars. An exported encoder is
described by its sidecar (``train.encoder_info``), checked before use.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model import PretrainModel, check_arch
from pipelines.atomic_write import write_text_atomically
from pipelines.augment.recipe import IMAGENET_MEAN, IMAGENET_STD
from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import ConfigError, PretrainConfig
from train.distributed import DeviceError, choose_device
from train.encoder_info import (MAX_RESOLUTION, MIN_RESOLUTION, EncoderInfo, ExportError, is_safetensors,
                                read_info, sidecar)
from train.eval_inputs import EvalData, build_eval_data
from train.eval_settings import FINETUNE_PROTOCOLS, METHODS, SNN_TEMPERATURE, EvalSettings
from train.export import CONFIG_HISTORY_KEY, encoder_model, export_files, load_pretrained
from train.finetune import finetune
from train.knn import extract_features, knn_accuracy, topk_accuracy
from train.output_files import check_writable, refuse_existing

__all__ = ["EvalSettings", "evaluate_checkpoint", "fit_linear_probe", "main", "snn_probabilities", "topk_accuracy"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a ckpt-*.pt file, a run directory (newest checkpoint), or an encoder from tools.export")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint's data.root)")
    p.add_argument("--arch", default=None,
                   help="encoder architecture of an exported encoder (default: its sidecar's; resnet50 without one)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"image side for an exported encoder, {MIN_RESOLUTION}-{MAX_RESOLUTION} (default: its "
                        "sidecar's; 224 without one; a training checkpoint knows its own)")
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
    p.add_argument("--finetune-out", default=None,
                   help="where --method finetune saves its model, an export with its classifier (default: "
                        "finetuned_<protocol>_seed<seed>.pth beside the checkpoint; refused if it exists)")
    p.add_argument("--finetune-val-every", type=int, default=1,
                   help="score the held-out split every N fine-tuning epochs (0: after the last only); each "
                        "score is one pass over the held-out split, which can cost more than an epoch on few labels")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch for features and scoring")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of draws (held-out cap, fine-tuning order)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- protocols


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


# --------------------------------------------------------------------------- checkpoint


class Loaded(NamedTuple):
    """What ``load_for_evaluation`` read."""

    model: PretrainModel  # eval mode; an export's has no head
    cfg: PretrainConfig  # a checkpoint's config, or the defaults with an export's EncoderInfo applied
    path: Path  # the file read
    info: EncoderInfo  # the encoder's description (an export's sidecar, or the checkpoint's config)
    listed_by: Path | None  # an export's sidecar, whose labeled list is read only from inside --data


def check_overrides(arch: str | None, resolution: int | None) -> None:
    """Refuse an --arch this version cannot build or a --resolution out of range, before any work."""
    if resolution is not None and not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ConfigError(f"--resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] pixels, got {resolution}")
    if arch is not None:
        try:
            check_arch(arch)
        except ValueError as exc:
            raise ConfigError(f"--arch: {exc}") from None


def load_for_evaluation(checkpoint: str | Path, arch: str | None, resolution: int | None) -> Loaded:
    """A training checkpoint (file or run directory), or an encoder exported by ``tools.export``
    (any format) described by its sidecar; ``arch`` and ``resolution`` override the sidecar's
    (without one: resnet50 at 224 px, ImageNet normalisation, the 10 % draw)."""
    check_overrides(arch, resolution)
    path = Path(checkpoint)
    if path.is_file() and not is_safetensors(path):
        state = ckpt.load(path)
        is_training = isinstance(state, dict) and "model" in state and "config" in state
    else:
        is_training = path.is_dir() or not path.exists()
    if is_training:
        model, cfg, path, state = load_pretrained(path)
        step = state.get("train_state", {}).get("global_step")
        return Loaded(model, cfg, path, EncoderInfo.of(cfg, path, step, state.get(CONFIG_HISTORY_KEY)), None)
    info = read_info(path)  # the export's arch, image settings and labeled-subset rule
    if info is None:
        print(f"note: {path} has no {sidecar(path)} beside it (an export from before it was written): ImageNet "
              "normalisation and --arch/--resolution are assumed", file=sys.stderr)
        info = EncoderInfo(arch or "resnet50", resolution or 224, IMAGENET_MEAN, IMAGENET_STD)
    info = dataclasses.replace(info, arch=arch or info.arch, resolution=resolution or info.resolution)
    model, _ = encoder_model(path, info.arch, len(info.classes or ()))
    listed_by = sidecar(path) if sidecar(path).is_file() else path
    return Loaded(model.eval(), info.apply(PretrainConfig()), path, info, listed_by)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None, s: EvalSettings,
                        arch: str | None = None, resolution: int | None = None) -> dict:
    """Load ``checkpoint`` (a training checkpoint or an exported encoder), evaluate with
    ``s.method`` and return ``{"method", "top1", "top5", "checkpoint", "num_labeled", "num_val"}``
    (fine-tuning adds ``finetune_log``, ``finetuned_model`` and ``notes``)."""
    loaded = load_for_evaluation(checkpoint, arch, resolution)
    model, cfg = loaded.model, loaded.cfg
    note = loaded.info.resolution_note(loaded.path)
    if note:
        print(note, file=sys.stderr)
    if data is None and not cfg.data.root:
        raise ConfigError("--data is needed: an exported encoder does not record its data root")
    root = Path(data if data is not None else cfg.data.root)
    device = choose_device(s.device, 0)
    model.to(device)
    ev = build_eval_data(cfg, root, s, loaded.listed_by)
    cl = cfg.model.channels_last
    if s.method == "finetune":
        res = finetune(model, ev, s, device, cl, loaded.info)
    elif s.method == "snn":
        res = evaluate_snn(model, ev, s, device, cl)
    else:
        res = evaluate_frozen(model, ev, s, device, cl)
    return {"method": s.method, **res, "checkpoint": str(loaded.path), "num_labeled": len(ev.labeled),
            "num_val": len(ev.val)}


def finetune_target(a: argparse.Namespace) -> str | None:
    """Where ``--method finetune`` saves its model (``--finetune-out``, or beside the checkpoint),
    checked before any work: its folder writable, neither it nor its sidecar there already."""
    if a.method != "finetune":
        if a.finetune_out:
            raise ConfigError("--finetune-out applies to --method finetune only")
        return None
    source = Path(a.checkpoint)
    folder = source if source.is_dir() else source.parent
    out = check_writable(a.finetune_out or folder / f"finetuned_{a.finetune_protocol}_seed{a.seed}.pth",
                         "--finetune-out")
    refuse_existing(export_files(out), "--finetune-out", "pass another --finetune-out, or move them away")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    epochs, lr = FINETUNE_PROTOCOLS[a.finetune_protocol]
    try:
        s = EvalSettings(method=a.method, train_split=a.train_split, val_split=a.val_split,
                         labeled_list=a.labeled_list, labeled_fraction=a.labeled_fraction,
                         val_max_samples=a.val_max_samples, knn_k=a.k, knn_temperature=a.knn_temperature,
                         linear_l2=a.linear_l2, finetune_epochs=epochs if a.epochs is None else a.epochs,
                         finetune_lr=lr if a.lr is None else a.lr, finetune_val_every=a.finetune_val_every,
                         snn_temperature=a.snn_temperature, batch_size=a.batch_size, num_workers=a.num_workers,
                         seed=a.seed, device=a.device, progress=not a.no_progress)
        if a.output:  # before the evaluation, not after it
            check_writable(a.output, "--output")
        s.finetune_out = finetune_target(a)
        result = evaluate_checkpoint(a.checkpoint, a.data, s, a.arch, a.resolution)
    except (ConfigError, DataError, ckpt.CheckpointError, ExportError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['method']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['num_labeled']} labeled, {result['num_val']} val; {result['checkpoint']})")
    for note in result.get("notes", []):
        print(note)
    if a.output:
        text = json.dumps({**result, "settings": dataclasses.asdict(s)}, indent=2) + "\n"
        try:
            write_text_atomically(a.output, text)
        except OSError as exc:
            print(f"error: --output {a.output} cannot be written ({exc.strerror or exc}); the result is above",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
