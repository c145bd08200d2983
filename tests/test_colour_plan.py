"""The device colour stage as the host plans it (``colour_plan``): the same output as before the
rewrite (``tests/helpers/batched_before.py``, both its CUDA and its CPU path), each op run only
on the samples that drew it, the plan sent in one copy, and no host sync on the device side.

Tolerance: multiply-adds are fused now (``addcmul``), so values differ from the old separate
multiplies and adds by float rounding, compounded through up to four jitter ops with factors up
to 1.8: at most ``TOL`` in normalised units (2.3e-6 in [0, 1] pixel values, 1/1700 of a grey level).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.augment import batched
from pipelines.augment.batched import BatchColorAugment
from pipelines.augment.colour_plan import HUE, ColorAugParams
from pipelines.augment.draws import ViewDraws, draw_views, image_seeds
from pipelines.augment.recipe import SimCLRRecipe
from tests.helpers.batched_before import reference_apply
from tests.helpers.host_syncs import host_syncs_forbidden

TOL = 1e-5
aten = torch.ops.aten


def _draws(n: int, recipe: SimCLRRecipe, seed: int = 0) -> ViewDraws:
    seeds = image_seeds(np.uint64(seed), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))
    return draw_views(seeds, 0, 1, np.ones((n, 2), np.int64), recipe)


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """uint8 channels-last views as FFCV hands them over, with grey pixels and channel ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)
    x[:, 0, 0] = x[:, 0, 0, :1]  # grey
    x[:, 0, 1, 1] = x[:, 0, 1, 0]  # red = green
    return x.permute(0, 3, 1, 2)


RECIPES = {
    "simclr": SimCLRRecipe(resolution=32),
    "local crops": SimCLRRecipe(resolution=24, crop_scale=(0.05, 0.14)),
    "strong, solarize": SimCLRRecipe(resolution=40, jitter_strength=1.5, solarize_prob=0.3),
    "no blur, no grey": SimCLRRecipe(resolution=32, blur_prob=0.0, grayscale_prob=0.0),
    "jitter always": SimCLRRecipe(resolution=32, jitter_prob=1.0, blur_prob=1.0),
    "no jitter": SimCLRRecipe(resolution=32, jitter_strength=0.0),
}


@pytest.mark.parametrize("flip", [False, True], ids=["ffcv", "flip"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_the_planned_stage_gives_the_old_output(name, flip):
    recipe = RECIPES[name]
    n = 96
    draws = _draws(n, recipe, seed=len(name))
    x = _images(n, recipe.resolution, seed=3)
    aug = BatchColorAugment(recipe, flip=flip)
    got = aug.apply(x, aug.plan(draws, "cpu"))
    old = ColorAugParams.from_draws(draws, "cpu", flip=flip)
    for masked in (True, False):  # the old CUDA path and the old CPU path
        want = reference_apply(recipe, x, old, masked)
        assert (got - want).abs().max().item() <= TOL, (name, masked)
    assert torch.equal(got, aug.apply(x, old))  # planned from tensors or from the host draws alike


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_output_dtype_is_the_old_one_cast(dtype):
    recipe = RECIPES["simclr"]
    draws, x = _draws(40, recipe), _images(40, 32)
    aug = BatchColorAugment(recipe, flip=False, dtype=dtype)
    got = aug.apply(x, aug.plan(draws, "cpu"))
    want = reference_apply(recipe, x, ColorAugParams.from_draws(draws, "cpu", flip=False), True, dtype)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + TOL).all()


class Recorder(TorchDispatchMode):
    """Every aten op called, with its first tensor argument's shape."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.calls.append((func.overloadpacket, None if first is None else tuple(first.shape), args))
        return func(*args, **(kwargs or {}))

    def count(self, packet) -> int:
        return sum(1 for p, _, _ in self.calls if p == packet)


def _recorded(aug: BatchColorAugment, x: torch.Tensor, draws, monkeypatch) -> tuple[Recorder, dict]:
    """The ops of ``aug.apply`` on its plan of ``draws``, and the batch sizes hue and blur ran on."""
    plan = aug.plan(draws, "cpu")
    rows = collections.defaultdict(list)
    for name in ("adjust_hue", "gaussian_blur"):
        op = getattr(batched, name)
        monkeypatch.setattr(batched, name, lambda v, values, op=op, name=name: rows[name].append(len(v)) or op(v, values))
    with Recorder() as rec:
        aug.apply(x, plan)
    return rec, rows


def test_ops_run_only_on_the_samples_that_drew_them(monkeypatch):
    """Before: a flip (and a where) over the batch even with flip=False, a blur of the whole batch,
    and hue on the whole batch at each of the four positions."""
    recipe = RECIPES["simclr"]
    n = 64
    draws, x = _draws(n, recipe, seed=5), _images(n, 32)
    rec, rows = _recorded(BatchColorAugment(recipe, flip=False), x, draws, monkeypatch)
    assert rec.count(aten.flip) == 0
    assert rows["gaussian_blur"] == [int(draws.blur.sum())]
    convs = [shape for p, shape, _ in rec.calls if p == aten.convolution]
    assert len(convs) == 2 and all(shape[1] == 3 * int(draws.blur.sum()) for shape in convs)
    # hue once per position, on the samples that have it there: each jittered sample once
    want = [int((draws.jitter & (draws.order[:, pos] == HUE)).sum()) for pos in range(4)]
    assert rows["adjust_hue"] == [w for w in want if w] and sum(want) == int(draws.jitter.sum())

    rec, _ = _recorded(BatchColorAugment(recipe, flip=True), x, draws, monkeypatch)
    flips = [shape for p, shape, _ in rec.calls if p == aten.flip]
    assert flips == [(int(draws.flip.sum()), 3, 32, 32)]

    nothing = dataclasses.replace(draws, flip=draws.flip & False, jitter=draws.jitter & False,
                                  grayscale=draws.grayscale & False, blur=draws.blur & False)
    rec, rows = _recorded(BatchColorAugment(recipe), x, nothing, monkeypatch)
    assert not rows and {p for p, _, _ in rec.calls} <= {aten._to_copy, aten.div_, aten.sub, aten.div, aten.clone,
                                                         aten.empty_like, aten.copy_}  # to float, normalise


def test_the_plan_reaches_the_device_in_one_copy():
    """``meta`` stands in for the device: every tensor of the plan is a view of one copied buffer."""
    recipe = RECIPES["strong, solarize"]
    draws = _draws(64, recipe, seed=2)
    aug = BatchColorAugment(recipe)
    with Recorder() as rec:
        plan = aug.plan(draws, "meta")
    copies = [args for p, _, args in rec.calls if p in (aten._to_copy, aten.copy_)
              and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)]
    assert len(copies) == 1
    leaves = [t for t in _tensors(plan)]
    assert len(leaves) > 10 and all(t.device.type == "meta" for t in leaves)
    assert len({t.untyped_storage().data_ptr() for t in leaves}) == 1


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple):
        for o in obj:
            yield from _tensors(o)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def test_applying_a_plan_never_waits_for_the_device():
    recipe = RECIPES["strong, solarize"]
    draws, x = _draws(48, recipe, seed=4), _images(48, 40)
    aug = BatchColorAugment(recipe, dtype=torch.bfloat16)
    plan = aug.plan(draws, "cpu")
    with host_syncs_forbidden():
        aug.apply(x, plan)


def test_the_colour_stage_does_not_write_into_float_input():
    recipe = RECIPES["jitter always"]
    draws = _draws(16, recipe, seed=1)
    x = _images(16, 32).float() / 255
    x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    aug = BatchColorAugment(recipe)
    aug.apply(x, aug.plan(draws, "cpu"))
    assert torch.equal(x, before)
