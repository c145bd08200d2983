"""The colour part of the recipe on one uint8 image, compiled with numba: the CPU path of
every backend that colours on the host (torch's workers, FFCV's decoder threads).

``pipelines.augment.batched.BatchColorAugment`` runs jitter, grayscale, blur
and solarize as batched torch ops on the training device. On a GPU that is
right; on a CPU it is the bottleneck (several full passes over the batch per
op, in the training process). ``finish_view`` runs the same recipe on one
image, GIL-free, where the image was just cropped: in a DataLoader worker of
the torch backend, or in an iteration of FFCV's parallel loop.

Per image (``color_augment_image``) the maths is that of
``BatchColorAugment.apply(images, params)`` before its normalisation:
values in [0, 1], float32, the jitter ops in the image's random order with a
clamp after each (brightness scales, contrast blends with the image's mean
luma at that point, saturation with each pixel's luma, hue rotates in
torchvision's HSV hexcone), grayscale as luma on three channels, then a
separable Gaussian blur with ``recipe.blur_kernel_size`` normalised taps and
reflect padding (no edge repeat). It is fused into few passes: the ops before
contrast are pointwise, so one pass applies them and sums the luma; a second
applies contrast, the ops after it and grayscale (each pass works on one row
at a time, held planar so that the loops vectorise); the blur runs vertically
then horizontally one output row at a time through a row buffer and writes
uint8. Without contrast (or with contrast first) one pointwise pass is enough.

Deviations from ``BatchColorAugment``:

- the result is rounded to uint8 once, at the end (``floor(255 v + 0.5)``, i.e.
  round half up), and the loader then only normalises
  (``batched.normalize_only``). The error is at most half a grey level plus
  float rounding; solarize then compares the uint8 value with ``255 t``, so a
  pixel within half a level of the threshold may fall on the other side;
- an op with a neutral value (factor exactly 1, hue shift exactly 0) is
  skipped. For factors this is exact; for hue it is what
  ``BatchColorAugment`` does when the recipe's hue range is 0 (a drawn shift
  of exactly 0 with a non-zero range has probability 0);
- float rounding only: the contrast mean is summed in float32 per row and
  float64 across rows (torch: one float32 reduction), hue uses v s = max - min
  (torch: v * (delta / v)), multiply-adds may fuse, and the blur sums
  vertically first (torch: horizontally first).

The parameters are one view's draws (``pipelines.augment.draws.colour_draw``),
so every backend colours a planned view the same way.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from pipelines.augment.batched import LUMA_WEIGHTS
from pipelines.augment.colour_plan import BRIGHTNESS, CONTRAST, HUE, SATURATION
from pipelines.augment.draws import (C_BLUR, C_BRIGHTNESS, C_CONTRAST, C_FLIP, C_GRAY, C_HUE, C_JITTER, C_ORDER,
                                     C_SATURATION, C_SIGMA, C_SOLARIZE, C_THRESHOLD)

# float32 constants, so that numba keeps the per-pixel maths in float32.
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F4 = np.float32(4.0)
_F6 = np.float32(6.0)
_INV255 = np.float32(1.0 / 255.0)
_F255 = np.float32(255.0)
_HALF = np.float32(0.5)
_LR, _LG, _LB = (np.float32(w) for w in LUMA_WEIGHTS)

# --------------------------------------------------------------------------- row-wise maths
#
# A row is held planar (one float32 array per channel) so that every op is a
# unit-stride loop that LLVM can vectorise; branches are written as selects.
# The jit options allow no reassociation, so sums keep their order; "nnan"
# (there are no NaNs: inputs are finite, divisions are guarded) lets min/max
# vectorise, "contract" lets multiply-adds fuse.

_FAST = {"nnan", "ninf", "nsz", "contract"}


@njit(inline="always", fastmath=_FAST)
def _clamp01(v):
    return min(max(v, _F0), _F1)


@njit(inline="always", fastmath=_FAST)
def _luma(r, g, b):
    return r * _LR + g * _LG + b * _LB


@njit(fastmath=_FAST)
def _load_u8(row, rr, gg, bb):
    for x in range(rr.shape[0]):
        rr[x] = np.float32(row[3 * x]) * _INV255
        gg[x] = np.float32(row[3 * x + 1]) * _INV255
        bb[x] = np.float32(row[3 * x + 2]) * _INV255


@njit(fastmath=_FAST)
def _load_f32(row, rr, gg, bb):
    for x in range(rr.shape[0]):
        rr[x] = row[3 * x]
        gg[x] = row[3 * x + 1]
        bb[x] = row[3 * x + 2]


@njit(inline="always", fastmath=_FAST)
def _to_u8(v):
    return np.uint8(np.int32(min(max(v * _F255 + _HALF, _F0), _F255)))  # round half up, saturating


@njit(fastmath=_FAST)
def _store_u8(rr, gg, bb, row):
    for x in range(rr.shape[0]):
        row[3 * x] = _to_u8(rr[x])
        row[3 * x + 1] = _to_u8(gg[x])
        row[3 * x + 2] = _to_u8(bb[x])


@njit(fastmath=_FAST)
def _store_f32(rr, gg, bb, row):
    for x in range(rr.shape[0]):
        row[3 * x] = rr[x]
        row[3 * x + 1] = gg[x]
        row[3 * x + 2] = bb[x]


@njit(fastmath=_FAST)
def _scale_blend(rr, gg, bb, f, c):
    """clamp(f x + c): brightness (c = 0) and contrast (c = mean luma (1 - f))."""
    for x in range(rr.shape[0]):
        rr[x] = _clamp01(rr[x] * f + c)
        gg[x] = _clamp01(gg[x] * f + c)
        bb[x] = _clamp01(bb[x] * f + c)


@njit(fastmath=_FAST)
def _saturation(rr, gg, bb, f):
    g1 = _F1 - f
    for x in range(rr.shape[0]):
        t = _luma(rr[x], gg[x], bb[x]) * g1
        rr[x] = _clamp01(rr[x] * f + t)
        gg[x] = _clamp01(gg[x] * f + t)
        bb[x] = _clamp01(bb[x] * f + t)


@njit(inline="always", fastmath=_FAST)
def _hue_channel(h6, n, v, vs):
    # torchvision's HSV -> RGB: v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    k = h6 + n
    k = k - _F6 if k >= _F6 else k
    return _clamp01(v - vs * _clamp01(min(k, _F4 - k)))


@njit(fastmath=_FAST)
def _hue(rr, gg, bb, shift6):
    """Rotate the hue by ``shift6`` sixths of the circle (|shift6| <= 3), as adjust_hue.

    Grey pixels (max == min) have v s = 0 and come back unchanged, as in
    torchvision (hue 0, saturation 0)."""
    for x in range(rr.shape[0]):
        r, g, b = rr[x], gg[x], bb[x]
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        delta = maxc - minc
        inv = _F1 / (delta if delta > _F0 else _F1)
        # red wins ties, then green (as torchvision)
        h6 = (g - b) * inv if maxc == r else ((b - r) * inv + _F2 if maxc == g else (r - g) * inv + _F4)
        h6 += shift6  # in [-4, 8)
        h6 = h6 + _F6 if h6 < _F0 else h6
        h6 = h6 - _F6 if h6 >= _F6 else h6
        rr[x] = _hue_channel(h6, np.float32(5.0), maxc, delta)
        gg[x] = _hue_channel(h6, np.float32(3.0), maxc, delta)
        bb[x] = _hue_channel(h6, _F1, maxc, delta)


@njit(fastmath=_FAST)
def _grayscale(rr, gg, bb):
    for x in range(rr.shape[0]):
        v = _luma(rr[x], gg[x], bb[x])
        rr[x] = v
        gg[x] = v
        bb[x] = v


@njit
def _luma_sum(rr, gg, bb):
    s = _F0  # float32 within a row (rows are summed in float64 by the caller)
    for x in range(rr.shape[0]):
        s += _luma(rr[x], gg[x], bb[x])
    return s


@njit
def _jitter_ops(rr, gg, bb, seq, start, stop, fb, fs, shift6, fc, c_term):
    """Apply the jitter ops ``seq[start:stop]`` to one planar row."""
    for k in range(start, stop):
        op = seq[k]
        if op == BRIGHTNESS:
            _scale_blend(rr, gg, bb, fb, _F0)
        elif op == CONTRAST:
            _scale_blend(rr, gg, bb, fc, c_term)
        elif op == SATURATION:
            _saturation(rr, gg, bb, fs)
        else:
            _hue(rr, gg, bb, shift6)


@njit(inline="always")
def _reflect(i, n):
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@njit
def gaussian_taps(sigma, kernel_size):
    """Normalised 1-D Gaussian taps (float32), as ``colour_plan.gaussian_taps``."""
    radius = kernel_size // 2
    taps = np.empty(kernel_size, np.float32)
    s = np.float32(sigma)
    denom = _F2 * s * s
    total = _F0
    for k in range(kernel_size):
        t = np.float32(k - radius)
        taps[k] = np.exp(-(t * t) / denom)
        total += taps[k]
    for k in range(kernel_size):
        taps[k] /= total
    return taps


@njit
def _copy(y, x):
    for j in range(y.shape[0]):
        y[j] = x[j]


@njit(fastmath=_FAST)
def _axpy(y, a, x):
    for j in range(y.shape[0]):
        y[j] += a * x[j]


@njit(fastmath=_FAST)
def _scale(y, a, x):
    for j in range(y.shape[0]):
        y[j] = a * x[j]


@njit(fastmath=_FAST)
def _blur_to_u8(img, dst, taps):
    """Separable blur of float32 ``img`` [H, W, 3] with reflect padding, into uint8 ``dst``."""
    h, w = img.shape[0], img.shape[1]
    kernel_size = taps.shape[0]
    radius = kernel_size // 2
    ww = 3 * w
    off = 3 * radius
    rows = img.reshape(h, ww)
    out_rows = dst.reshape(h, ww)
    padded = np.empty(ww + 2 * off, np.float32)  # one vertically blurred row, reflect-padded by radius pixels
    middle = padded[off : off + ww]
    acc = np.empty(ww, np.float32)
    for y in range(h):
        # vertical taps into the middle of ``padded``
        _scale(middle, taps[0], rows[_reflect(y - radius, h)])
        for k in range(1, kernel_size):
            _axpy(middle, taps[k], rows[_reflect(y + k - radius, h)])
        # reflect padding: pixel -p is pixel p, pixel w-1+p is pixel w-1-p
        for p in range(1, radius + 1):
            for c in range(3):
                padded[off - 3 * p + c] = padded[off + 3 * p + c]
                padded[off + 3 * (w - 1 + p) + c] = padded[off + 3 * (w - 1 - p) + c]
        # horizontal taps, 3 floats (one pixel) apart
        _scale(acc, taps[0], padded[0:ww])
        for k in range(1, kernel_size):
            _axpy(acc, taps[k], padded[3 * k : 3 * k + ww])
        out = out_rows[y]
        for j in range(ww):
            out[j] = _to_u8(acc[j])


# --------------------------------------------------------------------------- one image


@njit
def color_augment_image(src, dst, jitter, brightness, contrast, saturation, hue, order, gray, blur, sigma,
                        kernel_size):
    """The SimCLR colour recipe on one uint8 [H, W, 3] image ``src``, into uint8 ``dst``.

    Parameters as one sample of ``colour_plan.ColorAugParams``: ``jitter``,
    ``gray`` and ``blur`` switch the ops on; ``brightness``, ``contrast``,
    ``saturation`` are blend factors (1: op skipped), ``hue`` a shift in
    fractions of the circle (0: skipped); ``order`` (4 ints) the op ids in the
    order they apply; ``sigma`` the blur's standard deviation in pixels,
    ``kernel_size`` (odd, radius < H and W) its number of taps. ``dst`` may be
    ``src``. See the module docstring for the semantics.
    """
    fb = np.float32(brightness)
    fc = np.float32(contrast)
    fs = np.float32(saturation)
    shift6 = np.float32(6.0 * hue)
    # the jitter ops that change something, in this image's order; cpos: where contrast is
    seq = np.empty(4, np.int64)
    n = 0
    cpos = -1
    if jitter:
        for k in range(4):
            op = order[k]
            if ((op == BRIGHTNESS and fb != _F1) or (op == SATURATION and fs != _F1)
                    or (op == HUE and shift6 != _F0) or (op == CONTRAST and fc != _F1)):
                if op == CONTRAST:
                    cpos = n
                seq[n] = op
                n += 1
    h, w = src.shape[0], src.shape[1]
    src_rows = src.reshape(h, 3 * w)
    dst_rows = dst.reshape(h, 3 * w)
    if n == 0 and not gray and not blur:
        for y in range(h):
            _copy(dst_rows[y], src_rows[y])
        return
    img = np.empty((h, 3 * w), np.float32)  # the float image between passes / before the blur
    rr = np.empty(w, np.float32)
    gg = np.empty(w, np.float32)
    bb = np.empty(w, np.float32)
    c_term = _F0
    first = 0  # first op of the last pass
    if cpos >= 0:
        # the ops before contrast (if any) and the mean luma they leave
        total = 0.0
        for y in range(h):
            _load_u8(src_rows[y], rr, gg, bb)
            _jitter_ops(rr, gg, bb, seq, 0, cpos, fb, fs, shift6, fc, _F0)
            total += _luma_sum(rr, gg, bb)
            if cpos > 0:
                _store_f32(rr, gg, bb, img[y])
        c_term = np.float32(total / (h * w)) * (_F1 - fc)
        first = cpos
    # the remaining ops and grayscale, from the input (or from the first pass's output)
    for y in range(h):
        if first == 0:
            _load_u8(src_rows[y], rr, gg, bb)
        else:
            _load_f32(img[y], rr, gg, bb)
        _jitter_ops(rr, gg, bb, seq, first, n, fb, fs, shift6, fc, c_term)
        if gray:
            _grayscale(rr, gg, bb)
        if blur:
            _store_f32(rr, gg, bb, img[y])
        else:
            _store_u8(rr, gg, bb, dst_rows[y])
    if blur:
        _blur_to_u8(img.reshape(h, w, 3), dst, gaussian_taps(sigma, kernel_size))


# --------------------------------------------------------------------------- one view


@njit(cache=True)
def hflip(img):
    """Mirror uint8 [H, W, 3] ``img`` left-right, in place."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w // 2):
            for c in range(3):
                img[y, x, c], img[y, w - 1 - x, c] = img[y, w - 1 - x, c], img[y, x, c]


@njit(cache=True)
def solarize(img, threshold):
    """Invert (``255 - v``) the values of uint8 ``img`` at or above ``255 * threshold``, in place."""
    flat = img.reshape(-1)
    level = 255.0 * threshold
    for j in range(flat.shape[0]):
        if flat[j] >= level:
            flat[j] = np.uint8(255 - flat[j])


@njit(cache=True)
def finish_view(img, c, kernel_size, colour):
    """One cropped view, uint8 [H, W, 3], in place: the flip of its draws ``c``
    (``draws.colour_draw``'s slots) and, with ``colour``, the jitter, grayscale, blur
    (``kernel_size`` taps) and solarize of the recipe. Without ``colour`` (that stage runs on
    the training device) only the flip."""
    if c[C_FLIP] > 0.5:
        hflip(img)
    if not colour:
        return
    order = np.empty(4, np.int64)
    for k in range(4):
        order[k] = np.int64(c[C_ORDER + k])
    color_augment_image(img, img, c[C_JITTER] > 0.5, c[C_BRIGHTNESS], c[C_CONTRAST], c[C_SATURATION], c[C_HUE],
                        order, c[C_GRAY] > 0.5, c[C_BLUR] > 0.5, c[C_SIGMA], kernel_size)
    if c[C_SOLARIZE] > 0.5:
        solarize(img, c[C_THRESHOLD])


# --------------------------------------------------------------------------- normalisation on the host


@njit(cache=True, fastmath=_FAST)
def _normalize_u8(src, dst, lut):
    """dst[j] = lut[j % 3, src[j]] over flat HWC-interleaved arrays: one pass, no float maths."""
    n = src.shape[0] // 3
    for p in range(n):
        dst[3 * p] = lut[0, src[3 * p]]
        dst[3 * p + 1] = lut[1, src[3 * p + 1]]
        dst[3 * p + 2] = lut[2, src[3 * p + 2]]


def normalize_on_host(images, mean, std):
    """uint8 views ``[n, r, r, 3]`` (a CPU torch tensor, contiguous) -> float32 ``(v / 255 - mean) / std``
    as ``[n, 3, r, r]`` with channels-last strides, in one pass through a per-channel table: the
    CPU path's normalisation (torch's ops make four passes over a float copy, 10x slower on 2 cores)."""
    import torch

    x = images.contiguous()
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = ((levels[None, :] - np.asarray(mean)[:, None]) / np.asarray(std)[:, None]).astype(np.float32)
    out = torch.empty(x.shape, dtype=torch.float32)
    _normalize_u8(x.numpy().reshape(-1), out.numpy().reshape(-1), lut)
    return out.permute(0, 3, 1, 2)
