"""The planned draws every backend takes (``pipelines.augment.draws``): their distributions
against torchvision's and the recipe, per view group, and their independence from how they
are asked for (order, batch, the plan's seeds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from pipelines.augment.draws import (COLOUR_SLOTS, colour_draw, crop_box, draw_rows, draw_views, image_seeds,
                                     recipe_vector, uniform, view_seed)
from pipelines.augment.recipe import AugmentConfig, SimCLRRecipe, ViewGroupSpec
from pipelines.plan import SUPPORT_STREAM, UNLABELED_STREAM, build_plan, step_key


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _ks_bound(n: int, m: int, alpha: float = 1e-4) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _many(n: int, recipe: SimCLRRecipe, height: int, width: int, key: int = 1, first_view: int = 0):
    seeds = image_seeds(np.uint64(key), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))
    return draw_views(seeds, first_view, 1, np.tile([[height, width]], (n, 1)), recipe)


@pytest.mark.parametrize("height,width", [(120, 90), (40, 200)])  # the second often falls back
def test_crop_distribution_matches_torchvision(height, width):
    recipe = SimCLRRecipe()
    ours = _many(20000, recipe, height, width).crop
    torch.manual_seed(0)
    img = torch.zeros(1, height, width)
    theirs = np.array([v2.RandomResizedCrop.get_params(img, list(recipe.crop_scale), list(recipe.crop_ratio))
                       for _ in range(3000)])  # (top, left, h, w)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()
    bound = _ks_bound(len(ours), len(theirs))
    for name, f in {"area": lambda c: c[:, 2] * c[:, 3], "log ratio": lambda c: np.log(c[:, 3] / c[:, 2]),
                    "centre y": lambda c: c[:, 0] + c[:, 2] / 2, "centre x": lambda c: c[:, 1] + c[:, 3] / 2}.items():
        stat = _ks_statistic(f(ours).astype(float), f(theirs).astype(float))
        assert stat < bound, f"{name}: KS statistic {stat:.4f} >= {bound:.4f}"


def test_draw_frequencies_and_ranges_match_recipe():
    recipe = SimCLRRecipe(jitter_strength=0.5, solarize_prob=0.3, solarize_threshold=(0.2, 0.9))
    n = 20000
    d = _many(n, recipe, 64, 64)
    for name, p in {"flip": recipe.flip_prob, "jitter": recipe.jitter_prob, "grayscale": recipe.grayscale_prob,
                    "blur": recipe.blur_prob, "solarize": recipe.solarize_prob}.items():
        assert _binomial_ok(int(getattr(d, name).sum()), n, p), name
    for name, spread in {"brightness": recipe.brightness, "contrast": recipe.contrast,
                         "saturation": recipe.saturation}.items():
        f = getattr(d, name)
        assert f.min() >= 1 - spread and f.max() <= 1 + spread
        uniform_ref = np.random.default_rng(2).uniform(1 - spread, 1 + spread, 5000)
        assert _ks_statistic(f, uniform_ref) < _ks_bound(n, 5000), name
    assert np.abs(d.hue).max() <= recipe.hue
    assert abs(d.hue.std() - recipe.hue / math.sqrt(3)) < 0.02 * recipe.hue
    assert (np.sort(d.order, axis=1) == np.arange(4)).all()
    for op in range(4):  # each op first in a quarter of the draws
        assert _binomial_ok(int((d.order[:, 0] == op).sum()), n, 0.25), op
    lo, hi = recipe.blur_sigma
    assert d.sigma.min() >= lo and d.sigma.max() <= hi and abs(d.sigma.mean() - (lo + hi) / 2) < 0.02
    lo, hi = recipe.solarize_threshold
    assert d.threshold.min() >= lo and d.threshold.max() <= hi and abs(d.threshold.mean() - (lo + hi) / 2) < 0.01
    # no two draws share a uniform: flags of one view are independent of each other
    both = (d.flip & d.jitter).sum()
    assert _binomial_ok(int(both), n, recipe.flip_prob * recipe.jitter_prob)


def test_crop_scale_ranges_hold_per_group():
    """SwAV's 2 x 224 at (0.14, 1) + 6 x 96 at (0.05, 0.14): each group's crops cover the area
    fractions of its own range (up to the rounding of the crop's sides), distributed as
    torchvision's RandomResizedCrop with that range, and the views of one image are independent."""
    groups = AugmentConfig(views=(ViewGroupSpec(2, crop_scale=(0.14, 1.0)),
                                  ViewGroupSpec(6, resolution=96, crop_scale=(0.05, 0.14)))).view_groups()
    n, height, width = 4000, 480, 480  # square: no fallback, rounding below 0.5 % of the area
    seeds = image_seeds(np.uint64(3), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))
    first = 0
    areas = []
    for group in groups:
        d = draw_views(seeds, first, group.count, np.tile([[height, width]], (n, 1)), group.recipe)
        area = d.crop[:, 2] * d.crop[:, 3] / (height * width)
        lo, hi = group.recipe.crop_scale
        assert area.min() >= lo - 0.005 and area.max() <= hi + 0.005, (area.min(), area.max())
        torch.manual_seed(4)
        theirs = np.array([v2.RandomResizedCrop.get_params(torch.zeros(1, height, width), [lo, hi],
                                                           list(group.recipe.crop_ratio)) for _ in range(3000)])
        their_area = theirs[:, 2] * theirs[:, 3] / (height * width)
        assert _ks_statistic(area, their_area) < _ks_bound(len(area), len(their_area))
        areas.append(area.reshape(group.count, n))
        first += group.count
    # views of one image: independent (correlation of their areas ~ 0)
    assert abs(np.corrcoef(areas[1][0], areas[1][1])[0, 1]) < 0.06
    assert abs(np.corrcoef(areas[0][0], areas[1][0])[0, 1]) < 0.06


def test_draws_do_not_depend_on_batching_or_order():
    recipe = SimCLRRecipe()
    r = recipe_vector(recipe)
    seeds = image_seeds(np.uint64(7), np.arange(10, dtype=np.int64), np.zeros(10, np.int64))
    sizes = np.array([[30 + i, 50 - i] for i in range(10)])
    boxes, colour = draw_rows(seeds, 2, 3, sizes[:, 0].copy(), sizes[:, 1].copy(), r)
    # one image at a time, views in reverse order, with the scalar functions
    for i in reversed(range(10)):
        for v in reversed(range(3)):
            s = np.uint64(view_seed(seeds[i], 2 + v))
            assert crop_box(s, sizes[i, 0], sizes[i, 1], r) == tuple(boxes[v * 10 + i])
            out = np.empty(COLOUR_SLOTS)
            colour_draw(s, r, out)
            assert np.array_equal(out, colour[v * 10 + i])
    # another view number, another image seed: other draws
    other, _ = draw_rows(seeds, 3, 1, sizes[:, 0].copy(), sizes[:, 1].copy(), r)
    assert not np.array_equal(other, boxes[:10])
    assert 0.0 <= uniform(np.uint64(1), 0) < 1.0


def test_plan_seeds_are_world_size_invariant_and_rank_apart():
    """Unlabeled: an image's seed is a function of (seed, epoch, index) alone. Support: of the
    global step, the image and its place in its class's global block, so two ranks that draw one
    image get different seeds, and a run on W ranks has the seeds of one process with the
    same global support set."""
    labels = np.repeat(np.arange(4), 12)
    labeled = np.arange(48)
    one = build_plan(48, labels, labeled, 4, _support(4, 4), rank=0, world_size=1, seed=5)
    two = [build_plan(48, labels, labeled, 2, _support(4, 2), rank=r, world_size=2, seed=5) for r in range(2)]
    ids = np.arange(6)
    assert np.array_equal(one.unlabeled.image_seeds(3, ids), two[1].unlabeled.image_seeds(3, ids))
    assert not np.array_equal(one.unlabeled.image_seeds(3, ids), one.unlabeled.image_seeds(4, ids))
    g = 5
    whole = one.support.batch(g).reshape(4, 4)  # C x (W*K), class-major
    halves = [two[r].support.batch(g).reshape(4, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(halves, axis=1), whole)  # rank r holds places r*K .. r*K + K-1
    seeds_one = one.support.image_seeds(g, whole.ravel()).reshape(4, 4)
    seeds_two = [two[r].support.image_seeds(g, halves[r].ravel()).reshape(4, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(seeds_two, axis=1), seeds_one)
    # the same image at two places (two ranks) has two seeds
    same = np.zeros(4, np.int64)
    assert len(set(two[0].support.image_seeds(g, np.tile(same, 2)).tolist())) > 1
    assert step_key(5, UNLABELED_STREAM, 1) != step_key(5, SUPPORT_STREAM, 1)


def _support(classes: int, per_class: int):
    from pipelines.spec import SupportSpec

    return SupportSpec(classes, per_class)
