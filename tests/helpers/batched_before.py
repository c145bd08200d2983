"""``BatchColorAugment.apply`` as it was before its ops were cut to the samples drawn (commit
5b030aa): every jitter op at all four positions on the whole batch, kept where the sample's
order puts it (``masked``, its CUDA path), or run on the samples with that op at that position
(its CPU path); flip and blur masked over the whole batch. The reference the rewrite is held to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.augment.batched import LUMA_WEIGHTS, normalize, to_unit_float
from pipelines.augment.colour_plan import BRIGHTNESS, CONTRAST, SATURATION, ColorAugParams
from pipelines.augment.recipe import SimCLRRecipe


def _per_sample(v: Tensor) -> Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (r * LUMA_WEIGHTS[0] + g * LUMA_WEIGHTS[1] + b * LUMA_WEIGHTS[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    safe_max = torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    sat = delta / safe_max
    h_r = (g - b) / safe_delta
    h_g = (b - r) / safe_delta + 2.0
    h_b = (r - g) / safe_delta + 4.0
    h6 = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h6 = torch.where(grey, torch.zeros_like(h6), h6)
    h6 = torch.remainder(h6 + 6.0 * shift.to(torch.float32).view(-1, 1, 1), 6.0)
    vs = maxc * sat
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.to(torch.float32).view(-1, 1)
    w = torch.exp(-(taps**2) / (2.0 * s * s))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, mask: Tensor | None = None) -> Tensor:
    bsz, c, h, w = x.shape
    radius = kernel_size // 2
    kernels = gaussian_kernels(sigma, kernel_size)
    if mask is not None:
        delta = torch.zeros_like(kernels)
        delta[:, radius] = 1.0
        kernels = torch.where(mask.view(-1, 1), kernels, delta)
    weight = kernels.repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, bsz * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weight.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    y = F.conv2d(y, weight.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    return y.view(bsz, c, h, w)


def _jitter_masked(x: Tensor, p: ColorAugParams, ops: tuple[int, ...]) -> Tensor:
    one = torch.ones_like(p.brightness)
    for pos in range(4):
        at_pos = p.order[:, pos]
        for op in ops:
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


def _jitter_on_subsets(x: Tensor, p: ColorAugParams, ops: tuple[int, ...]) -> Tensor:
    fns = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    values = (p.brightness, p.contrast, p.saturation, p.hue)
    for pos in range(4):
        for op in ops:
            idx = (p.jitter & (p.order[:, pos] == op)).nonzero().flatten()
            if idx.numel():
                x[idx] = fns[op](x[idx], values[op][idx])
    return x


def reference_apply(recipe: SimCLRRecipe, images: Tensor, p: ColorAugParams, masked: bool,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The old ``BatchColorAugment(recipe, dtype=dtype).apply(images, p)`` (flip as ``p.flip`` says),
    on its CUDA path (``masked``) or its CPU path."""
    ranges = (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
    ops = tuple(op for op, r in enumerate(ranges) if r > 0) if recipe.jitter_prob > 0 else ()
    x = to_unit_float(images)
    x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = _jitter_masked(x, p, ops) if masked else _jitter_on_subsets(x, p, ops)
    x = torch.where(p.grayscale.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    if recipe.blur_prob > 0:
        if masked:
            x = gaussian_blur(x, p.sigma, recipe.blur_kernel_size, mask=p.blur)
        else:
            idx = p.blur.nonzero().flatten()
            if idx.numel():
                x[idx] = gaussian_blur(x[idx], p.sigma[idx], recipe.blur_kernel_size)
    if recipe.solarize_prob > 0:
        hit = p.solarize.view(-1, 1, 1, 1) & (x >= p.threshold.to(x.dtype).view(-1, 1, 1, 1))
        x = torch.where(hit, 1.0 - x, x)
    return normalize(x, recipe.mean, recipe.std, dtype)
