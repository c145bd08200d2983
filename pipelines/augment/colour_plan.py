"""A batch's colour draws, and the plan the device stage (``batched.BatchColorAugment``) runs.

``ColorAugParams`` holds every sample's parameters. ``plan_colour`` turns them, on the host,
into a ``ColourPlan``: which samples each op touches and the values it needs there, sent to the
device in one host-to-device copy from pinned memory. Knowing the samples on the host lets the
device run each op only where it was drawn (a flip on the flipped samples, hue at its drawn
position on the samples that have it there, a blur on the blurred ones) with no host-device
synchronisation: no mask has to be read back to find them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

# Jitter op ids, as stored in ``ColorAugParams.order``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
JITTER_POSITIONS = 4


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
        for name in PER_SAMPLE_FIELDS:
            if getattr(self, name).shape != (b,):
                raise ValueError(f"ColorAugParams.{name} must have shape ({b},), got {tuple(getattr(self, name).shape)}")
        if self.order.shape != (b, 4):
            raise ValueError(f"ColorAugParams.order must have shape ({b}, 4), got {tuple(self.order.shape)}")

    @property
    def batch_size(self) -> int:
        return self.flip.shape[0]

    @classmethod
    def from_draws(cls, draws, device: torch.device | str, flip: bool = True) -> ColorAugParams:
        """The parameters of planned views (``pipelines.augment.draws.ViewDraws``) as tensors on
        ``device``; ``flip=False``: the flip was done where the views were cropped. (The loaders
        send ``plan_colour``'s plan instead: one copy, and no read-back to plan on the host.)"""

        def put(a, dtype):
            return torch.as_tensor(a).to(device=device, dtype=dtype, non_blocking=True)

        return cls(flip=put(draws.flip & flip, torch.bool), jitter=put(draws.jitter, torch.bool),
                   brightness=put(draws.brightness, torch.float32), contrast=put(draws.contrast, torch.float32),
                   saturation=put(draws.saturation, torch.float32), hue=put(draws.hue, torch.float32),
                   order=put(draws.order, torch.int64), grayscale=put(draws.grayscale, torch.bool),
                   blur=put(draws.blur, torch.bool), sigma=put(draws.sigma, torch.float32),
                   solarize=put(draws.solarize, torch.bool), threshold=put(draws.threshold, torch.float32))


PARAM_FIELDS = tuple(f.name for f in fields(ColorAugParams))
PER_SAMPLE_FIELDS = tuple(name for name in PARAM_FIELDS if name != "order")


@dataclass(frozen=True)
class Rows:
    """The samples one op touches: int64 indices [m] into the batch, and the op's per-sample
    values there (float32 [m, ...]) when it has any; on the device."""

    index: Tensor
    values: Tensor | None = None


@dataclass(frozen=True)
class Blend:
    """One jitter position's brightness, contrast and saturation as one op over the batch,
    ``clamp(scale x + pull other, 0, 1)``: ``other`` is the sample's mean luma (contrast), each
    pixel's luma (saturation) or 0 (brightness). A sample with another op at this position, or
    no jitter, has scale 1 and pull 0, which leaves it exactly as it is."""

    scale: Tensor  # float32 [B, 1, 1, 1]: the drawn factor
    pull: Tensor | None  # float32 [B, 1, 1, 1]: 1 - factor for contrast and saturation, else 0; None: neither drawn
    saturation: Tensor | None  # bool [B, 1, 1, 1]: pixel luma (else the mean); None: no saturation here
    contrast: bool  # whether some sample has contrast here (the mean luma is needed)


@dataclass(frozen=True)
class ColourPlan:
    """What the device stage does to a batch of ``batch_size`` samples; None: nobody drew that op."""

    batch_size: int
    flip: Rows | None
    blends: tuple[Blend | None, ...]  # per jitter position
    hues: tuple[Rows | None, ...]  # per jitter position; values: the shift [m, 1, 1, 1], fraction of the circle
    grayscale: Rows | None
    blur: Rows | None  # values: normalised taps [3 m, kernel size], one row per (sample, channel)
    solarize: Rows | None  # values: the threshold [m, 1, 1, 1]


def gaussian_taps(sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """Normalised 1-D Gaussian taps, float32 [m, kernel_size], for ``sigma`` [m] in pixels
    (float32 maths, as the numba kernel's ``colour_kernels.gaussian_taps``)."""
    radius = kernel_size // 2
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    s = np.asarray(sigma, dtype=np.float32).reshape(-1, 1)
    w = np.exp(-(taps * taps) / (np.float32(2.0) * s * s))
    return w / w.sum(axis=1, keepdims=True, dtype=np.float32)


def _host(a) -> np.ndarray:
    """A parameter as a numpy array (a CUDA tensor is read back: a sync)."""
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def plan_colour(draws, jitter_ops: tuple[int, ...], flip: bool, blur_kernel_size: int | None,
                solarize: bool, device: torch.device | str) -> ColourPlan:
    """The plan of ``draws`` (any object with ``ColorAugParams``' fields as arrays or tensors:
    ``ColorAugParams``, ``draws.ViewDraws``) on ``device``, for a recipe whose enabled jitter ops
    are ``jitter_ops``; ``flip`` False: no flips (done where the views were cut);
    ``blur_kernel_size`` None: no blur; ``solarize`` False: no solarize."""
    d = {name: _host(getattr(draws, name)) for name in PARAM_FIELDS}
    flags = {name: d[name].astype(bool) for name in ("flip", "jitter", "grayscale", "blur", "solarize")}
    f32 = {name: d[name].astype(np.float32) for name in ("brightness", "contrast", "saturation", "hue", "sigma",
                                                          "threshold")}
    n = len(flags["flip"])
    per_image = (n, 1, 1, 1)
    blends, hues = [], []
    for pos in range(JITTER_POSITIONS):
        op = np.where(flags["jitter"], d["order"][:, pos], -1)
        blends.append(_blend(op, jitter_ops, f32))
        hues.append(_rows(op == HUE, f32["hue"].reshape(per_image)) if HUE in jitter_ops else None)
    blur = None
    if blur_kernel_size is not None and flags["blur"].any():
        taps = gaussian_taps(f32["sigma"][flags["blur"]], blur_kernel_size)
        blur = Rows(np.flatnonzero(flags["blur"]), np.repeat(taps, 3, axis=0))
    plan = ColourPlan(n, _rows(flags["flip"] & flip), tuple(blends), tuple(hues), _rows(flags["grayscale"]), blur,
                      _rows(flags["solarize"], f32["threshold"].reshape(per_image)) if solarize else None)
    return _send(plan, torch.device(device))


def _rows(mask: np.ndarray, values: np.ndarray | None = None) -> Rows | None:
    """The host ``Rows`` of the samples in ``mask`` (None if none), with their ``values``."""
    if not mask.any():
        return None
    return Rows(np.flatnonzero(mask), None if values is None else values[mask])


def _blend(op: np.ndarray, jitter_ops: tuple[int, ...], f32: dict) -> Blend | None:
    """One position's host ``Blend`` (None when no sample has brightness, contrast or saturation there)."""
    n = len(op)
    at = {k: (op == k) & (k in jitter_ops) for k in (BRIGHTNESS, CONTRAST, SATURATION)}
    if not (at[BRIGHTNESS] | at[CONTRAST] | at[SATURATION]).any():
        return None
    scale = np.ones(n, np.float32)
    for k, name in ((BRIGHTNESS, "brightness"), (CONTRAST, "contrast"), (SATURATION, "saturation")):
        scale[at[k]] = f32[name][at[k]]
    pulled = at[CONTRAST] | at[SATURATION]
    pull = np.where(pulled, np.float32(1.0) - scale, np.float32(0.0)).astype(np.float32)
    shape = (n, 1, 1, 1)
    return Blend(scale.reshape(shape), pull.reshape(shape) if pulled.any() else None,
                 at[SATURATION].reshape(shape) if at[SATURATION].any() else None, bool(at[CONTRAST].any()))


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
_ALIGN = 8  # bytes: every array starts at a multiple of its item size


def _send(host_plan, device: torch.device):
    """``host_plan`` with every numpy array replaced by a tensor on ``device``, all of them sent in
    one copy from one buffer (pinned for a CUDA device, so the copy does not block the host)."""
    arrays: list[np.ndarray] = []
    _map_arrays(host_plan, lambda a: arrays.append(np.ascontiguousarray(a, dtype=_dtype(a))))
    offsets, size = [], 0
    for a in arrays:
        offsets.append(-(-size // _ALIGN) * _ALIGN)
        size = offsets[-1] + a.nbytes
    host = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for offset, a in zip(offsets, arrays):
        flat[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
    sent = host.to(device, non_blocking=True)
    tensors = iter([sent[o : o + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for o, a in zip(offsets, arrays)])
    return _map_arrays(host_plan, lambda a: next(tensors))


def _dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.int64) if a.dtype.kind in "iu" else a.dtype


def _map_arrays(obj, fn):
    """``obj`` (dataclasses, tuples, arrays, plain values) with ``fn`` applied to every numpy array,
    in field order."""
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_arrays(o, fn) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_arrays(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj
