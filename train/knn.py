"""Weighted cosine kNN on frozen features (the epoch-end monitor and an
evaluation method). Follows the usual protocol (Wu et al. 2018; DINO): the k
nearest labeled features vote with weight exp(sim / T)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

PERCENT_DECIMALS = 4  # accuracies in percent: 1 image in 10^6 still shows


@torch.no_grad()
def extract_features(encoder, loader: DataLoader, device: torch.device, channels_last: bool = True,
                     progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 features and labels for every sample of ``loader``."""
    feats, labels = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        f = encoder(images.to(device, non_blocking=True, memory_format=fmt))
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, num_classes] from the k most similar training features
    (features are expected L2-normalised; similarity is the dot product). ``temperature`` must be
    > 0: at 0 the weights overflow and below it the farthest neighbours outvote the nearest."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kNN temperature must be finite and > 0, got {temperature}")
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start : start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent of ``scores [N, C]`` against ``labels [N]``, counted
    exactly and rounded to ``PERCENT_DECIMALS`` (18.8, not float32's 18.799999356269836)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    n = max(len(labels), 1)
    hits = {"top1": int((top[:, 0] == labels).sum()), "top5": int((top == labels[:, None]).any(dim=1).sum())}
    return {name: round(100.0 * count / n, PERCENT_DECIMALS) for name, count in hits.items()}


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return {f"knn_{name}": value for name, value in topk_accuracy(scores, test_labels).items()}
