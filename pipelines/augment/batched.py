"""The colour part of the SimCLR recipe as batched torch ops on the device.

Used by the FFCV backend (FFCV decodes and random-resized-crops on the CPU and
moves uint8 images to the device) and by any backend without its own colour
ops. Every sample gets its own random parameters; there is no Python loop
over samples and no host-device synchronisation.

Two steps, so that the randomness can be tested apart from the maths:

1. the parameters: ``BatchColorAugment.sample_params`` draws them into a
   ``ColorAugParams`` with one ``torch.rand`` call (the loaders take the plan's
   draws, ``pipelines.augment.draws``); ``BatchColorAugment.plan`` turns them, on the
   host, into a ``colour_plan.ColourPlan`` on the device, in one copy;
2. ``BatchColorAugment.apply`` is deterministic given those parameters.

Order and conventions follow torchvision's SimCLR pipeline
(``RandomHorizontalFlip``, ``RandomApply([ColorJitter])``, ``RandomGrayscale``,
``RandomApply([GaussianBlur])``, ``Normalize``) and the float kernels of
``torchvision.transforms.v2.functional``: pixel values in [0, 1], clamped after
every jitter op, hue as a fraction of the colour circle, blur sigma in pixels,
reflect padding. uint8 input is divided by 255 first and all maths runs in
float32 (torchvision's PIL/uint8 path rounds to 8 bits after every op; this
path does not). The output is cast to the requested dtype only at the end.

Cost: each op runs only on the samples that drew it, which the host knows
(``ColourPlan``): flip, grayscale, blur and solarize on those rows
(``index_select``, the op, ``index_copy_``), hue at each jitter position on the
samples that have it there. Brightness, contrast and saturation at one position
are one blend over the batch (``colour_plan.Blend``), exact for the samples
that have none of them there. Multiply-adds are fused (``addcmul``), so values
differ from separate multiplies and adds by float rounding (below 1e-6).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.augment.colour_plan import Blend, ColorAugParams, ColourPlan, Rows, plan_colour
from pipelines.augment.recipe import SimCLRRecipe

# Luma weights of torchvision's tensor ``rgb_to_grayscale`` (ITU-R 601-2; its
# red weight is 0.2989, not 0.299).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Columns of the single uniform draw made by ``sample_params``.
_N_UNIFORMS = 15  # flip, jitter, 4 factors, 4 order keys, gray, blur, sigma, solarize, threshold


# ---------------------------------------------------------------------------
# Batched ops. ``x`` is float [B, 3, H, W] with values in [0, 1]; per-sample
# parameters are [B] (or [B, 1, 1, 1]) tensors on x's device.
# ---------------------------------------------------------------------------


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] (0..255) or float in [0, 1] -> a new float32 tensor in [0, 1], channels-last."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32).div_(255.0)
    elif images.is_floating_point():
        x = images.to(torch.float32, copy=True)  # the ops below write into it
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return x.contiguous(memory_format=torch.channels_last)


def rgb_to_gray(x: Tensor) -> Tensor:
    """Luma [B, 1, H, W] with torchvision's weights ``LUMA_WEIGHTS``."""
    r, g, b = x.unbind(dim=1)
    luma = torch.addcmul(torch.addcmul(r * LUMA_WEIGHTS[0], g, _scalar(LUMA_WEIGHTS[1], x.device)), b,
                         _scalar(LUMA_WEIGHTS[2], x.device))
    return luma.unsqueeze(1)


def blend(x: Tensor, b: Blend) -> Tensor:
    """One jitter position's brightness, contrast and saturation (``colour_plan.Blend``), each as
    torchvision's ``adjust_*``: ``clamp(f x + (1 - f) other, 0, 1)``."""
    if b.pull is None:
        return (x * b.scale).clamp_(0.0, 1.0)
    other = luma = rgb_to_gray(x)
    if b.contrast:
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        other = mean if b.saturation is None else torch.where(b.saturation, luma, mean)
    return torch.addcmul(other * b.pull, x, b.scale).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` [B] (fraction of the circle) in HSV space.

    Same HSV model as torchvision's adjust_hue (hexcone, value = max channel);
    grey pixels (max == min) keep hue 0 and so stay grey. Written for few kernels: the
    hue of the max channel c (ties: red, then green, as torchvision) is
    ``2 c + (x[c+1] - x[c+2]) / delta`` sixths, taken with one gather; the output
    channels are computed together.
    """
    maxc, argmax = x.max(dim=1, keepdim=True)
    delta = maxc - x.amin(dim=1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny  # 0 -> tiny: grey pixels get 0 / tiny = 0, others are unchanged
    h6 = torch.gather(x.roll(-1, dims=1) - x.roll(1, dims=1), 1, argmax).div_(delta.clamp_min(tiny))
    h6 = h6.add_(argmax, alpha=2).add_(shift.to(torch.float32).view(-1, 1, 1, 1) * 6.0).remainder_(6.0)
    vs = maxc * (delta / maxc.clamp_min(tiny))  # value x saturation
    # HSV -> RGB: channel n in (5, 3, 1) for (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    k = (h6 + _per_channel((5.0, 3.0, 1.0), x.device)).remainder_(6.0)
    return torch.addcmul(maxc, vs, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0)  # in [0, max]


def gaussian_blur(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian blur of every sample with its own normalised taps (``taps`` [3 B, K],
    one row per sample and channel: ``colour_plan.gaussian_taps``), reflect padding; torchvision's
    gaussian_blur with kernel size K and sigma equal on both axes. Two grouped convolutions over
    the batch folded into channels ([1, B*3, H, W])."""
    bsz, c, h, w = x.shape
    kernel_size = taps.shape[1]
    radius = kernel_size // 2
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if radius >= min(h, w):
        raise ValueError(f"blur kernel {kernel_size} needs images larger than {radius} pixels, got {h}x{w}")
    y = F.pad(x.reshape(1, bsz * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, taps.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    y = F.conv2d(y, taps.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    return y.view(bsz, c, h, w)


def _on_rows(x: Tensor, rows: Rows | None, op) -> Tensor:
    """``x`` with ``op(x[rows], values)`` written back into the rows ``rows`` names."""
    if rows is not None:
        x.index_copy_(0, rows.index, op(x.index_select(0, rows.index), rows.values))
    return x


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, ...], device: torch.device) -> Tensor:
    """``values`` as a [1, 3, 1, 1] float32 tensor on ``device``, made once: building it from a
    list every call is a blocking host-to-device copy, twice per step on a GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=16)
def _scalar(value: float, device: torch.device) -> Tensor:
    """``value`` as a 0-d float32 tensor on ``device``, made once (an ``addcmul`` factor)."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> Tensor:
    """(x - mean) / std per channel, cast to ``dtype``, channels-last."""
    y = (x - _per_channel(tuple(mean), x.device)) / _per_channel(tuple(std), x.device)
    return y.to(dtype).contiguous(memory_format=torch.channels_last)


def normalize_only(images: Tensor, recipe: SimCLRRecipe, dtype: torch.dtype = torch.float32) -> Tensor:
    """Evaluation path: uint8/float [B,3,H,W] -> normalised ``dtype``, channels-last."""
    _check_dtype(dtype)
    return normalize(to_unit_float(images), recipe.mean, recipe.std, dtype)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUTPUT_DTYPES}, got {dtype}")


# ---------------------------------------------------------------------------
# The SimCLR colour augmentation.
# ---------------------------------------------------------------------------


class BatchColorAugment:
    """SimCLR flip + colour jitter + grayscale + blur (+ solarize) + normalise, per sample.

    Built from a ``SimCLRRecipe``; ``flip=False`` leaves flipping to a CPU
    stage that already did it (FFCV). Output: ``dtype`` (float32, float16 or
    bfloat16), channels-last, on the input's device; maths runs in float32.
    Ops whose recipe range or probability is 0 are skipped altogether.
    """

    def __init__(self, recipe: SimCLRRecipe, *, flip: bool = True, dtype: torch.dtype = torch.float32) -> None:
        _check_dtype(dtype)
        self.recipe = recipe
        self.flip = flip
        self.dtype = dtype
        ranges = (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        self._jitter_ops = tuple(op for op, r in enumerate(ranges) if r > 0) if recipe.jitter_prob > 0 else ()

    def __repr__(self) -> str:
        return f"BatchColorAugment(recipe={self.recipe!r}, flip={self.flip}, dtype={self.dtype})"

    def sample_params(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> ColorAugParams:
        """Draw every per-sample parameter with one uniform draw from ``generator``.

        ``generator`` must live on ``device`` (None: torch's default generator
        for that device). Factors are uniform in ``recipe.factor_range(x)`` with x
        the recipe's brightness/contrast/saturation; hue uniform in [-h, h];
        sigma uniform in ``recipe.blur_sigma``; ``order`` is a uniformly random
        permutation per sample (argsort of 4 uniforms); solarize with
        ``recipe.solarize_prob``, its threshold uniform in ``recipe.solarize_threshold``.
        """
        r = self.recipe
        device = torch.device("cpu") if device is None else torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, images on {device}")
        u = torch.rand(batch_size, _N_UNIFORMS, generator=generator, device=device)

        def uniform(col: int, lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * u[:, col]

        flip_prob = r.flip_prob if self.flip else 0.0
        return ColorAugParams(
            flip=u[:, 0] < flip_prob,
            jitter=u[:, 1] < r.jitter_prob,
            brightness=uniform(2, *r.factor_range(r.brightness)),
            contrast=uniform(3, *r.factor_range(r.contrast)),
            saturation=uniform(4, *r.factor_range(r.saturation)),
            hue=uniform(5, -r.hue, r.hue),
            order=u[:, 6:10].argsort(dim=1),
            grayscale=u[:, 10] < r.grayscale_prob,
            blur=u[:, 11] < r.blur_prob,
            sigma=uniform(12, r.blur_sigma[0], r.blur_sigma[1]),
            solarize=u[:, 13] < r.solarize_prob,
            threshold=uniform(14, *r.solarize_threshold),
        )

    def plan(self, draws, device: torch.device | str) -> ColourPlan:
        """The ``ColourPlan`` of ``draws`` (a ``ColorAugParams``, or the plan's ``ViewDraws``: numpy
        on the host, no sync; parameters on a GPU are read back first, a sync) on ``device``."""
        r = self.recipe
        return plan_colour(draws, self._jitter_ops, self.flip, r.blur_kernel_size if r.blur_prob > 0 else None,
                           r.solarize_prob > 0, device)

    def apply(self, images: Tensor, params: ColorAugParams | ColourPlan) -> Tensor:
        """Augment ``images`` (uint8 or float in [0, 1], [B,3,H,W]) with fixed ``params``."""
        plan = params if isinstance(params, ColourPlan) else self.plan(params, images.device)
        if plan.batch_size != images.shape[0]:
            raise ValueError(f"params are for {plan.batch_size} samples, images have {images.shape[0]}")
        x = _on_rows(to_unit_float(images), plan.flip, lambda v, _: v.flip(-1))
        for b, hue in zip(plan.blends, plan.hues):  # one jitter position after the other
            x = x if b is None else blend(x, b)
            x = _on_rows(x, hue, adjust_hue)
        x = _on_rows(x, plan.grayscale, lambda v, _: rgb_to_gray(v).expand_as(v))
        x = _on_rows(x, plan.blur, gaussian_blur)
        x = _on_rows(x, plan.solarize, lambda v, t: torch.where(v >= t, 1.0 - v, v))
        return normalize(x, self.recipe.mean, self.recipe.std, self.dtype)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw fresh per-sample parameters from ``generator`` (on its device; None: the CPU's
        default) and apply them, planned on the host as the loaders do."""
        device = generator.device if generator is not None else torch.device("cpu")
        params = self.sample_params(images.shape[0], generator, device)
        return self.apply(images, self.plan(params, images.device))
