"""The recipe as one DALI graph whose random parameters are the plan's draws.

Two steps, as in ``batched``, so that randomness and maths are tested apart:

1. ``view_params`` turns the planned draws of a batch of views
   (``pipelines.augment.draws.ViewDraws``, from the images' seeds) into the
   arguments of the DALI ops (``ViewParams``);
2. ``augment_view`` is the DALI graph of one view, deterministic given those
   arguments: ROI resize (crop) from the once-decoded image, one affine colour
   transform (jitter and grayscale), Gaussian blur, solarize when the recipe
   has it, then flip + normalise + cast.

Drawing on the host from the plan makes the stream a pure function of
(seed, epoch, step), the same crops as the other backends, and a run resumed
at (epoch, step) sees exactly the views it would have seen, with no DALI
operator state to checkpoint.

Conventions, from torchvision's to DALI's
-----------------------------------------
- Crop: the planned box (torchvision's ``RandomResizedCrop.get_params`` on the
  encoded image's size, ``pipelines.augment.draws``), then
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
- Solarize (only in the graph when the recipe's ``solarize_prob`` > 0): values
  at or above 255 x the drawn threshold become ``255 - v``, on the blurred
  float image.
- Normalisation: ``crop_mirror_normalize`` with mean and std scaled by 255,
  horizontal flip as its ``mirror`` flag, output fp16 or fp32, HWC or CHW.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from pipelines.augment.batched import LUMA_WEIGHTS
from pipelines.augment.colour_plan import BRIGHTNESS, CONTRAST, SATURATION
from pipelines.augment.draws import ViewDraws, draw_views
from pipelines.augment.recipe import SimCLRRecipe, ViewGroup

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
    - ``flip``: int32 [n], 1 to mirror left-right;
    - ``solarize``: int32 [n], 1 to solarize at ``solarize_level`` (float32 [n], 0..255).
    """

    roi_start: np.ndarray
    roi_end: np.ndarray
    color: np.ndarray
    offset: np.ndarray
    blur_window: np.ndarray
    blur_sigma: np.ndarray
    flip: np.ndarray
    solarize: np.ndarray
    solarize_level: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.flip)
        shapes = {"roi_start": (n, 2), "roi_end": (n, 2), "color": (n, 3, 3), "offset": (n, 3, 3),
                  "blur_window": (n,), "blur_sigma": (n,), "flip": (n,), "solarize": (n,), "solarize_level": (n,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"ViewParams.{name} must have shape {shape}, got {getattr(self, name).shape}")

    def as_tuple(self, recipe: SimCLRRecipe) -> tuple[np.ndarray, ...]:
        """The arrays ``view_fields(recipe)`` names, in order, C-contiguous, with the dtypes DALI expects."""
        return tuple(np.ascontiguousarray(getattr(self, name), dtype=_DTYPES[name]) for name in view_fields(recipe))


VIEW_FIELDS = tuple(f.name for f in fields(ViewParams))
_DTYPES = dict(zip(VIEW_FIELDS, (np.float32, np.float32, np.float32, np.float32, np.int32, np.float32, np.int32,
                                 np.int32, np.float32)))


def view_fields(recipe: SimCLRRecipe) -> tuple[str, ...]:
    """The parameters a view of ``recipe`` feeds to the graph: all but solarize's without solarize."""
    return VIEW_FIELDS if recipe.solarize_prob > 0 else VIEW_FIELDS[:-2]


# ---------------------------------------------------------------------------
# Host side: parameters
# ---------------------------------------------------------------------------


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


def view_params(draws: ViewDraws, recipe: SimCLRRecipe) -> ViewParams:
    """Turn planned draws (one view of each of n images) into the DALI ops' arguments."""
    top, left, h, w = draws.crop.T
    j = draws.jitter
    color, offset = color_transform(np.where(j, draws.brightness, 1.0), np.where(j, draws.contrast, 1.0),
                                    np.where(j, draws.saturation, 1.0), np.where(j, draws.hue, 0.0),
                                    draws.order, draws.grayscale)
    window = np.where(draws.blur, blur_window(draws.sigma, recipe.blur_kernel_size), 1)
    return ViewParams(
        roi_start=np.stack([top, left], axis=1), roi_end=np.stack([top + h, left + w], axis=1),
        color=color, offset=offset, blur_window=window, blur_sigma=draws.sigma, flip=draws.flip.astype(np.int32),
        solarize=draws.solarize.astype(np.int32), solarize_level=255.0 * draws.threshold,
    )


def group_view_params(seeds: np.ndarray, sizes: np.ndarray, groups: Sequence[ViewGroup]) -> list[ViewParams]:
    """The arguments of every view of every group, in view order, for images with plan seeds
    ``seeds`` and encoded ``sizes`` (int [n, 2], height and width)."""
    params, first, n = [], 0, len(seeds)
    for group in groups:
        draws = draw_views(seeds, first, group.count, sizes, group.recipe)
        for v in range(group.count):
            rows = slice(v * n, (v + 1) * n)
            params.append(view_params(ViewDraws(*(getattr(draws, f.name)[rows] for f in fields(ViewDraws))),
                                      group.recipe))
        first += group.count
    return params


# ---------------------------------------------------------------------------
# Device side: the DALI graph
# ---------------------------------------------------------------------------


def colour_map(views, params: dict, mean_on_device: bool):
    """``color @ x + offset @ mean(x)`` on uint8 HWC ``views``, rounded and clamped to uint8.

    The crop's mean colour is computed where the views are. On the host it becomes
    ``coord_transform``'s ``T`` argument (one fused pass); DALI's named arguments are CPU
    tensors, so on the GPU (``mean_on_device``) the mean stays there and the term is added by
    arithmetic ops instead of a device-to-host copy per view and iteration. Same values either
    way (``coord_transform`` and ``cast`` round alike)."""
    mean_rgb = fn.reductions.mean(views, axes=[0, 1], keep_dims=True)  # float [1, 1, 3]
    shift = fn.coord_transform(mean_rgb, M=params["offset"])  # [1, 1, 3], where the views are
    if not mean_on_device:
        return fn.coord_transform(views, M=params["color"], T=fn.reshape(shift, shape=[3]), dtype=types.UINT8)
    mapped = fn.coord_transform(views, M=params["color"], dtype=types.FLOAT) + shift  # broadcast per pixel
    return fn.cast(dmath.clamp(mapped, 0.0, 255.0), dtype=types.UINT8)


def augment_view(images, params: dict, recipe: SimCLRRecipe, float16: bool, channels_last: bool,
                 mean_on_device: bool | None = None):
    """One normalised view of decoded uint8 HWC ``images`` (DALI DataNodes, any device).

    ``params`` maps each name of ``view_fields(recipe)`` to a CPU DataNode (external
    source). Runs where ``images`` live; ``mean_on_device`` (default: on the GPU) picks
    ``colour_map``'s route.
    """
    size = [recipe.resolution, recipe.resolution]
    views = fn.resize(images, size=size, roi_start=params["roi_start"], roi_end=params["roi_end"],
                      interp_type=types.INTERP_LINEAR, antialias=True)
    views = colour_map(views, params, views.device == "gpu" if mean_on_device is None else mean_on_device)
    # Float out: a blurred clamped image stays in [0, 255], and skipping the rounding saves ~10 % of the CPU.
    views = fn.gaussian_blur(views, window_size=params["blur_window"], sigma=params["blur_sigma"], dtype=types.FLOAT)
    if recipe.solarize_prob > 0:
        level, on = params["solarize_level"], params["solarize"]
        if views.device == "gpu":
            level, on = level.gpu(), on.gpu()
        views = views + (views >= level) * on * (255.0 - 2.0 * views)
    return fn.crop_mirror_normalize(
        views, mirror=params["flip"],
        mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
        dtype=types.FLOAT16 if float16 else types.FLOAT, output_layout="HWC" if channels_last else "CHW",
    )


def view_recipes(groups: Sequence[ViewGroup]) -> list[SimCLRRecipe]:
    """The recipe of every view, in view order (a group's recipe repeated ``count`` times)."""
    return [g.recipe for g in groups for _ in range(g.count)]


@pipeline_def
def simclr_pipeline(source, recipes: Sequence[SimCLRRecipe], decoder_device: str, float16: bool,
                    channels_last: bool):
    """Encoded images -> one augmented view per entry of ``recipes`` (``view_recipes``), plus the ids.

    Each image is decoded once; every view is cropped from that decode.
    ``source`` is a batch callback returning ``(encoded images, int64 ids,
    *params)`` with the ``view_fields`` parameter arrays of each view, in view
    order (see ``pipelines.backends.dali.StreamFeed``). ``decoder_device`` is
    ``"mixed"`` (GPU decode; every later op then runs on the GPU) or ``"cpu"``;
    nothing else differs between the two. Outputs: one image batch per view,
    then ids. batch_size, num_threads, device_id and seed are given when it is called.
    """
    names = [view_fields(recipe) for recipe in recipes]
    jpegs, ids, *flat = fn.external_source(source=source, num_outputs=2 + sum(map(len, names)), batch=True)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
    outputs, first = [], 0
    for recipe, fields_of_view in zip(recipes, names):
        params = dict(zip(fields_of_view, flat[first : first + len(fields_of_view)]))
        outputs.append(augment_view(images, params, recipe, float16, channels_last))
        first += len(fields_of_view)
    return (*outputs, ids)
