"""The SimCLR recipe as torchvision transforms: the reference every faster
backend is checked against."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipelines.augment.recipe import SimCLRRecipe


class RandomSolarize(torch.nn.Module):
    """With probability ``p``, torchvision's ``solarize`` at a threshold uniform in ``threshold``
    (on [0, 1] values; v2.RandomSolarize takes one fixed threshold)."""

    def __init__(self, p: float, threshold: tuple[float, float]):
        super().__init__()
        self.p, self.threshold = p, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return x
        lo, hi = self.threshold
        return v2.functional.solarize(x, lo + (hi - lo) * torch.rand(1).item())


def simclr_transform(recipe: SimCLRRecipe) -> v2.Compose:
    """PIL image -> one normalised float32 [3,H,W] view, drawn with torch's RNG."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(recipe.resolution, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(recipe.flip_prob),
            v2.RandomApply(
                [v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
                p=recipe.jitter_prob,
            ),
            v2.RandomGrayscale(recipe.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(recipe.blur_kernel_size, sigma=recipe.blur_sigma)], p=recipe.blur_prob),
            v2.ToDtype(torch.float32, scale=True),
            *([RandomSolarize(recipe.solarize_prob, recipe.solarize_threshold)] if recipe.solarize_prob > 0 else []),
            v2.Normalize(recipe.mean, recipe.std),
        ]
    )


def eval_transform(recipe: SimCLRRecipe) -> v2.Compose:
    """Resize the short side to resolution/0.875, centre-crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(round(recipe.resolution / 0.875)), antialias=True),
            v2.CenterCrop(recipe.resolution),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(recipe.mean, recipe.std),
        ]
    )
