"""Fine-tuning evaluation: the encoder and a new linear layer trained end to end on the labeled images.

The official protocols (``train.eval_settings.FINETUNE_PROTOCOLS``): random resized crop +
flip, SGD with Nesterov momentum 0.9, cosine learning rate, no weight decay, a zero-initialised
classifier. A run of minutes says what it does: one line per epoch (mean loss, top-1 on the
augmented training crops, held-out top-1/top-5 every ``finetune_val_every`` epochs), a note
when the labeled set is so small that fine-tuning is expected to score below kNN and the
linear probe, and the saved model's path (an export with its classifier, ``train.export``).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import PretrainModel
from train.encoder_info import EncoderInfo
from train.eval_inputs import EvalData
from train.eval_settings import EvalSettings
from train.export import default_format, export_encoder
from train.knn import PERCENT_DECIMALS, topk_accuracy

# Below this many labeled images per class (on average), fine-tuning a whole network usually
# overfits them and scores below kNN and the linear probe on frozen features.
FEW_LABELED_PER_CLASS = 25


@dataclass(frozen=True)
class EpochLog:
    """One fine-tuning epoch, as printed and returned (``finetune_log`` in the JSON result)."""

    epoch: int  # 1-based
    loss: float  # mean cross-entropy over the epoch's batches
    train_top1: float  # percent, on the augmented crops the epoch trained on (train mode)
    lr: float  # the learning rate of the epoch's last step
    val_top1: float | None = None  # None: not scored this epoch
    val_top5: float | None = None

    def line(self, epochs: int) -> str:
        val = "" if self.val_top1 is None else f", val top-1 {self.val_top1:.2f}% top-5 {self.val_top5:.2f}%"
        return (f"fine-tune epoch {self.epoch}/{epochs}: loss {self.loss:.4f}, train top-1 {self.train_top1:.2f}% "
                f"(augmented crops){val}, lr {self.lr:.4g}")


def finetune_network(encoder: nn.Module, feature_dim: int, num_classes: int) -> nn.Sequential:
    """The encoder and a new linear classifier whose weight starts at zero (the official code's
    ``torch.nn.init.zeros_(encoder.fc.weight)``): every class starts with the same logit."""
    classifier = nn.Linear(feature_dim, num_classes)
    nn.init.zeros_(classifier.weight)
    return nn.Sequential(encoder, classifier)


def finetune_optimizer(net: nn.Module, lr: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 and no weight decay on every parameter (the official protocols)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)


def few_labeled_note(num_labeled: int, num_classes: int) -> str | None:
    """A note when the labeled set has fewer than ``FEW_LABELED_PER_CLASS`` images per class."""
    per_class = num_labeled / max(num_classes, 1)
    if per_class >= FEW_LABELED_PER_CLASS:
        return None
    return (f"note: fine-tuning on {num_labeled} labeled images ({per_class:.3g} per class, under "
            f"{FEW_LABELED_PER_CLASS}): the whole network overfits so few images, so a result below kNN and the "
            "linear probe is expected (compare --method knn / linear)")


@torch.no_grad()
def score(net: nn.Module, loader: DataLoader, device, fmt, progress: bool) -> dict[str, float]:
    net.eval()
    scores, labels = [], []
    for images, y in tqdm(loader, desc="score val", disable=not progress, leave=False):
        scores.append(net(images.to(device, memory_format=fmt)).float().cpu())
        labels.append(y)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def finetune(model: PretrainModel, data: EvalData, s: EvalSettings, device, channels_last: bool,
             info: EncoderInfo) -> dict:
    """Fine-tune encoder + a new linear layer on the labeled images and score on val: ``{"top1",
    "top5", "finetune_log", "finetuned_model", "notes"}``; the model is saved to ``s.finetune_out``
    (with ``info`` and the class names in its sidecar) when set."""
    note = few_labeled_note(len(data.labeled_augmented), data.num_classes)
    if note:
        print(note, file=sys.stderr, flush=True)
    torch.manual_seed(s.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = finetune_network(model.encoder, model.feature_dim, data.num_classes).to(device)
    batch = min(s.finetune_batch_size, len(data.labeled_augmented))
    gen = torch.Generator().manual_seed(s.seed)
    loader = DataLoader(data.labeled_augmented, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=s.num_workers, generator=gen)
    val_loader = DataLoader(data.val, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers,
                            generator=torch.Generator().manual_seed(s.seed))  # scoring leaves the global RNG alone
    opt = finetune_optimizer(net, s.finetune_lr * batch / 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.finetune_epochs * len(loader))
    log: list[EpochLog] = []
    for epoch in tqdm(range(1, s.finetune_epochs + 1), desc="fine-tune", disable=not s.progress, leave=False):
        net.train()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for images, y in loader:  # sums stay on the device: no host sync per step
            y = y.to(device)
            logits = net(images.to(device, memory_format=fmt))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        last = epoch == s.finetune_epochs
        val = score(net, val_loader, device, fmt, s.progress) if last or (
            s.finetune_val_every and epoch % s.finetune_val_every == 0) else {}
        log.append(EpochLog(epoch, round(loss_sum.item() / seen, 6), round(100.0 * correct.item() / seen,
                                                                         PERCENT_DECIMALS), lr,
                            val.get("top1"), val.get("top5")))
        tqdm.write(log[-1].line(s.finetune_epochs), file=sys.stdout)
    saved = None
    if s.finetune_out:
        encoder = PretrainModel(info.arch, net[0].cpu(), model.feature_dim, nn.Identity())
        saved = str(export_encoder(encoder, Path(s.finetune_out), default_format(info.arch),
                                   dataclasses.replace(info, classes=data.classes), classifier=net[1].cpu()))
        print(f"fine-tuned model saved: {saved} (+ {saved}.json; train.export.load_encoder(path, classifier=True) "
              "loads it)", flush=True)
    return {"top1": log[-1].val_top1, "top5": log[-1].val_top5, "finetune_log": [dataclasses.asdict(e) for e in log],
            "finetuned_model": saved, "notes": [note] if note else []}
