"""Every random choice of a view, as a pure function of its seed: one definition for every backend.

Seeds
    The plan (``pipelines.plan``) gives each image of a step a 64-bit *image
    seed*; the ``v``-th view of that image (counted over the view groups in
    order: SimCLR's two views are 0 and 1, a second group's start at the
    first group's count) has the view seed ``mix(image seed, v)``, and the
    ``k``-th uniform of a view is ``uniform(view seed, k)``. The draws are
    counter-based: no generator state, so any backend, in any thread, in any
    order, draws the same crop, flip and colour for a view.

What uniform ``k`` decides (``U_*``)
    ``0 .. 9`` the area fraction of crop attempt 0..9, ``10 .. 19`` its log
    aspect ratio, ``20``/``21`` the crop's top and left, then flip, jitter,
    the brightness, contrast and saturation factors, the hue shift, four
    order keys (the jitter ops run in the order of their keys), grayscale,
    blur, blur sigma, solarize and its threshold. Distributions are
    torchvision's (``RandomResizedCrop.get_params``: 10 tries of an area
    fraction uniform in ``crop_scale`` and a log-uniform aspect ratio, the
    first that fits placed uniformly, else the largest centred crop with its
    ratio clamped; ``ColorJitter``; ``RandomGrayscale``; ``GaussianBlur``) as
    ``pipelines.augment.recipe.SimCLRRecipe`` states them.

Compiled once with numba: the host calls the batch form (``draw_views``) for
the torch and DALI backends and for FFCV's device colour stage; FFCV's
decoder calls the scalar functions (``crop_box``, ``colour_draw``) inside its
own compiled loop. The recipe reaches compiled code as a float64 vector
(``recipe_vector``), so that one compilation serves every recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from pipelines.augment.recipe import SimCLRRecipe

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop
U_AREA, U_RATIO, U_TOP, U_LEFT = 0, CROP_ATTEMPTS, 2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 1
(U_FLIP, U_JITTER, U_BRIGHTNESS, U_CONTRAST, U_SATURATION, U_HUE, U_ORDER, _, _, _,
 U_GRAY, U_BLUR, U_SIGMA, U_SOLARIZE, U_THRESHOLD) = range(U_LEFT + 1, U_LEFT + 16)

# The recipe as compiled code reads it: ``recipe_vector`` fills these slots.
(R_SCALE_LO, R_SCALE_HI, R_LOG_RATIO_LO, R_LOG_RATIO_HI, R_FLIP, R_JITTER, R_BRIGHTNESS_LO, R_BRIGHTNESS_HI,
 R_CONTRAST_LO, R_CONTRAST_HI, R_SATURATION_LO, R_SATURATION_HI, R_HUE, R_GRAY, R_BLUR, R_SIGMA_LO, R_SIGMA_HI,
 R_SOLARIZE, R_THRESHOLD_LO, R_THRESHOLD_HI) = range(20)
RECIPE_SLOTS = 20

# One view's colour draws, as ``colour_draw`` writes them (floats; flags are 0/1).
(C_FLIP, C_JITTER, C_BRIGHTNESS, C_CONTRAST, C_SATURATION, C_HUE, C_ORDER, _, _, _,
 C_GRAY, C_BLUR, C_SIGMA, C_SOLARIZE, C_THRESHOLD) = range(15)
COLOUR_SLOTS = 15

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ONE = np.uint64(1)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2 ** -53


def recipe_vector(recipe: SimCLRRecipe) -> np.ndarray:
    """float64 [RECIPE_SLOTS]: ``recipe``'s distributions in the ``R_*`` slots."""
    r = recipe
    v = np.zeros(RECIPE_SLOTS, np.float64)
    v[R_SCALE_LO], v[R_SCALE_HI] = r.crop_scale
    v[R_LOG_RATIO_LO], v[R_LOG_RATIO_HI] = math.log(r.crop_ratio[0]), math.log(r.crop_ratio[1])
    v[R_FLIP], v[R_JITTER], v[R_GRAY], v[R_BLUR] = r.flip_prob, r.jitter_prob, r.grayscale_prob, r.blur_prob
    v[R_BRIGHTNESS_LO], v[R_BRIGHTNESS_HI] = r.factor_range(r.brightness)
    v[R_CONTRAST_LO], v[R_CONTRAST_HI] = r.factor_range(r.contrast)
    v[R_SATURATION_LO], v[R_SATURATION_HI] = r.factor_range(r.saturation)
    v[R_HUE] = r.hue
    v[R_SIGMA_LO], v[R_SIGMA_HI] = r.blur_sigma
    v[R_SOLARIZE] = r.solarize_prob
    v[R_THRESHOLD_LO], v[R_THRESHOLD_HI] = r.solarize_threshold
    return v


# --------------------------------------------------------------------------- seeds and uniforms


@njit(cache=True)
def mix(a, b):
    """A 64-bit hash of (a, b): splitmix64's finaliser of ``a + golden (b + 1)`` (wrapping)."""
    x = np.uint64(a) + _GOLDEN * (np.uint64(b) + _ONE)
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def uniform(seed, k):
    """The ``k``-th uniform double in [0, 1) of ``seed`` (53 bits of ``mix(seed, k)``)."""
    return np.float64(mix(seed, k) >> np.uint64(11)) * _TO_UNIT


@njit(cache=True)
def image_seed(key, sample, position):
    """The seed of one image of a step: the step's ``key``, its sample index and its position
    (see ``pipelines.plan``)."""
    return mix(mix(key, sample), position)


@njit(cache=True)
def view_seed(image, view):
    return mix(image, view)


@njit(cache=True)
def _between(seed, k, lo, hi):
    return lo + (hi - lo) * uniform(seed, k)


# --------------------------------------------------------------------------- one view


@njit(cache=True)
def crop_box(seed, height, width, r):
    """torchvision's ``RandomResizedCrop.get_params`` for one view: ``(top, left, h, w)`` in
    pixels of a ``height`` x ``width`` image, from the view's uniforms and recipe vector ``r``."""
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height) * np.float64(width)
    for attempt in range(CROP_ATTEMPTS):
        target = area * _between(seed, U_AREA + attempt, r[R_SCALE_LO], r[R_SCALE_HI])
        aspect = math.exp(_between(seed, U_RATIO + attempt, r[R_LOG_RATIO_LO], r[R_LOG_RATIO_HI]))
        w = np.int64(np.round(math.sqrt(target * aspect)))
        h = np.int64(np.round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(math.floor(uniform(seed, U_TOP) * (height - h + 1)))
            left = np.int64(math.floor(uniform(seed, U_LEFT) * (width - w + 1)))
            return top, left, h, w
    # fallback: the whole image, its ratio clamped to the range
    in_ratio = np.float64(width) / np.float64(height)
    h, w = np.int64(height), np.int64(width)
    if in_ratio < math.exp(r[R_LOG_RATIO_LO]):
        h = np.int64(np.round(width / math.exp(r[R_LOG_RATIO_LO])))
    elif in_ratio > math.exp(r[R_LOG_RATIO_HI]):
        w = np.int64(np.round(height * math.exp(r[R_LOG_RATIO_HI])))
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def colour_draw(seed, r, out):
    """Write one view's flip and colour draws into ``out`` [COLOUR_SLOTS] (``C_*`` slots):
    flags as 0/1, factors as drawn (used where jitter is 1), the op order as op ids."""
    out[C_FLIP] = 1.0 if uniform(seed, U_FLIP) < r[R_FLIP] else 0.0
    out[C_JITTER] = 1.0 if uniform(seed, U_JITTER) < r[R_JITTER] else 0.0
    out[C_BRIGHTNESS] = _between(seed, U_BRIGHTNESS, r[R_BRIGHTNESS_LO], r[R_BRIGHTNESS_HI])
    out[C_CONTRAST] = _between(seed, U_CONTRAST, r[R_CONTRAST_LO], r[R_CONTRAST_HI])
    out[C_SATURATION] = _between(seed, U_SATURATION, r[R_SATURATION_LO], r[R_SATURATION_HI])
    out[C_HUE] = _between(seed, U_HUE, -r[R_HUE], r[R_HUE])
    keys = np.empty(4, np.float64)
    for k in range(4):
        keys[k] = uniform(seed, U_ORDER + k)
    order = np.argsort(keys)
    for k in range(4):
        out[C_ORDER + k] = order[k]
    out[C_GRAY] = 1.0 if uniform(seed, U_GRAY) < r[R_GRAY] else 0.0
    out[C_BLUR] = 1.0 if uniform(seed, U_BLUR) < r[R_BLUR] else 0.0
    out[C_SIGMA] = _between(seed, U_SIGMA, r[R_SIGMA_LO], r[R_SIGMA_HI])
    out[C_SOLARIZE] = 1.0 if uniform(seed, U_SOLARIZE) < r[R_SOLARIZE] else 0.0
    out[C_THRESHOLD] = _between(seed, U_THRESHOLD, r[R_THRESHOLD_LO], r[R_THRESHOLD_HI])


# --------------------------------------------------------------------------- batches


@njit(cache=True)
def image_seeds(key, samples, positions):
    """uint64 [n]: ``image_seed(key, samples[i], positions[i])``."""
    out = np.empty(len(samples), np.uint64)
    for i in range(len(samples)):
        out[i] = image_seed(key, samples[i], positions[i])
    return out


@njit(cache=True)
def draw_rows(seeds, first_view, count, heights, widths, r):
    """``draw_views`` in compiled form: (int64 [count * n, 4] crop boxes, float64 [count * n,
    COLOUR_SLOTS] colour draws), view-major, for images of ``heights`` x ``widths`` pixels."""
    n = len(seeds)
    boxes = np.empty((count * n, 4), np.int64)
    colour = np.empty((count * n, COLOUR_SLOTS), np.float64)
    for v in range(count):
        for i in range(n):
            s = view_seed(seeds[i], first_view + v)
            row = v * n + i
            top, left, h, w = crop_box(s, heights[i], widths[i], r)
            boxes[row, 0], boxes[row, 1], boxes[row, 2], boxes[row, 3] = top, left, h, w
            colour_draw(s, r, colour[row])
    return boxes, colour


@dataclass(frozen=True)
class ViewDraws:
    """The draws of ``count`` views of ``n`` images, view-major (row ``v * n + i`` is view ``v``
    of image ``i``), in torchvision's terms. Factors are as drawn; they apply where ``jitter``."""

    crop: np.ndarray  # int64 [m, 4]: (top, left, height, width) in pixels
    flip: np.ndarray  # bool [m]
    jitter: np.ndarray  # bool [m]
    brightness: np.ndarray  # float64 [m], blend factors (1 = unchanged)
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray  # fraction of the circle
    order: np.ndarray  # int64 [m, 4]: the jitter op ids in the order they apply
    grayscale: np.ndarray  # bool [m]
    blur: np.ndarray  # bool [m]
    sigma: np.ndarray  # float64 [m], pixels
    solarize: np.ndarray  # bool [m]
    threshold: np.ndarray  # float64 [m], on [0, 1] pixel values

    def __len__(self) -> int:
        return len(self.flip)


def draw_views(seeds: np.ndarray, first_view: int, count: int, sizes: np.ndarray,
               recipe: SimCLRRecipe) -> ViewDraws:
    """Views ``first_view .. first_view + count - 1`` of images with seeds ``seeds`` (uint64 [n])
    and ``sizes`` (int [n, 2], height and width in pixels), drawn from ``recipe``."""
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if len(sizes) != len(seeds):
        raise ValueError(f"draw_views: {len(seeds)} seeds but {len(sizes)} sizes")
    boxes, c = draw_rows(seeds, first_view, count, np.ascontiguousarray(sizes[:, 0]),
                           np.ascontiguousarray(sizes[:, 1]), recipe_vector(recipe))
    flag = lambda col: c[:, col] > 0.5  # noqa: E731
    return ViewDraws(boxes, flag(C_FLIP), flag(C_JITTER), c[:, C_BRIGHTNESS], c[:, C_CONTRAST], c[:, C_SATURATION],
                     c[:, C_HUE], c[:, C_ORDER : C_ORDER + 4].astype(np.int64), flag(C_GRAY), flag(C_BLUR),
                     c[:, C_SIGMA], flag(C_SOLARIZE), c[:, C_THRESHOLD])
