"""Batched SimCLR colour augmentation against torchvision, sample by sample.

References are torchvision.transforms.v2.functional kernels on float images in
[0, 1]; statistics are checked on a large batch of tiny images with 5-sigma
binomial tolerances.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.augment.batched import (
    BatchColorAugment,
    ColorAugParams,
    adjust_hue,
    gaussian_blur,
    normalize,
    normalize_only,
    to_unit_float,
)
from pipelines.augment.colour_plan import BRIGHTNESS, CONTRAST, HUE, SATURATION, gaussian_taps
from pipelines.augment.recipe import SimCLRRecipe

ATOL = 1e-5


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] with 8-bit levels, so grey pixels and channel ties occur."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255
    x[:, :, 0, 0] = x[:, 0:1, 0, 0]  # a grey pixel per image
    x[:, 1, 0, 1] = x[:, 0, 0, 1]  # a red/green tie per image
    x[0] = 0.0  # one black image
    return x


def _factors(b: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(b, generator=g)


def _tv_jitter(img: torch.Tensor, op: int, p: ColorAugParams, i: int) -> torch.Tensor:
    if op == BRIGHTNESS:
        return TF.adjust_brightness(img, float(p.brightness[i]))
    if op == CONTRAST:
        return TF.adjust_contrast(img, float(p.contrast[i]))
    if op == SATURATION:
        return TF.adjust_saturation(img, float(p.saturation[i]))
    return TF.adjust_hue(img, float(p.hue[i]))


def _tv_reference(x: torch.Tensor, p: ColorAugParams, recipe: SimCLRRecipe) -> torch.Tensor:
    """The SimCLR colour pipeline built from torchvision kernels, one sample at a time."""
    k = recipe.blur_kernel_size
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        if p.flip[i]:
            img = TF.hflip(img)
        if p.jitter[i]:
            for op in p.order[i].tolist():
                img = _tv_jitter(img, op, p, i)
        if p.grayscale[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur[i]:
            s = float(p.sigma[i])
            img = TF.gaussian_blur(img, [k, k], [s, s])
        out.append(TF.normalize(img, list(recipe.mean), list(recipe.std)))
    return torch.stack(out)


def _unnormalize(y: torch.Tensor, recipe: SimCLRRecipe) -> torch.Tensor:
    m = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    s = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return y.float() * s + m


def _params_to(p: ColorAugParams, device: torch.device) -> ColorAugParams:
    return ColorAugParams(**{f.name: getattr(p, f.name).to(device) for f in dataclasses.fields(p)})


def _only(b: int, **drawn: torch.Tensor) -> ColorAugParams:
    """Parameters that switch every op off except ``drawn`` (jitter factors neutral, hue 0)."""
    off, one = torch.zeros(b, dtype=torch.bool), torch.ones(b)
    base = dict(flip=off, jitter=off, brightness=one, contrast=one, saturation=one, hue=0 * one,
                order=torch.arange(4).expand(b, 4), grayscale=off, blur=off, sigma=one, solarize=off,
                threshold=0.5 * one)
    return ColorAugParams(**(base | drawn))


def _raw(aug: BatchColorAugment, x: torch.Tensor, p: ColorAugParams) -> torch.Tensor:
    """``aug.apply`` with its normalisation undone: float in [0, 1]."""
    return _unnormalize(aug.apply(x, p), aug.recipe)


# --- single ops against torchvision --------------------------------------------------


@pytest.mark.parametrize(
    "op, theirs, lo, hi",
    [
        (BRIGHTNESS, TF.adjust_brightness, 0.0, 2.0),
        (CONTRAST, TF.adjust_contrast, 0.0, 2.0),
        (SATURATION, TF.adjust_saturation, 0.0, 2.0),
        (HUE, TF.adjust_hue, -0.5, 0.5),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_jitter_op_matches_torchvision(op, theirs, lo, hi):
    x = _images(24, 12, 10)
    f = _factors(24, lo, hi)
    f[1] = lo
    f[2] = hi
    got = adjust_hue(to_unit_float(x), f) if op == HUE else None
    # through the whole stage: the op first, the others neutral after it
    jitter = torch.ones(24, dtype=torch.bool)
    order = torch.tensor([op] + [k for k in range(4) if k != op]).expand(24, 4)
    field = ("brightness", "contrast", "saturation", "hue")[op]
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    staged = _raw(aug, x, _only(24, jitter=jitter, order=order, **{field: f}))
    want = torch.stack([theirs(x[i], float(f[i])) for i in range(x.shape[0])])
    torch.testing.assert_close(staged, want, atol=2 * ATOL, rtol=0)
    if got is not None:
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_hue_zero_shift_keeps_image():
    x = _images(8, 9, 9)
    torch.testing.assert_close(adjust_hue(to_unit_float(x), torch.zeros(8)), x, atol=ATOL, rtol=0)


def test_grayscale_flip_and_normalize_match_torchvision():
    x = _images(10, 7, 9)
    mask = torch.tensor([True, False] * 5)
    aug = BatchColorAugment(SimCLRRecipe(resolution=32, blur_prob=0.0))
    want_gray = torch.stack([TF.rgb_to_grayscale(x[i], 3) if mask[i] else x[i] for i in range(10)])
    want_flip = torch.stack([TF.hflip(x[i]) if mask[i] else x[i] for i in range(10)])
    torch.testing.assert_close(_raw(aug, x, _only(10, grayscale=mask)), want_gray, atol=ATOL, rtol=0)
    flipped = aug.apply(x, _only(10, flip=mask))
    torch.testing.assert_close(flipped, normalize(want_flip, aug.recipe.mean, aug.recipe.std, torch.float32),
                               atol=0, rtol=0)
    r = SimCLRRecipe()
    got = normalize(x, r.mean, r.std, torch.float32)
    torch.testing.assert_close(got, TF.normalize(x, list(r.mean), list(r.std)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_blur_matches_torchvision(kernel_size):
    x = _images(12, 16, 11)
    sigma = _factors(12, 0.1, 2.0)
    mask = torch.rand(12, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[:2] = torch.tensor([True, False])
    want = torch.stack(
        [
            TF.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2) if mask[i] else x[i]
            for i in range(12)
        ]
    )
    taps = torch.from_numpy(gaussian_taps(sigma.numpy(), kernel_size)).repeat_interleave(3, dim=0)
    torch.testing.assert_close(gaussian_blur(x, taps)[mask], want[mask], atol=ATOL, rtol=0)
    resolution = int(kernel_size / SimCLRRecipe().blur_kernel_fraction)  # a recipe with this kernel size
    aug = BatchColorAugment(SimCLRRecipe(resolution=resolution))
    assert aug.recipe.blur_kernel_size == kernel_size
    got = _raw(aug, x, _only(12, blur=mask, sigma=sigma))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.equal(aug.apply(x, _only(12, blur=mask, sigma=sigma))[~mask],
                       aug.apply(x, _only(12, sigma=sigma))[~mask])  # samples not drawn are left alone


def test_blur_rejects_images_smaller_than_kernel():
    with pytest.raises(ValueError, match="larger"):
        gaussian_blur(torch.rand(2, 3, 4, 4), torch.ones(6, 9) / 9)


# --- the whole pipeline against torchvision ------------------------------------------


def test_apply_matches_torchvision_pipeline_per_sample():
    recipe = SimCLRRecipe(resolution=48)  # blur kernel 5
    aug = BatchColorAugment(recipe)
    x = _images(64, 16, 16)
    p = aug.sample_params(64, torch.Generator().manual_seed(7))
    # Every branch is taken and skipped at least once, and orders vary.
    for flag in (p.flip, p.jitter, p.grayscale, p.blur):
        assert 0 < int(flag.sum()) < 64
    assert len({tuple(o) for o in p.order[p.jitter].tolist()}) > 5
    torch.testing.assert_close(aug.apply(x, p), _tv_reference(x, p, recipe), atol=5e-5, rtol=0)


def test_jitter_order_matters():
    """Guards the reference test: a wrong order would be visible."""
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    x = _images(32, 8, 8)
    p = aug.sample_params(32, torch.Generator().manual_seed(1))
    p = dataclasses.replace(p, jitter=torch.ones(32, dtype=torch.bool))
    reversed_order = dataclasses.replace(p, order=p.order.flip(1))
    diff = (aug.apply(x, p) - aug.apply(x, reversed_order)).abs().amax(dim=(1, 2, 3))
    assert (diff > 1e-3).float().mean() > 0.5


def test_flip_disabled_at_construction():
    p = BatchColorAugment(SimCLRRecipe(), flip=False).sample_params(500, torch.Generator().manual_seed(0))
    assert not p.flip.any()


# --- statistics over a large batch ---------------------------------------------------


def _assert_binomial(count: int, n: int, p: float) -> None:
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) <= tol, f"{count}/{n} = {count / n:.4f}, expected {p} +- {tol:.4f}"


def test_output_statistics_match_recipe():
    recipe = SimCLRRecipe(resolution=32)  # blur kernel 3
    aug = BatchColorAugment(recipe)
    n = 2000
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    p = aug.sample_params(n, torch.Generator().manual_seed(11))
    y = aug.apply(x, p)

    # Grey outputs: exactly the samples sent through RandomGrayscale. Jitter can
    # not make a colour image grey (saturation factor >= 0.2, brightness >= 0.2,
    # random 8x8 images), and blur and flip act on channels alike; the
    # normalisation has per-channel constants, so undo it before comparing.
    rgb = _unnormalize(y, recipe)
    spread = (rgb.amax(dim=1) - rgb.amin(dim=1)).amax(dim=(1, 2))
    is_grey = spread < 1e-5
    assert torch.equal(is_grey, p.grayscale)
    _assert_binomial(int(is_grey.sum()), n, recipe.grayscale_prob)

    # Each other op: which samples change when that op is switched off.
    def changed_without(**off: torch.Tensor) -> torch.Tensor:
        ref = aug.apply(x, dataclasses.replace(p, **off))
        return (y - ref).abs().amax(dim=(1, 2, 3)) > 1e-6

    none = torch.zeros(n, dtype=torch.bool)
    for name, prob in (("jitter", recipe.jitter_prob), ("flip", recipe.flip_prob)):
        changed = changed_without(**{name: none})
        assert torch.equal(changed, getattr(p, name)), name
        _assert_binomial(int(changed.sum()), n, prob)
    # A blur with sigma near 0.1 px has off-centre taps below 1e-21: no visible
    # change. Blurred samples are those flagged; visibly so from sigma 0.3 px.
    blurred = changed_without(blur=none)
    assert not (blurred & ~p.blur).any()
    assert blurred[p.blur & (p.sigma > 0.3)].all()
    _assert_binomial(int(p.blur.sum()), n, recipe.blur_prob)


def test_parameter_ranges_and_distribution():
    recipe = SimCLRRecipe(jitter_strength=1.5)  # brightness etc. lower bound clipped at 0
    n = 20000
    p = BatchColorAugment(recipe).sample_params(n, torch.Generator().manual_seed(5))
    bounds = {
        "brightness": (max(0.0, 1 - recipe.brightness), 1 + recipe.brightness),
        "contrast": (max(0.0, 1 - recipe.contrast), 1 + recipe.contrast),
        "saturation": (max(0.0, 1 - recipe.saturation), 1 + recipe.saturation),
        "hue": (-recipe.hue, recipe.hue),
        "sigma": recipe.blur_sigma,
    }
    for name, (lo, hi) in bounds.items():
        v = getattr(p, name)
        assert v.dtype == torch.float32
        assert lo <= float(v.min()) and float(v.max()) <= hi, name
        assert float(v.min()) < lo + 0.01 * (hi - lo) and float(v.max()) > hi - 0.01 * (hi - lo), name
        assert abs(float(v.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo), name
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        _assert_binomial(int(getattr(p, name).sum()), n, prob)
    # Orders are permutations, each op equally likely at each position.
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for pos in range(4):
        for op in range(4):
            _assert_binomial(int((p.order[:, pos] == op).sum()), n, 0.25)


def test_samples_get_different_parameters():
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    p = aug.sample_params(256, torch.Generator().manual_seed(0))
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert getattr(p, name).unique().numel() == 256, name
    same = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).expand(16, 3, 8, 8)
    y = aug(same, torch.Generator().manual_seed(0))
    # Copies match only when a sample draws no op but flip (p ~ 0.04 each).
    assert torch.unique(y.flatten(1).round(decimals=3), dim=0).shape[0] >= 12


# --- contract: dtype, layout, device, determinism, input paths -----------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_layout_and_precision(dtype):
    recipe = SimCLRRecipe(resolution=32)
    x = (_images(8, 12, 12) * 255).round().to(torch.uint8).contiguous(memory_format=torch.channels_last)
    y = BatchColorAugment(recipe, dtype=dtype)(x, torch.Generator().manual_seed(0))
    ref = BatchColorAugment(recipe)(x, torch.Generator().manual_seed(0))
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.float(), ref, atol=tol * 3, rtol=tol)


def test_seeded_generator_is_deterministic():
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    x = _images(16, 8, 8)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, aug.apply(x, aug.sample_params(16, torch.Generator().manual_seed(3))))


def test_uint8_path_equals_float_path():
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    u8 = torch.randint(0, 256, (12, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = aug.sample_params(12, torch.Generator().manual_seed(1))
    from_u8 = aug.apply(u8.contiguous(memory_format=torch.channels_last), p)
    assert torch.equal(from_u8, aug.apply(u8, p))
    assert torch.equal(from_u8, aug.apply(u8.float() / 255, p))


def test_normalize_only():
    recipe = SimCLRRecipe()
    u8 = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = normalize_only(u8, recipe, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    want = TF.normalize(u8.float() / 255, list(recipe.mean), list(recipe.std))
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(normalize_only(u8.float() / 255, recipe), want, atol=ATOL, rtol=0)


def test_bad_inputs_are_refused():
    aug = BatchColorAugment(SimCLRRecipe(resolution=32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        aug(torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="output dtype"):
        BatchColorAugment(SimCLRRecipe(), dtype=torch.float64)
    p = aug.sample_params(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="params are for 3"):
        aug.apply(torch.rand(2, 3, 8, 8), p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_same_params():
    cuda = torch.device("cuda")
    aug = BatchColorAugment(SimCLRRecipe(resolution=64), dtype=torch.bfloat16)
    x = (_images(32, 32, 32) * 255).to(torch.uint8)
    p = aug.sample_params(32, torch.Generator(device=cuda).manual_seed(0), cuda)
    assert p.brightness.device.type == "cuda"
    y = aug.apply(x.to(cuda).contiguous(memory_format=torch.channels_last), p)
    assert y.device.type == "cuda" and y.is_contiguous(memory_format=torch.channels_last)
    ref = BatchColorAugment(SimCLRRecipe(resolution=64))
    torch.testing.assert_close(y.float().cpu(), ref.apply(x, _params_to(p, torch.device("cpu"))), atol=5e-2, rtol=2e-2)
    planned = aug.plan(_params_to(p, torch.device("cpu")), cuda)  # from the host: one pinned copy
    assert torch.equal(aug.apply(x.to(cuda), planned), aug.apply(x.to(cuda), p))
    with pytest.raises(ValueError, match="generator is on"):
        aug.sample_params(4, torch.Generator(), cuda)
