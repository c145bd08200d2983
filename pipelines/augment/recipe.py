"""The augmentation recipe, defined once as data: SimCLR's colour recipe and the view groups.

Every backend (torch, DALI, FFCV) and every reference (torchvision, batched
torch ops) reads these dataclasses and nothing else, so that the
distributions cannot drift apart. Units follow torchvision's conventions;
backends with other conventions (DALI: hue in degrees) convert from these
fields.

View groups (multi-crop)
    A training step sees each unlabeled image as ``ViewGroup``s: SimCLR's two
    224 px views are one group (``count`` 2), SwAV's and PAWS's multi-crop adds
    a second (6 x 96 px at area scale (0.05, 0.14)). A group is a count and a
    full ``SimCLRRecipe`` (resolution, crop range, colour, blur, solarize).
    ``AugmentConfig`` is the config's ``augment`` section: a recipe (the
    default of every group) plus ``views``, a list of ``ViewGroupSpec``
    overrides; an empty list means SimCLR's one group of two views, so every
    config and checkpoint written before groups existed means what it meant.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

from pipelines.settings import check_settings, setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SimCLRRecipe:
    """SimCLR's augmentation (Chen et al. 2020, appendix A) with strength ``s``, for one view.

    - random resized crop: area fraction in ``crop_scale``, aspect ratio in
      ``crop_ratio`` (log-uniform), resized to ``resolution`` x ``resolution``;
    - horizontal flip with ``flip_prob``;
    - colour jitter with ``jitter_prob``: brightness, contrast, saturation
      factors uniform in [1 - 0.8 s, 1 + 0.8 s], hue shift uniform in
      [-0.2 s, 0.2 s] (fraction of the hue circle), applied in random order;
    - grayscale with ``grayscale_prob`` (ITU-R 601 luma, kept 3-channel);
    - Gaussian blur with ``blur_prob``, sigma uniform in ``blur_sigma`` pixels,
      kernel side ``blur_kernel_fraction`` of the resolution (made odd);
    - solarize with ``solarize_prob`` (BYOL; 0 in SimCLR): values at or above a
      threshold drawn uniformly in ``solarize_threshold`` (on [0, 1] pixel values;
      BYOL's is 0.5, PAWS's CIFAR-10 recipe draws it in [0, 1]) become ``1 - v``;
    - normalisation by ``mean`` / ``std`` on [0, 1] pixel values.
    """

    resolution: int = setting(224, "side of the square view, px", low=8, high=2048,
                              why="a view's pixels grow with its side squared: 2048 px is 84 x a 224 px view")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "area fraction of the image the random crop covers, "
                                              "drawn uniformly", low=0.0, low_open=True, high=1.0, ordered=True)
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "aspect ratio (width / height) of the crop, drawn "
                                              "log-uniformly", low=0.0, low_open=True, ordered=True)
    flip_prob: float = setting(0.5, "probability of a horizontal flip", low=0.0, high=1.0)
    jitter_strength: float = setting(1.0, "colour jitter strength s: brightness, contrast, saturation factors in "
                                     "[1 - 0.8 s, 1 + 0.8 s], hue shift in [-0.2 s, 0.2 s]", low=0.0, high=10.0,
                                     why="factors reach 1 + 0.8 s: beyond 10 most jittered views saturate")
    jitter_prob: float = setting(0.8, "probability of the colour jitter", low=0.0, high=1.0)
    grayscale_prob: float = setting(0.2, "probability of turning the view grey (3 channels kept)", low=0.0, high=1.0)
    blur_prob: float = setting(0.5, "probability of the Gaussian blur", low=0.0, high=1.0)
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), "blur sigma in pixels, drawn uniformly", low=0.0,
                                              low_open=True, ordered=True)
    blur_kernel_fraction: float = setting(0.1, "blur kernel side as a fraction of the resolution (made odd, >= 3)",
                                          low=0.0, low_open=True, high=1.0)
    solarize_prob: float = setting(0.0, "probability of solarizing the view (BYOL; 0 in SimCLR)", low=0.0, high=1.0)
    solarize_threshold: tuple[float, float] = setting((0.5, 0.5), "solarize threshold on [0, 1] pixel values, "
                                                      "drawn uniformly", low=0.0, high=1.0, ordered=True)
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, "per-channel mean subtracted from [0, 1] pixel values",
                                               low=0.0, high=1.0)
    std: tuple[float, float, float] = setting(IMAGENET_STD, "per-channel std dividing [0, 1] pixel values", low=0.001,
                                              low_why="1 / std scales the pixels: smaller overflows fp16")

    def __post_init__(self) -> None:
        check_recipe(self, "augment.")

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


def check_recipe(r, prefix: str) -> None:
    """Refuse recipe values of ``r`` (a recipe, or the same fields on any object) outside their
    limits (every number finite, probabilities in [0, 1], ranges in order, ...), naming the key
    as ``prefix + field``."""
    check_settings(dataclasses.fields(SimCLRRecipe), r, prefix)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(SimCLRRecipe))


@dataclass(frozen=True)
class ViewGroup:
    """``count`` views of every image, each drawn independently from ``recipe``."""

    count: int
    recipe: SimCLRRecipe

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a view group needs count >= 1, got {self.count!r}")

    @property
    def resolution(self) -> int:
        return self.recipe.resolution


MAX_VIEWS = 64  # per image, over all groups: far beyond any published recipe (SwAV's largest is 2 + 6)


@dataclass(frozen=True)
class ViewGroupSpec:
    """One entry of the config's ``augment.views``: a count, and the recipe fields that differ
    from the ``augment`` section's (None: as there)."""

    count: int = setting(2, "views of each image in this group", low=1)
    resolution: int | None = None
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_prob: float | None = None
    jitter_strength: float | None = None
    jitter_prob: float | None = None
    grayscale_prob: float | None = None
    blur_prob: float | None = None
    blur_sigma: tuple[float, float] | None = None
    blur_kernel_fraction: float | None = None
    solarize_prob: float | None = None
    solarize_threshold: tuple[float, float] | None = None

    def overrides(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "count" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class AugmentConfig(SimCLRRecipe):
    """The config's ``augment`` section: the recipe every view group starts from, and the groups.

    ``views`` empty: SimCLR's one group of two views with this recipe. Otherwise the groups in
    order; the first holds the global views (its count must be at least 2: the unsupervised
    losses pair an image's views), and ``view_groups()`` resolves each entry against this recipe.
    """

    views: tuple[ViewGroupSpec, ...] = setting((), "view groups (multi-crop), each a count and the recipe keys that "
                                               "differ from this section's; empty: SimCLR's 2 views")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.view_groups()  # refuse impossible groups now, naming them

    def base_recipe(self) -> SimCLRRecipe:
        return SimCLRRecipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    def view_groups(self) -> tuple[ViewGroup, ...]:
        base = self.base_recipe()
        if not self.views:
            return (ViewGroup(2, base),)
        groups = []
        for g, spec in enumerate(self.views):
            key = f"augment.views[{g}]"
            if isinstance(spec.count, bool) or spec.count < 1:
                raise ValueError(f"{key}.count must be >= 1, got {spec.count}")
            values = {name: getattr(base, name) for name in RECIPE_FIELDS} | spec.overrides()
            check_recipe(types.SimpleNamespace(**values), f"{key}.")
            groups.append(ViewGroup(spec.count, SimCLRRecipe(**values)))
        if groups[0].count < 2:
            raise ValueError(f"augment.views[0].count must be >= 2 (the first group holds the views the losses pair), "
                             f"got {groups[0].count}")
        total = sum(g.count for g in groups)
        if total > MAX_VIEWS:
            raise ValueError(f"augment.views ask for {total} views per image; at most {MAX_VIEWS}")
        return tuple(groups)


def views_per_image(groups: tuple[ViewGroup, ...]) -> int:
    return sum(g.count for g in groups)


def describe_views(groups: tuple[ViewGroup, ...]) -> str:
    """``2 views`` for SimCLR's one group, ``2 x 224 px + 6 x 96 px views`` for multi-crop."""
    if len(groups) == 1:
        return f"{groups[0].count} views"
    return " + ".join(f"{g.count} x {g.resolution} px" for g in groups) + " views"
