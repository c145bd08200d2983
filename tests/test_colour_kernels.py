"""The host colour stage (``pipelines.augment.colour_kernels``: the torch backend's workers and
FFCV's decoder threads) against ``BatchColorAugment`` (the device stage).

The numba kernel is checked image by image against ``BatchColorAugment.apply``
(flip off) with the same ``ColorAugParams``, compared in [0, 1] after undoing
the reference's normalisation: the kernel rounds to uint8 once, at the end, so
it may differ by half a grey level plus float noise. Images are smooth
gradients with noise, with saturated, grey and channel-tie regions.

``finish_view`` with planned draws (``pipelines.augment.draws``) is checked
against the device stage on the same draws (``BatchColorAugment.plan``),
and its distributions on structured images where each op leaves a signature
(5-sigma binomial tolerances). numba compiles the kernel once (cached on disk).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from pipelines.augment.batched import BatchColorAugment, ColorAugParams
from pipelines.augment.colour_plan import gaussian_taps
from pipelines.augment.colour_kernels import color_augment_image, finish_view
from pipelines.augment.draws import draw_rows, draw_views, image_seeds, recipe_vector
from pipelines.augment.recipe import SimCLRRecipe

H, W = 40, 48  # not square, so that a swapped axis shows
RECIPE = SimCLRRecipe(resolution=W, blur_kernel_fraction=0.3)  # 15 taps: the reflect padding matters
MAX_ERR = 0.5 / 255 + 1e-4  # rounding to uint8 once, plus float noise
MEAN_ERR = 0.3 / 255  # mean |rounding error| of uniform values is 0.25 / 255


# --------------------------------------------------------------------------- helpers


def natural_images(b: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """uint8 [b, h, w, 3]: colour gradients, a wave and noise, clipped at 0 and 255,
    plus a constant grey image, black/white blocks and red/green ties."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((b, h, w, 3), np.uint8)
    for i in range(b):
        base, gx, gy, wave = rng.uniform(0, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
        freq = rng.uniform(0.1, 0.5)
        img = (base + gx * (xx / w)[..., None] + gy * (yy / h)[..., None]
               + 0.2 * np.sin(freq * (xx + yy))[..., None] * wave)
        img = img * 255 + rng.normal(0, 8, (h, w, 3))
        out[i] = np.clip(np.round(img), 0, 255)
    out[0] = 128
    if b > 1:
        out[1, :, : w // 4] = 255
        out[1, :, w // 4 : w // 2] = 0
    if b > 2:
        out[2, ..., 1] = out[2, ..., 0]
    return out


def make_params(b: int, **fields) -> ColorAugParams:
    """Neutral parameters (nothing applied) for ``b`` samples, overridden by ``fields``."""
    base = dict(flip=torch.zeros(b, dtype=torch.bool), jitter=torch.zeros(b, dtype=torch.bool),
                brightness=torch.ones(b), contrast=torch.ones(b), saturation=torch.ones(b), hue=torch.zeros(b),
                order=torch.arange(4).repeat(b, 1), grayscale=torch.zeros(b, dtype=torch.bool),
                blur=torch.zeros(b, dtype=torch.bool), sigma=torch.ones(b), solarize=torch.zeros(b, dtype=torch.bool),
                threshold=torch.full((b,), 0.5))
    base.update({k: torch.as_tensor(v) for k, v in fields.items()})
    return ColorAugParams(**base)


def run_kernel(images: np.ndarray, p: ColorAugParams, recipe: SimCLRRecipe) -> np.ndarray:
    """The numba kernel on each image: float [B, H, W, 3] in [0, 1]."""
    out = np.empty_like(images)
    for i in range(len(images)):
        color_augment_image(images[i], out[i], bool(p.jitter[i]), float(p.brightness[i]), float(p.contrast[i]),
                            float(p.saturation[i]), float(p.hue[i]), p.order[i].numpy(), bool(p.grayscale[i]),
                            bool(p.blur[i]), float(p.sigma[i]), recipe.blur_kernel_size)
    return out.astype(np.float64) / 255


def reference(images: np.ndarray, p: ColorAugParams, recipe: SimCLRRecipe) -> np.ndarray:
    """BatchColorAugment.apply (flip off) with its normalisation undone: float [B, H, W, 3] in [0, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = BatchColorAugment(recipe, flip=False).apply(x, p)
    y = y * torch.tensor(recipe.std).view(1, 3, 1, 1) + torch.tensor(recipe.mean).view(1, 3, 1, 1)
    return y.permute(0, 2, 3, 1).double().numpy()


def assert_matches(images: np.ndarray, p: ColorAugParams, recipe: SimCLRRecipe = RECIPE) -> None:
    got, ref = run_kernel(images, p, recipe), reference(images, p, recipe)
    err = np.abs(got - ref)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= MAX_ERR, f"max error {err.max() * 255:.3f}/255 at {worst}"
    assert err.mean() <= MEAN_ERR, f"mean error {err.mean() * 255:.3f}/255"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return natural_images(24)


# --------------------------------------------------------------------------- the kernel against BatchColorAugment


def _one_op(op: str, b: int) -> dict:
    on = torch.ones(b, dtype=torch.bool)
    sweep = torch.linspace(0.0, 1.8, b)
    if op == "brightness":
        return dict(jitter=on, brightness=sweep, order=torch.tensor([[0, 1, 2, 3]] * b))
    if op == "contrast":
        return dict(jitter=on, contrast=sweep, order=torch.tensor([[1, 0, 2, 3]] * b))
    if op == "saturation":
        return dict(jitter=on, saturation=sweep, order=torch.tensor([[2, 0, 1, 3]] * b))
    if op == "hue":
        return dict(jitter=on, hue=torch.linspace(-0.5, 0.5, b), order=torch.tensor([[3, 0, 1, 2]] * b))
    if op == "grayscale":
        return dict(grayscale=on)
    return dict(blur=on, sigma=torch.linspace(0.1, 3.0, b))


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "grayscale", "blur"])
def test_each_op_alone_matches_batch_augment(images, op):
    b = len(images)
    assert_matches(images, make_params(b, **_one_op(op, b)))


def test_nothing_drawn_copies_the_image(images):
    p = make_params(len(images))
    assert np.array_equal(run_kernel(images, p, RECIPE), images / 255)


def test_every_op_order_matches_batch_augment():
    orders = torch.tensor(list(itertools.permutations(range(4))))  # 24: contrast at every position
    b = len(orders)
    g = torch.Generator().manual_seed(5)
    on = torch.ones(b, dtype=torch.bool)
    p = make_params(b, jitter=on, order=orders, brightness=0.4 + 1.2 * torch.rand(b, generator=g),
                    contrast=0.2 + 1.6 * torch.rand(b, generator=g), saturation=0.2 + 1.6 * torch.rand(b, generator=g),
                    hue=0.4 * torch.rand(b, generator=g) - 0.2, blur=torch.arange(b) % 2 == 0,
                    sigma=0.5 + 1.5 * torch.rand(b, generator=g))
    assert_matches(natural_images(b, seed=1), p)


@pytest.mark.parametrize("strength", [1.0, 1.5, 0.0])
def test_random_recipe_draws_match_batch_augment(strength):
    recipe = dataclasses.replace(RECIPE, jitter_strength=strength)
    b = 64
    p = BatchColorAugment(recipe, flip=False).sample_params(b, torch.Generator().manual_seed(int(10 * strength)))
    assert not p.flip.any()
    assert_matches(natural_images(b, seed=2), p, recipe)


def test_full_resolution_recipe_matches_batch_augment():
    recipe = SimCLRRecipe()  # 224 x 224, 23 taps
    b = 4
    p = BatchColorAugment(recipe, flip=False).sample_params(b, torch.Generator().manual_seed(3))
    p = dataclasses.replace(p, jitter=torch.tensor([True, True, False, True]),
                            blur=torch.tensor([True, False, True, True]), sigma=torch.tensor([2.0, 1.0, 0.7, 0.1]))
    assert_matches(natural_images(b, recipe.resolution, recipe.resolution, seed=4), p, recipe)


def test_kernel_may_write_in_place(images):
    b = len(images)
    p = BatchColorAugment(RECIPE, flip=False).sample_params(b, torch.Generator().manual_seed(6))
    expected = run_kernel(images, p, RECIPE)
    x = images.copy()
    for i in range(b):
        color_augment_image(x[i], x[i], bool(p.jitter[i]), float(p.brightness[i]), float(p.contrast[i]),
                            float(p.saturation[i]), float(p.hue[i]), p.order[i].numpy(), bool(p.grayscale[i]),
                            bool(p.blur[i]), float(p.sigma[i]), RECIPE.blur_kernel_size)
    assert np.array_equal(x / 255, expected)


# --------------------------------------------------------------------------- planned views


def _seeds(n: int, key: int = 5) -> np.ndarray:
    return image_seeds(np.uint64(key), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))


def run_planned(images: np.ndarray, recipe: SimCLRRecipe, key: int = 5, colour: bool = True) -> np.ndarray:
    """``finish_view`` on each image with its planned draws (view 0 of image i's seed)."""
    n = len(images)
    _, rows = draw_rows(_seeds(n, key), 0, 1, np.full(n, images.shape[1]), np.full(n, images.shape[2]),
                        recipe_vector(recipe))
    out = images.copy()
    for i in range(n):
        finish_view(out[i], rows[i], recipe.blur_kernel_size, colour)
    return out


def test_planned_views_match_the_device_stage_on_the_same_draws():
    """The host stage and ``BatchColorAugment`` read a view's draws the same way: flip, jitter in
    the drawn order, grayscale, blur and solarize."""
    recipe = dataclasses.replace(RECIPE, solarize_prob=0.5, solarize_threshold=(0.3, 0.8))
    b = 64
    images = natural_images(b, seed=7)
    out = run_planned(images, recipe)
    draws = draw_views(_seeds(b), 0, 1, np.full((b, 2), (H, W)), recipe)
    assert draws.flip.any() and draws.solarize.any() and draws.jitter.any() and draws.blur.any()
    aug = BatchColorAugment(recipe)
    ref = aug.apply(torch.from_numpy(images).permute(0, 3, 1, 2), aug.plan(draws, "cpu"))
    ref = ref * torch.tensor(recipe.std).view(1, 3, 1, 1) + torch.tensor(recipe.mean).view(1, 3, 1, 1)
    err = np.abs(out / 255 - ref.permute(0, 2, 3, 1).double().numpy())
    # solarize may invert a pixel within half a level of its threshold on one side only
    v, t = ref.permute(0, 2, 3, 1).numpy(), draws.threshold[:, None, None, None]
    near = (np.abs(v - t) < 1 / 255) | (np.abs(1 - v - t) < 1 / 255)  # before solarize: v or 1 - v
    assert (err[~near] <= MAX_ERR).all(), err[~near].max() * 255
    assert err.mean() <= MEAN_ERR
    # without the colour stage only the flip is applied
    flipped = run_planned(images, recipe, colour=False)
    assert np.array_equal(flipped, np.where(draws.flip[:, None, None, None], images[:, :, ::-1], images))


N_STATS = 4000  # images per statistics batch
RES = 16  # 3 taps


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.fixture(scope="module")
def parallel_grey_run():
    """Default probabilities on a constant grey image (level 100): only brightness changes it."""
    recipe = SimCLRRecipe(resolution=RES, flip_prob=0.0)
    images = np.full((N_STATS, RES, RES, 3), 100, np.uint8)
    return recipe, run_planned(images, recipe)


def test_jitter_fraction_and_brightness_distribution(parallel_grey_run):
    recipe, out = parallel_grey_run
    assert (out == out[:, :1, :1, :1]).all()  # still constant grey: contrast, saturation, hue, blur leave it
    level = out[:, 0, 0, 0].astype(np.float64)
    changed = level != 100
    lo, hi = max(0.0, 1 - recipe.brightness), 1 + recipe.brightness
    # a factor within half a level of 1 rounds back to 100
    p_changed = recipe.jitter_prob * (1 - (1.0 / 100) / (hi - lo))
    assert binomial_ok(changed.sum(), N_STATS, p_changed)
    factors = level[changed] / 100  # +- 0.005
    assert lo - 0.006 <= factors.min() and factors.max() <= hi + 0.006
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(factors, q) - (lo + q * (hi - lo))) < 0.08, q


STRIPE_A, STRIPE_B = (255, 40, 0), (0, 200, 255)  # luma 99.7 and 146.5


@pytest.fixture(scope="module")
def parallel_stripes_run():
    """No jitter; grayscale and blur on colour stripes one pixel wide (even columns A, odd B).
    With sigma >= 0.5 (3 taps) a blur at least halves the stripes' contrast."""
    recipe = SimCLRRecipe(resolution=RES, jitter_prob=0.0, blur_sigma=(0.5, 2.0), flip_prob=0.0)
    images = np.empty((N_STATS, RES, RES, 3), np.uint8)
    images[:, :, 0::2], images[:, :, 1::2] = STRIPE_A, STRIPE_B
    out = run_planned(images, recipe)
    x = out.astype(np.float64)
    gray = ((x[..., 0] == x[..., 1]) & (x[..., 1] == x[..., 2])).all(axis=(1, 2))
    c = RES // 2
    red_contrast = np.abs(x[:, c, c, 0] - x[:, c, c + 1, 0])  # 255 unblurred, 47 if grey
    blurred = red_contrast < np.where(gray, 30, 200)
    return recipe, x, gray, blurred


def test_grayscale_and_blur_fractions(parallel_stripes_run):
    recipe, _, gray, blurred = parallel_stripes_run
    assert binomial_ok(gray.sum(), N_STATS, recipe.grayscale_prob)
    assert binomial_ok(blurred.sum(), N_STATS, recipe.blur_prob)
    assert binomial_ok((gray & blurred).sum(), N_STATS, recipe.grayscale_prob * recipe.blur_prob)  # independent
    # per sample, not per batch: both outcomes occur
    assert 0 < gray.mean() < 1 and 0 < blurred.mean() < 1


def test_blur_sigma_distribution(parallel_stripes_run):
    """Columns alternating red 255 / 0: a blurred (not grey) image has red 127.5 + 127.5 a(sigma)
    in an even column, a = w0 - w(-1) - w(1) decreasing in sigma; invert it on reference taps."""
    recipe, x, gray, blurred = parallel_stripes_run
    red = x[:, RES // 2, RES // 2, 0]  # an even column: stripe A
    blurred = blurred & ~gray
    grid = np.linspace(0.3, 2.5, 2000)
    taps = gaussian_taps(grid, recipe.blur_kernel_size)  # [N, 3]
    amp = taps[:, 1] - taps[:, 0] - taps[:, 2]  # decreasing in sigma
    sigma = np.interp((red[blurred] - 127.5) / 127.5, amp[::-1], grid[::-1])
    lo, hi = recipe.blur_sigma
    assert sigma.min() > lo - 0.05 and sigma.max() < hi + 0.15
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(sigma, q) - (lo + q * (hi - lo))) < 0.1, q


def test_host_normalisation_equals_the_device_ops():
    from pipelines.augment.batched import normalize_only
    from pipelines.augment.colour_kernels import normalize_on_host

    recipe = SimCLRRecipe()
    images = torch.from_numpy(natural_images(5))  # [5, H, W, 3] uint8
    ours = normalize_on_host(images, recipe.mean, recipe.std)
    ref = normalize_only(images.permute(0, 3, 1, 2), recipe)
    assert ours.shape == (5, 3, H, W) and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
