"""The SimCLR augmentation recipe, defined once as data.

Every backend (torchvision reference, batched torch ops, DALI, FFCV) reads this
dataclass and nothing else, so that the distributions cannot drift apart.
Units follow torchvision's conventions; backends with other conventions (DALI:
hue in degrees, contrast centred on mid-grey) convert from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SimCLRRecipe:
    """SimCLR's augmentation (Chen et al. 2020, appendix A) with strength ``s``.

    - random resized crop: area fraction in ``crop_scale``, aspect ratio in
      ``crop_ratio`` (log-uniform), resized to ``resolution`` x ``resolution``;
    - horizontal flip with ``flip_prob``;
    - colour jitter with ``jitter_prob``: brightness, contrast, saturation
      factors uniform in [1 - 0.8 s, 1 + 0.8 s], hue shift uniform in
      [-0.2 s, 0.2 s] (fraction of the hue circle), applied in random order;
    - grayscale with ``grayscale_prob`` (ITU-R 601 luma, kept 3-channel);
    - Gaussian blur with ``blur_prob``, sigma uniform in ``blur_sigma`` pixels,
      kernel side ``blur_kernel_fraction`` of the resolution (made odd);
    - normalisation by ``mean`` / ``std`` on [0, 1] pixel values.
    """

    resolution: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_strength: float = 1.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"augment.resolution must be >= 8, got {self.resolution}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {p}")
        if self.jitter_strength < 0:
            raise ValueError(f"augment.jitter_strength must be >= 0, got {self.jitter_strength}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"augment.blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")

    # Derived jitter ranges (torchvision conventions).
    @property
    def brightness(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def contrast(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def saturation(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def hue(self) -> float:
        """Maximum hue shift as a fraction of the colour circle (<= 0.5)."""
        return min(0.2 * self.jitter_strength, 0.5)

    @staticmethod
    def factor_range(spread: float) -> tuple[float, float]:
        """The interval a jitter factor (1 = unchanged) is drawn from uniformly, for
        ``spread`` = ``brightness``, ``contrast`` or ``saturation`` (torchvision's rule)."""
        return max(0.0, 1.0 - spread), 1.0 + spread

    @property
    def blur_kernel_size(self) -> int:
        k = max(3, int(round(self.blur_kernel_fraction * self.resolution)))
        return k if k % 2 == 1 else k + 1
