"""The SimCLR recipe as one DALI graph whose random parameters come from numpy.

Two steps, as in ``batch_augment``, so that randomness and maths are tested
apart:

1. ``sample_view_params`` draws every per-view parameter of a batch on the
   host from a numpy Generator (torchvision's distributions, vectorised) and
   turns them into the arguments of the DALI ops (``ViewParams``);
2. ``augment_view`` is the DALI graph of one view, deterministic given those
   arguments: ROI resize (crop), one affine colour transform (jitter and
   grayscale), Gaussian blur, then flip + normalise + cast.

Drawing on the host makes the stream a pure function of the generator's seed,
so a run resumed at (epoch, step) sees exactly the views it would have seen,
with no DALI operator state to checkpoint.

Conventions, from torchvision's to DALI's
-----------------------------------------
- Crop: torchvision's ``RandomResizedCrop.get_params`` (10 tries, log-uniform
  aspect ratio, centre-crop fallback) on the encoded image's size, then
  ``fn.resize`` with an absolute ROI ``[top, left] .. [top + h, left + w]``
  (pixels, HW order), linear interpolation with antialiasing.
- Colour jitter: factors are drawn as torchvision's ``ColorJitter`` (uniform
  in [max(0, 1 - 0.8 s), 1 + 0.8 s], hue uniform in [-0.2 s, 0.2 s] of the
  circle, ops in a random order). Brightness, contrast (towards the image's
  mean luma, not mid-grey as DALI's ``brightness_contrast`` assumes),
  saturation and grayscale are affine maps of RGB, so their composition in
  the drawn order is one matrix ``color`` plus an offset ``offset @ mean``
  linear in the image's mean colour; ``fn.coord_transform`` applies it with
  rounding and clamping to uint8 once, where torchvision clamps after every
  op. Hue has no affine equivalent: it becomes a rotation of RGB about the
  grey axis by 360 h degrees: exact at 1/3 turn; mean absolute error against
  torchvision's HSV shift about 4 levels of 255 on Imagenette images at
  |h| = 0.1, more on saturated colours, always below DALI's own
  ``fn.hue``/``fn.hsv``, which rotate in YIQ. (The exact HSV shift in DALI
  arithmetic ops costs more CPU than the rest of the graph.)
- Grayscale: torchvision's luma weights ``LUMA_WEIGHTS``, 3 channels.
- Blur: sigma uniform in ``recipe.blur_sigma`` (pixels), Gaussian truncated
  at ``min(recipe.blur_kernel_size, 2 ceil(3 sigma) + 1)`` taps, so small
  sigmas cost less (the dropped taps weigh under 0.3 %); window 1 (identity)
  where the blur is not applied. DALI's border mode is torchvision's reflect.
- Normalisation: ``crop_mirror_normalize`` with mean and std scaled by 255,
  horizontal flip as its ``mirror`` flag, output fp16 or fp32, HWC or CHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipelines.augment.batched import LUMA_WEIGHTS
from pipelines.augment.recipe import SimCLRRecipe

# Jitter op ids, as in ``batch_augment``: ``order[i, k]`` is the op applied k-th to view i.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop
BLUR_RADIUS_SIGMAS = 3.0  # Gaussian taps kept on each side, in sigmas (capped by the recipe's kernel)

_LUMA = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
_ONES = np.ones(3)


@dataclass(frozen=True)
class ViewParams:
    """Arguments of ``augment_view`` for one view of a batch of n images (numpy, host).

    - ``roi_start``, ``roi_end``: float32 [n, 2], crop corners (top, left) and
      (bottom, right) in input pixels;
    - ``color``: float32 [n, 3, 3], RGB matrix of jitter and grayscale;
    - ``offset``: float32 [n, 3, 3], maps the crop's mean RGB (0..255) to the
      additive term of the colour transform (contrast's pull towards the mean);
    - ``blur_window``: int32 [n], odd kernel taps (1: no blur);
    - ``blur_sigma``: float32 [n], pixels;
    - ``flip``: int32 [n], 1 to mirror left-right.
    """

    roi_start: np.ndarray
    roi_end: np.ndarray
    color: np.ndarray
    offset: np.ndarray
    blur_window: np.ndarray
    blur_sigma: np.ndarray
    flip: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.flip)
        shapes = {"roi_start": (n, 2), "roi_end": (n, 2), "color": (n, 3, 3), "offset": (n, 3, 3),
                  "blur_window": (n,), "blur_sigma": (n,), "flip": (n,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"ViewParams.{name} must have shape {shape}, got {getattr(self, name).shape}")

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        """The arrays in ``VIEW_FIELDS`` order, C-contiguous, with the dtypes DALI expects."""
        dtypes = (np.float32, np.float32, np.float32, np.float32, np.int32, np.float32, np.int32)
        return tuple(np.ascontiguousarray(getattr(self, name), dtype=dtype) for name, dtype in zip(VIEW_FIELDS, dtypes))


VIEW_FIELDS = tuple(f.name for f in fields(ViewParams))


# ---------------------------------------------------------------------------
# Host side: parameters
# ---------------------------------------------------------------------------


def random_resized_crop(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` for n images at once.

    Returns int64 [n, 4] rows ``(top, left, height, width)`` in pixels: up to
    10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio (width / height) in ``ratio``, the first that fits placed uniformly;
    otherwise the largest centred crop with its ratio clamped to ``ratio``.
    """
    h_img = np.asarray(heights, dtype=np.float64)
    w_img = np.asarray(widths, dtype=np.float64)
    n = len(h_img)
    area = (h_img * w_img)[:, None] * rng.uniform(scale[0], scale[1], (n, CROP_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, CROP_ATTEMPTS)))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = fits.argmax(axis=1)
    found = fits.any(axis=1)
    rows = np.arange(n)
    # Fallback: whole image, ratio clamped to the range (torchvision rounds the clamped side).
    in_ratio = w_img / h_img
    fw = np.where(in_ratio > ratio[1], np.round(h_img * ratio[1]), w_img)
    fh = np.where(in_ratio < ratio[0], np.round(w_img / ratio[0]), h_img)
    ch = np.where(found, h[rows, first], fh)
    cw = np.where(found, w[rows, first], fw)
    u = rng.random((n, 2))
    top = np.where(found, np.floor(u[:, 0] * (h_img - ch + 1)), (h_img - ch) // 2)
    left = np.where(found, np.floor(u[:, 1] * (w_img - cw + 1)), (w_img - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


def hue_rotation(shift: np.ndarray) -> np.ndarray:
    """[n, 3, 3] rotations of RGB about the grey axis by ``shift`` turns (fraction of the circle).

    Rotating by +1/3 turn maps red to green and green to blue, as a hue shift
    of +1/3 does in HSV; grey stays grey.
    """
    theta = 2.0 * np.pi * np.asarray(shift, dtype=np.float64)
    k = _ONES / np.sqrt(3.0)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return (np.eye(3) + np.sin(theta)[:, None, None] * cross
            + (1.0 - np.cos(theta))[:, None, None] * (cross @ cross))


def color_transform(brightness: np.ndarray, contrast: np.ndarray, saturation: np.ndarray, hue: np.ndarray,
                    order: np.ndarray, grayscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compose jitter (in ``order``) then grayscale into ``out = color @ x + offset @ mean(x)``.

    ``x`` is a pixel's RGB and ``mean(x)`` the crop's mean RGB, both before
    any op. The running map is ``x -> A x + K mean(x)``; each op updates
    (A, K): brightness scales both; contrast blends with the current mean
    luma ``w . (A + K) mean``; saturation and grayscale blend with the pixel's
    luma ``w . x`` (matrix ``s I + (1 - s) 1 w^T``); hue rotates about grey.
    Factors equal to 1 (hue 0) leave (A, K) exactly unchanged.
    """
    n = len(brightness)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    luma_blend = np.outer(_ONES, _LUMA)  # x -> (w . x) 1
    a = eye.copy()
    k = np.zeros((n, 3, 3))
    rotation = hue_rotation(hue)
    b = np.asarray(brightness, dtype=np.float64)[:, None, None]
    c = np.asarray(contrast, dtype=np.float64)[:, None, None]
    s = np.asarray(saturation, dtype=np.float64)[:, None, None]
    sat = s * eye + (1.0 - s) * luma_blend
    for slot in range(4):
        op = np.asarray(order)[:, slot][:, None, None]
        by_b = (b * a, b * k)
        by_c = (c * a, c * k + (1.0 - c) * (luma_blend @ (a + k)))
        by_s = (sat @ a, sat @ k)
        by_h = (rotation @ a, rotation @ k)
        a = np.select([op == BRIGHTNESS, op == CONTRAST, op == SATURATION], [by_b[0], by_c[0], by_s[0]], by_h[0])
        k = np.select([op == BRIGHTNESS, op == CONTRAST, op == SATURATION], [by_b[1], by_c[1], by_s[1]], by_h[1])
    gray = np.asarray(grayscale, dtype=bool)[:, None, None]
    a = np.where(gray, luma_blend @ a, a)
    k = np.where(gray, luma_blend @ k, k)
    return a, k


def blur_window(sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """Odd taps per sigma: ``2 ceil(BLUR_RADIUS_SIGMAS sigma) + 1`` capped at ``kernel_size``."""
    taps = 2 * np.ceil(BLUR_RADIUS_SIGMAS * np.asarray(sigma, dtype=np.float64)).astype(np.int64) + 1
    return np.minimum(taps, kernel_size)


@dataclass(frozen=True)
class ViewDraws:
    """The random draws behind one batch of views, in torchvision's terms."""

    crop: np.ndarray  # int64 [n, 4] (top, left, height, width)
    flip: np.ndarray  # bool [n]
    jitter: np.ndarray  # bool [n]
    brightness: np.ndarray  # float [n], 1 where not jittered (likewise below)
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray  # fraction of the circle, 0 where not jittered
    order: np.ndarray  # int64 [n, 4], permutation of the jitter op ids
    grayscale: np.ndarray  # bool [n]
    blur: np.ndarray  # bool [n]
    sigma: np.ndarray  # float [n], pixels (drawn for every view, used where blur)


def draw_views(rng: np.random.Generator, sizes: np.ndarray, recipe: SimCLRRecipe) -> ViewDraws:
    """Draw one view's parameters for each image; ``sizes`` is int [n, 2] (height, width)."""
    sizes = np.asarray(sizes)
    n = len(sizes)
    crop = random_resized_crop(rng, sizes[:, 0], sizes[:, 1], recipe.crop_scale, recipe.crop_ratio)
    u = rng.random((n, 5))
    flip, jitter, gray, blur = (u[:, 0] < recipe.flip_prob, u[:, 1] < recipe.jitter_prob,
                                u[:, 2] < recipe.grayscale_prob, u[:, 3] < recipe.blur_prob)

    def factor(spread: float) -> np.ndarray:
        f = rng.uniform(*recipe.factor_range(spread), n)
        return np.where(jitter, f, 1.0)

    brightness, contrast, saturation = factor(recipe.brightness), factor(recipe.contrast), factor(recipe.saturation)
    hue = np.where(jitter, rng.uniform(-recipe.hue, recipe.hue, n), 0.0)
    order = np.argsort(rng.random((n, 4)), axis=1)
    lo, hi = recipe.blur_sigma
    sigma = lo + (hi - lo) * u[:, 4]
    return ViewDraws(crop, flip, jitter, brightness, contrast, saturation, hue, order, gray, blur, sigma)


def view_params(draws: ViewDraws, recipe: SimCLRRecipe) -> ViewParams:
    """Turn draws into the DALI ops' arguments (deterministic)."""
    top, left, h, w = draws.crop.T
    color, offset = color_transform(draws.brightness, draws.contrast, draws.saturation, draws.hue,
                                    draws.order, draws.grayscale)
    window = np.where(draws.blur, blur_window(draws.sigma, recipe.blur_kernel_size), 1)
    return ViewParams(
        roi_start=np.stack([top, left], axis=1), roi_end=np.stack([top + h, left + w], axis=1),
        color=color, offset=offset, blur_window=window, blur_sigma=draws.sigma, flip=draws.flip.astype(np.int32),
    )


def sample_view_params(rng: np.random.Generator, sizes: np.ndarray, recipe: SimCLRRecipe,
                       views: int) -> list[ViewParams]:
    """``views`` independent views of each image (draws in view order from ``rng``)."""
    return [view_params(draw_views(rng, sizes, recipe), recipe) for _ in range(views)]


# ---------------------------------------------------------------------------
# Device side: the DALI graph
# ---------------------------------------------------------------------------


def augment_view(images, params: dict, recipe: SimCLRRecipe, float16: bool, channels_last: bool):
    """One normalised view of decoded uint8 HWC ``images`` (DALI DataNodes, any device).

    ``params`` maps each name of ``VIEW_FIELDS`` to a CPU DataNode (external
    source). Runs where ``images`` live; the mean colour of each crop goes to
    the host (``.cpu()``, a small transfer) because DALI's named arguments
    must be CPU tensors.
    """
    size = [recipe.resolution, recipe.resolution]
    views = fn.resize(images, size=size, roi_start=params["roi_start"], roi_end=params["roi_end"],
                      interp_type=types.INTERP_LINEAR, antialias=True)
    mean_rgb = fn.reductions.mean(views, axes=[0, 1], keep_dims=True)  # float [1, 1, 3]
    if mean_rgb.device == "gpu":
        mean_rgb = mean_rgb.cpu()
    shift = fn.reshape(fn.coord_transform(mean_rgb, M=params["offset"]), shape=[3])
    views = fn.coord_transform(views, M=params["color"], T=shift, dtype=types.UINT8)  # rounds and clamps
    # Float out: a blurred clamped image stays in [0, 255], and skipping the rounding saves ~10 % of the CPU.
    views = fn.gaussian_blur(views, window_size=params["blur_window"], sigma=params["blur_sigma"], dtype=types.FLOAT)
    return fn.crop_mirror_normalize(
        views, mirror=params["flip"],
        mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
        dtype=types.FLOAT16 if float16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW",
    )


@pipeline_def
def simclr_pipeline(source, views: int, recipe: SimCLRRecipe, decoder_device: str, float16: bool,
                    channels_last: bool):
    """Encoded images -> ``views`` augmented views of each, plus the sample ids.

    ``source`` is a batch callback returning ``(encoded images, int64 ids,
    *params)`` with ``len(VIEW_FIELDS)`` parameter arrays per view, in view
    order (see ``dali_backend.StreamFeed``). ``decoder_device`` is ``"mixed"``
    (GPU decode; every later op then runs on the GPU) or ``"cpu"``; nothing
    else differs between the two. Outputs: ``views`` image batches, then ids.
    batch_size, num_threads, device_id and seed are given when it is called.
    """
    jpegs, ids, *flat = fn.external_source(source=source, num_outputs=2 + views * len(VIEW_FIELDS), batch=True)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
    n = len(VIEW_FIELDS)
    outputs = [augment_view(images, dict(zip(VIEW_FIELDS, flat[v * n : (v + 1) * n])), recipe, float16, channels_last)
               for v in range(views)]
    return (*outputs, ids)
