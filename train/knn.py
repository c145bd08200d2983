"""Weighted cosine kNN on frozen features (the epoch-end monitor and an
evaluation method). Follows the usual protocol (Wu et al. 2018; DINO): the k
nearest labeled features vote with weight exp(sim / T)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


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


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    top1 = (top[:, 0] == test_labels).float().mean().item()
    top5 = (top == test_labels[:, None]).any(dim=1).float().mean().item()
    return {"knn_top1": 100.0 * top1, "knn_top5": 100.0 * top5}
