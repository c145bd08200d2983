"""The colour part of the SimCLR recipe as batched torch ops on the device.

Used by the FFCV backend (FFCV decodes and random-resized-crops on the CPU and
moves uint8 images to the device) and by any backend without its own colour
ops. Every sample gets its own random parameters; there is no Python loop
over samples and no host-device synchronisation.

Two steps, so that the randomness can be tested apart from the maths:

1. ``BatchColorAugment.sample_params`` draws all per-sample parameters into a
   ``ColorAugParams`` with one ``torch.rand`` call on the images' device;
2. ``BatchColorAugment.apply`` is deterministic given those parameters.

Order and conventions follow torchvision's SimCLR pipeline
(``RandomHorizontalFlip``, ``RandomApply([ColorJitter])``, ``RandomGrayscale``,
``RandomApply([GaussianBlur])``, ``Normalize``) and the float kernels of
``torchvision.transforms.v2.functional``: pixel values in [0, 1], clamped after
every jitter op, hue as a fraction of the colour circle, blur sigma in pixels,
reflect padding. uint8 input is divided by 255 first and all maths runs in
float32 (torchvision's PIL/uint8 path rounds to 8 bits after every op; this
path does not). The output is cast to the requested dtype only at the end.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.augment.recipe import SimCLRRecipe

# Luma weights of torchvision's tensor ``rgb_to_grayscale`` (ITU-R 601-2; its
# red weight is 0.2989, not 0.299).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

# Jitter op ids, as stored in ``ColorAugParams.order``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Columns of the single uniform draw made by ``sample_params``.
_N_UNIFORMS = 15  # flip, jitter, 4 factors, 4 order keys, gray, blur, sigma, solarize, threshold


@dataclass(frozen=True)
class ColorAugParams:
    """Per-sample parameters of one batch; every field has length B on dim 0.

    - ``flip``, ``jitter``, ``grayscale``, ``blur``: bool [B], whether the op
      is applied to that sample;
    - ``brightness``, ``contrast``, ``saturation``: float32 [B], torchvision
      blend factors (1 = unchanged), used only where ``jitter`` is set;
    - ``hue``: float32 [B], hue shift as a fraction of the circle, in
      [-0.5, 0.5], used only where ``jitter`` is set;
    - ``order``: int64 [B, 4], a permutation of the op ids
      (``BRIGHTNESS, CONTRAST, SATURATION, HUE``): ``order[i, k]`` is the op
      applied ``k``-th to sample ``i``;
    - ``sigma``: float32 [B], Gaussian blur standard deviation in pixels, used
      only where ``blur`` is set;
    - ``solarize``: bool [B], and ``threshold``: float32 [B] on [0, 1] pixel
      values: where set, values at or above the threshold become ``1 - v``.
    """

    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor
    threshold: Tensor

    def __post_init__(self) -> None:
        b = self.flip.shape[0]
        for name in ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma",
                     "solarize", "threshold"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"ColorAugParams.{name} must have shape ({b},), got {tuple(getattr(self, name).shape)}")
        if self.order.shape != (b, 4):
            raise ValueError(f"ColorAugParams.order must have shape ({b}, 4), got {tuple(self.order.shape)}")

    @property
    def batch_size(self) -> int:
        return self.flip.shape[0]

    @classmethod
    def from_draws(cls, draws, device: torch.device | str, flip: bool = True) -> ColorAugParams:
        """The parameters of planned views (``pipelines.augment.draws.ViewDraws``) on ``device``;
        ``flip=False``: the flip was done where the views were cropped."""

        def put(a, dtype):
            return torch.as_tensor(a).to(device=device, dtype=dtype, non_blocking=True)

        return cls(flip=put(draws.flip & flip, torch.bool), jitter=put(draws.jitter, torch.bool),
                   brightness=put(draws.brightness, torch.float32), contrast=put(draws.contrast, torch.float32),
                   saturation=put(draws.saturation, torch.float32), hue=put(draws.hue, torch.float32),
                   order=put(draws.order, torch.int64), grayscale=put(draws.grayscale, torch.bool),
                   blur=put(draws.blur, torch.bool), sigma=put(draws.sigma, torch.float32),
                   solarize=put(draws.solarize, torch.bool), threshold=put(draws.threshold, torch.float32))


# ---------------------------------------------------------------------------
# Batched ops. ``x`` is float [B, 3, H, W] with values in [0, 1]; per-sample
# parameters are [B] tensors on x's device.
# ---------------------------------------------------------------------------


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] (0..255) or float in [0, 1] -> float32 in [0, 1], channels-last."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32).div_(255.0)
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return x.contiguous(memory_format=torch.channels_last)


def _per_sample(v: Tensor) -> Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """Luma [B, 1, H, W] with torchvision's weights ``LUMA_WEIGHTS``."""
    r, g, b = x.unbind(dim=1)
    return (r * LUMA_WEIGHTS[0] + g * LUMA_WEIGHTS[1] + b * LUMA_WEIGHTS[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """clamp(factor * x + (1 - factor) * other, 0, 1); factor 1 returns x exactly."""
    f = _per_sample(factor)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale by ``factor`` [B] (>= 0) and clamp, like torchvision's adjust_brightness."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with each sample's mean luma (a scalar per image), like torchvision."""
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with each pixel's luma, like torchvision's adjust_saturation."""
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` [B] (fraction of the circle) in HSV space.

    Same HSV model as torchvision's adjust_hue (hexcone, value = max channel);
    grey pixels (max == min) keep hue 0 and so stay grey.
    """
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    safe_max = torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    sat = delta / safe_max
    # Hue in sixths of the circle; red wins ties, then green (as torchvision).
    h_r = (g - b) / safe_delta
    h_g = (b - r) / safe_delta + 2.0
    h_b = (r - g) / safe_delta + 4.0
    h6 = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h6 = torch.where(grey, torch.zeros_like(h6), h6)
    h6 = torch.remainder(h6 + 6.0 * shift.to(torch.float32).view(-1, 1, 1), 6.0)
    # HSV -> RGB: channel n in (5, 3, 1) for (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + h6) mod 6.
    vs = maxc * sat
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1).clamp_(0.0, 1.0)


def grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace samples where ``mask`` [B] is set by their luma, repeated on 3 channels."""
    return torch.where(mask.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)


def solarize(x: Tensor, mask: Tensor, threshold: Tensor) -> Tensor:
    """Where ``mask`` [B] is set, values at or above the sample's ``threshold`` become ``1 - v``
    (torchvision's ``solarize`` on [0, 1] images)."""
    hit = mask.view(-1, 1, 1, 1) & (x >= threshold.to(x.dtype).view(-1, 1, 1, 1))
    return torch.where(hit, 1.0 - x, x)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the samples where ``mask`` [B] is set."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian taps [B, kernel_size] for per-sample ``sigma`` [B] (pixels)."""
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.to(torch.float32).view(-1, 1)
    w = torch.exp(-(taps**2) / (2.0 * s * s))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, mask: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` [B] (pixels), reflect padding.

    Matches torchvision's gaussian_blur with ``kernel_size`` (odd) and
    ``sigma`` equal on both axes. Samples where ``mask`` is False get a delta
    kernel, which leaves them exactly unchanged. Implemented as two grouped
    convolutions over the batch folded into channels ([1, B*3, H, W]).
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    bsz, c, h, w = x.shape
    radius = kernel_size // 2
    if radius >= min(h, w):
        raise ValueError(f"blur kernel {kernel_size} needs images larger than {radius} pixels, got {h}x{w}")
    kernels = gaussian_kernels(sigma, kernel_size)
    if mask is not None:
        delta = torch.zeros_like(kernels)
        delta[:, radius] = 1.0
        kernels = torch.where(mask.view(-1, 1), kernels, delta)
    weight = kernels.repeat_interleave(c, dim=0)  # [B*3, K], one kernel per (sample, channel)
    y = F.pad(x.reshape(1, bsz * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weight.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    y = F.conv2d(y, weight.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    return y.view(bsz, c, h, w)


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, ...], device: torch.device) -> Tensor:
    """``values`` as a [1, 3, 1, 1] float32 tensor on ``device``, made once: building it from a
    list every call is a blocking host-to-device copy, twice per step on a GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


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

    Cost note: with a per-sample op order, each of the four jitter positions
    evaluates every enabled op on the whole batch and keeps it only where the
    sample's order puts that op there (brightness, contrast and saturation use
    a neutral factor of 1 elsewhere, which is exact; hue uses ``torch.where``).
    Ops whose recipe range is 0 are skipped altogether.
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

    def apply(self, images: Tensor, params: ColorAugParams) -> Tensor:
        """Augment ``images`` (uint8 or float in [0, 1], [B,3,H,W]) with fixed ``params``."""
        if params.batch_size != images.shape[0]:
            raise ValueError(f"params are for {params.batch_size} samples, images have {images.shape[0]}")
        x = to_unit_float(images)
        x = hflip(x, params.flip)
        if x.device.type == "cpu":
            x = self._jitter_on_subsets(x, params)
        else:
            x = self._jitter(x, params)
        x = grayscale(x, params.grayscale)
        if self.recipe.blur_prob > 0:
            if x.device.type == "cpu":
                idx = params.blur.nonzero().flatten()
                if idx.numel():
                    x[idx] = gaussian_blur(x[idx], params.sigma[idx], self.recipe.blur_kernel_size)
            else:
                x = gaussian_blur(x, params.sigma, self.recipe.blur_kernel_size, mask=params.blur)
        if self.recipe.solarize_prob > 0:
            x = solarize(x, params.solarize, params.threshold)
        return normalize(x, self.recipe.mean, self.recipe.std, self.dtype)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw fresh per-sample parameters from ``generator`` and apply them."""
        return self.apply(images, self.sample_params(images.shape[0], generator, images.device))

    def _jitter_on_subsets(self, x: Tensor, p: ColorAugParams) -> Tensor:
        """CPU path, same result as ``_jitter``: each op runs only on the samples
        that have it at this position (4 passes per jittered sample instead of
        16 over the whole batch). Index selection needs a host sync, free on CPU
        but a stall on CUDA, where ``_jitter``'s masked full-batch ops are used."""
        factors = {BRIGHTNESS: (adjust_brightness, p.brightness), CONTRAST: (adjust_contrast, p.contrast),
                   SATURATION: (adjust_saturation, p.saturation), HUE: (adjust_hue, p.hue)}
        for pos in range(4):
            at_pos = p.order[:, pos]
            for op in self._jitter_ops:
                idx = (p.jitter & (at_pos == op)).nonzero().flatten()
                if idx.numel():
                    fn, value = factors[op]
                    x[idx] = fn(x[idx], value[idx])
        return x

    def _jitter(self, x: Tensor, p: ColorAugParams) -> Tensor:
        one = torch.ones_like(p.brightness)
        for pos in range(4):
            at_pos = p.order[:, pos]
            for op in self._jitter_ops:
                sel = p.jitter & (at_pos == op)
                if op == BRIGHTNESS:
                    x = adjust_brightness(x, torch.where(sel, p.brightness, one))
                elif op == CONTRAST:
                    x = adjust_contrast(x, torch.where(sel, p.contrast, one))
                elif op == SATURATION:
                    x = adjust_saturation(x, torch.where(sel, p.saturation, one))
                else:
                    x = torch.where(sel.view(-1, 1, 1, 1), adjust_hue(x, p.hue), x)
        return x
