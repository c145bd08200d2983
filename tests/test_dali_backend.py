"""DALI backend on CPU: parameter distributions against torchvision, each DALI op against
torchvision's kernel on fixed parameters, and the loader's batch contract, sharding and resume.

Pipelines are built on tiny JPEG trees (a few dozen images of 40-48 px) so
the whole file runs in well under a minute on two cores.
"""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.dali

import torchvision.transforms.v2.functional as TF  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from train.data import build_loaders  # noqa: E402
from pipelines.augment.colour_plan import BRIGHTNESS, CONTRAST, HUE, SATURATION  # noqa: E402
from pipelines.augment.dali import (  # noqa: E402
    blur_window,
    color_transform,
    hue_rotation,
    simclr_pipeline,
    view_params,
)
from pipelines.augment.draws import ViewDraws, draw_views, image_seeds  # noqa: E402
from pipelines.encoded_images import jpeg_size, pil_header  # noqa: E402
from pipelines.errors import DataError  # noqa: E402
from pipelines.image_folder import index_image_folder  # noqa: E402
from pipelines.plan import UnlabeledPlan  # noqa: E402
from pipelines.augment.recipe import SimCLRRecipe  # noqa: E402
from tests.helpers.reference_plan import reference_support, reference_unlabeled  # noqa: E402
from tests.helpers.imagefolder import make_image_folder, smooth_image  # noqa: E402
from train.config import load_config  # noqa: E402

RES = 40  # output resolution of the loader tests
NO_COLOR = ["augment.jitter_prob=0.0", "augment.grayscale_prob=0.0", "augment.blur_prob=0.0"]


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


# ---------------------------------------------------------------------------
# Host-side parameters (their distributions: tests/test_draws.py)
# ---------------------------------------------------------------------------


def _planned_draws(n: int, size: int, recipe: SimCLRRecipe) -> ViewDraws:
    seeds = image_seeds(np.uint64(3), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))
    return draw_views(seeds, 0, 1, np.full((n, 2), size), recipe)


def test_blur_window_is_odd_capped_and_identity_without_blur():
    sigma = np.linspace(0.1, 2.0, 50)
    w = blur_window(sigma, 23)
    assert (w % 2 == 1).all() and (w == np.minimum(2 * np.ceil(3 * sigma) + 1, 23)).all()
    assert blur_window(np.array([2.0]), 5)[0] == 5
    d = _planned_draws(200, 64, SimCLRRecipe())
    p = view_params(d, SimCLRRecipe())
    assert (p.blur_window[~d.blur] == 1).all() and (p.blur_window[d.blur] >= 3).all()
    # views drawn without jitter get the identity colour map, whatever factors were drawn
    assert np.allclose(p.color[~d.jitter & ~d.grayscale], np.eye(3)) and (p.offset[~d.jitter] == 0).all()


def _apply_affine(color: np.ndarray, offset: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """color @ pixel + offset @ mean colour, on float [3, H, W]."""
    m = torch.from_numpy(color).float()
    k = torch.from_numpy(offset).float()
    mean = x.mean(dim=(1, 2))
    return torch.einsum("ij,jhw->ihw", m, x) + (k @ mean)[:, None, None]


def test_color_transform_equals_torchvision_ops_in_order():
    """Without clamping (mid-range pixels, mild factors) the composed affine map is exact."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(0.35, 0.65, (3, 16, 16))).float()
    ops = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}
    for trial in range(12):
        b, c, s = rng.uniform(0.8, 1.2, 3)
        order = rng.permutation(4)
        gray = bool(trial % 3 == 0)
        color, offset = color_transform(np.array([b]), np.array([c]), np.array([s]), np.zeros(1),
                                        order[None], np.array([gray]))
        ref = x
        for op in order:
            if op != HUE:
                ref = ops[op](ref, {BRIGHTNESS: b, CONTRAST: c, SATURATION: s}[op])
        if gray:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        torch.testing.assert_close(_apply_affine(color[0], offset[0], x), ref, atol=1e-5, rtol=0)


def test_identity_factors_give_identity_transform():
    color, offset = color_transform(np.ones(3), np.ones(3), np.ones(3), np.zeros(3),
                                    np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]]), np.zeros(3, bool))
    assert (color == np.eye(3)).all() and (offset == 0).all()


def _yiq_rotation(shift: float) -> np.ndarray:
    """DALI's fn.hue / fn.hsv: rotation of the chroma plane of YIQ by -360 shift degrees."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    t = -2 * np.pi * shift
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return np.linalg.inv(yiq) @ rot @ yiq


def test_hue_rotation_approximates_torchvision_hue():
    # A third of the circle permutes the channels exactly, as HSV does.
    x = torch.rand(3, 8, 8)
    rot = torch.from_numpy(hue_rotation(np.array([1 / 3]))[0]).float()
    torch.testing.assert_close(torch.einsum("ij,jhw->ihw", rot, x), TF.adjust_hue(x, 1 / 3), atol=1e-5, rtol=0)
    # Elsewhere it is an approximation (HSV's shift is not linear): on saturated synthetic
    # images, errors of several levels, below those of DALI's own YIQ rotation.
    ours, dali = [], []
    for seed in range(3):
        img = torch.from_numpy(smooth_image(np.random.default_rng(seed), 48)).permute(2, 0, 1).float() / 255
        for shift in (0.02, -0.05, 0.1, -0.2):
            ref = TF.adjust_hue(img, shift)
            for errs, m in ((ours, hue_rotation(np.array([shift]))[0]), (dali, _yiq_rotation(shift))):
                out = torch.einsum("ij,jhw->ihw", torch.from_numpy(m).float(), img).clamp(0, 1)
                errs.append(float((out - ref).abs().mean()) * 255)
    assert np.mean(ours) < 0.75 * np.mean(dali) and max(ours) < 16, (ours, dali)


# ---------------------------------------------------------------------------
# The DALI graph against torchvision kernels, on fixed parameters
# ---------------------------------------------------------------------------


def _jpeg(img: np.ndarray, quality: int = 95) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _fixed_draws(n: int, size: int) -> ViewDraws:
    ones = np.ones(n)
    return ViewDraws(crop=np.tile([0, 0, size, size], (n, 1)), flip=np.zeros(n, bool), jitter=np.zeros(n, bool),
                     brightness=ones.copy(), contrast=ones.copy(), saturation=ones.copy(), hue=np.zeros(n),
                     order=np.tile(np.arange(4), (n, 1)), grayscale=np.zeros(n, bool), blur=np.zeros(n, bool),
                     sigma=ones.copy(), solarize=np.zeros(n, bool), threshold=ones * 0.5)


def _rotate(x: torch.Tensor, shift: float) -> torch.Tensor:
    """``hue_rotation`` on a uint8 [3, H, W] image, rounded and clamped like DALI's uint8 output."""
    m = torch.from_numpy(hue_rotation(np.array([shift]))[0]).float()
    return torch.einsum("ij,jhw->ihw", m, x.float()).round().clamp(0, 255)


def test_dali_ops_match_torchvision_on_fixed_parameters():
    size = 48
    # 13-tap blur, as at 130 px; solarize in the graph (each case switches it on or off)
    recipe = SimCLRRecipe(resolution=size, blur_kernel_fraction=0.25, solarize_prob=0.5)
    rng = np.random.default_rng(6)
    base = smooth_image(rng, size)
    jpeg = _jpeg(base)
    decoded = np.array(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))
    x = torch.from_numpy(decoded).permute(2, 0, 1).contiguous()  # uint8 [3, H, W], the reference's input

    cases = {  # name -> (change to the identity draws, torchvision reference on uint8, tolerance in levels)
        "identity": ({}, lambda t: t, 0.6),
        "crop": ({"crop": [6, 10, 20, 30]},
                 lambda t: TF.resized_crop(t, 6, 10, 20, 30, [size, size], antialias=True), 1.5),
        "flip": ({"flip": True}, TF.horizontal_flip, 0.6),
        "brightness": ({"jitter": True, "brightness": 1.5}, lambda t: TF.adjust_brightness(t, 1.5), 1.0),
        "contrast": ({"jitter": True, "contrast": 0.4}, lambda t: TF.adjust_contrast(t, 0.4), 1.0),
        "saturation": ({"jitter": True, "saturation": 1.7}, lambda t: TF.adjust_saturation(t, 1.7), 1.0),
        "not jittered": ({"brightness": 1.5, "hue": 0.2}, lambda t: t, 0.6),
        # Hue: DALI applies our linear model exactly; torchvision's HSV shift only approximately.
        "hue": ({"jitter": True, "hue": 0.1}, lambda t: _rotate(t, 0.1), 1.0),
        "hue vs torchvision": ({"jitter": True, "hue": 0.1}, lambda t: TF.adjust_hue(t, 0.1), 16.0),
        "solarize": ({"solarize": True, "threshold": 0.4}, lambda t: TF.solarize(t, 0.4 * 255), 1.0),
        "grayscale": ({"grayscale": True}, lambda t: TF.rgb_to_grayscale(t, num_output_channels=3), 1.0),
        "blur": ({"blur": True, "sigma": 1.3}, lambda t: TF.gaussian_blur(t, [13, 13], [1.3, 1.3]), 1.0),
    }
    draws = _fixed_draws(len(cases), size)
    fields = {f.name: getattr(draws, f.name).copy() for f in dataclasses.fields(draws)}
    for i, (change, _, _) in enumerate(cases.values()):
        for key, value in change.items():
            fields[key][i] = value
    params = view_params(ViewDraws(**fields), recipe)
    n = len(cases)

    def source():
        return ([jpeg] * n, np.arange(n, dtype=np.int64), *params.as_tuple(recipe))

    pipe = simclr_pipeline(source, [recipe], decoder_device="cpu", float16=False, channels_last=True,
                           batch_size=n, num_threads=1, device_id=None, seed=0)
    pipe.build()
    out, _ = pipe.run()
    views = torch.from_numpy(np.array(out.as_tensor()))  # [n, H, W, 3], normalised
    mean = torch.tensor(recipe.mean) * 255
    std = torch.tensor(recipe.std) * 255
    levels = (views * std + mean).permute(0, 3, 1, 2)  # back to 0..255, [n, 3, H, W]
    for i, (name, (_, reference, tol)) in enumerate(cases.items()):
        err = (levels[i] - reference(x).float()).abs().mean().item()
        assert err <= tol, f"{name}: mean abs difference {err:.2f} levels > {tol}"
    # Normalisation itself: identity case against torchvision's ToDtype + Normalize, in normalised units.
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(recipe.mean), list(recipe.std))
    assert (views[0].permute(2, 0, 1) - ref).abs().mean() < 0.6 / 255 / min(recipe.std)


def test_jpeg_size_reads_headers():
    img = smooth_image(np.random.default_rng(7), (37, 21))  # width 37, height 21
    for kwargs in ({}, {"progressive": True}):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", **kwargs)
        assert jpeg_size(buf.getvalue()) == (21, 37)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    assert jpeg_size(buf.getvalue()) is None and pil_header(buf.getvalue())[0] == (21, 37)


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """5 classes x 8 smooth 48x40 JPEGs (40 images)."""
    root = tmp_path_factory.mktemp("dali_tree")
    make_image_folder(root / "train", 5, 8, (48, 40), seed=0)
    return root


@pytest.fixture(scope="module")
def colour_tree(tmp_path_factory) -> Path:
    """4 classes x 6 uniformly coloured JPEGs: image i has colour ``_colour(i)``."""
    root = tmp_path_factory.mktemp("dali_colour")
    for i in range(24):
        folder = root / "train" / f"c{i // 6}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 44, 3), _colour(i), np.uint8)).save(folder / f"img{i:02d}.jpg", quality=98)
    return root


def _colour(i: int) -> tuple[int, int, int]:
    return 30 + 8 * i, 220 - 7 * i, 60 + 5 * (i % 7)


def _cfg(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", "data.backend=dali", "data.num_workers=2",
                              f"augment.resolution={RES}", "data.unlabeled_batch_size=6", "data.support_classes=3",
                              "data.support_images_per_class=2", "data.labeled_fraction=0.5",
                              "run.knn_every_epochs=0", *extra])


def _loader(root: Path, *extra: str, rank: int = 0, world: int = 1, dtype=torch.float32):
    return build_loaders(_cfg(root, *extra), rank, world, torch.device("cpu"), dtype).train


def _epoch(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return list(loader)


def test_batch_contract_shapes_dtypes_layout(tree):
    loader = _loader(tree, "data.support_views=2", dtype=torch.bfloat16)
    assert len(loader) == 40 // 6
    loader.set_epoch(0)
    it = iter(loader)
    batch = next(it)
    it.close()
    batch.validate()
    assert batch.view1.shape == (6, 3, RES, RES) and batch.view1.dtype == torch.bfloat16
    for x in (batch.view1, batch.view2, batch.support_images):
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert batch.support_images.shape == (3 * 2 * 2, 3, RES, RES)  # C x K x V
    assert not torch.equal(batch.view1, batch.view2)
    assert not torch.equal(batch.support_images[0], batch.support_images[1])  # two views of one image
    labels = batch.support_labels.view(3, 4)  # class-major: K x V entries per class
    assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == 3
    assert batch.sample_ids.dtype == torch.int64 and len(set(batch.sample_ids.tolist())) == 6
    # Normalised like the reference: roughly zero-mean, unit-scale values.
    assert batch.view1.float().abs().max() < 3.0


def test_ids_and_labels_match_the_images(colour_tree):
    loader = _loader(colour_tree, *NO_COLOR, "augment.flip_prob=0.5")
    index = index_image_folder(colour_tree / "train")  # sample i is img{i:02d}.jpg
    recipe = SimCLRRecipe()
    mean, std = torch.tensor(recipe.mean) * 255, torch.tensor(recipe.std) * 255
    palette = torch.tensor([_colour(i) for i in range(24)], dtype=torch.float32)

    def colour_ids(x: torch.Tensor) -> torch.Tensor:
        """The sample whose colour each image has."""
        rgb = x.float().mean(dim=(2, 3)) * std + mean
        return torch.cdist(rgb, palette).argmin(dim=1)

    for batch in _epoch(loader, 1)[:2]:
        assert torch.equal(colour_ids(batch.view1), batch.sample_ids)
        assert torch.equal(colour_ids(batch.view2), batch.sample_ids)
        support_ids = colour_ids(batch.support_images)
        assert torch.equal(torch.from_numpy(index.labels[support_ids.numpy()]), batch.support_labels)


def test_same_images_per_step_as_torch_backend(tree):
    cfg = _cfg(tree)
    index = index_image_folder(tree / "train")
    expected = reference_unlabeled(len(index), 6, 1, 2, cfg.run.seed, 3)
    ours = _loader(tree, rank=1, world=2)
    assert [batch.sample_ids.tolist() for batch in _epoch(ours, 3)] == expected

    loader = _loader(tree)
    support = loader.plan.support
    expected = reference_support(support.sampler, support.labeled, 2 * len(loader), len(loader))  # epoch 2
    loader.support_steps.epoch = 2
    assert [loader.support_steps(step)[0].tolist() for step in range(len(loader))] == expected


def test_two_ranks_disjoint_complete_and_equal_length(tree):
    loaders = [_loader(tree, "loss.suncet_weight=0.0", rank=r, world=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (40 // 2) // 6
    ids = [torch.cat([b.sample_ids for b in _epoch(loader, 0)]) for loader in loaders]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    assert len(set(ids[0].tolist())) == len(ids[0]) == 3 * 6
    # Complete: every image appears on some rank across epochs, and a whole epoch is
    # covered when batches divide the data (pure host plan, checked over 40 images).
    plans = [UnlabeledPlan(40, 5, r, 2, 0).batches(0) for r in range(2)]
    assert sorted(np.concatenate([p.ravel() for p in plans]).tolist()) == list(range(40))
    seen = set()
    for epoch in range(3):
        seen |= {int(i) for r in range(2) for i in UnlabeledPlan(40, 6, r, 2, 0).batches(epoch).ravel()}
    assert seen == set(range(40))


def test_resume_continues_the_stream(tree):
    first = _loader(tree)
    full = _epoch(first, 1)
    # Abandon the next pass after one batch: the loader must drain and restart cleanly.
    first.set_epoch(1)
    it = iter(first)
    next(it)
    it.close()
    resumed_same = _epoch(first, 1, 3)
    resumed_fresh = _epoch(_loader(tree), 1, 3)  # a new process would rebuild the loader
    assert [b.step for b in resumed_fresh] == list(range(3, len(first)))
    for tail in (resumed_same, resumed_fresh):
        for a, b in zip(full[3:], tail, strict=True):
            for name in ("view1", "view2", "support_images", "support_labels", "sample_ids"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
    # Another epoch gives other images and views.
    other = _epoch(first, 2)
    assert not torch.equal(other[0].sample_ids, full[0].sample_ids)
    assert _epoch(first, 1, len(first)) == []


def test_converted_shards_give_the_same_stream(tree, tmp_path):
    from tools.convert_imagenet import ConvertOptions, convert

    out = tmp_path / "converted"
    convert(ConvertOptions(src=str(tree), out=str(out), splits=("train",), formats=("dali",),
                           labeled_fraction=0.5, shard_size=16, shard_multiple=1, jobs=1, progress=False))
    from_shards = _epoch(_loader(out), 0)[:2]
    from_files = _epoch(_loader(tree), 0)[:2]
    for a, b in zip(from_shards, from_files):
        assert torch.equal(a.sample_ids, b.sample_ids)
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
        assert torch.equal(a.support_labels, b.support_labels)
    loaders = build_loaders(_cfg(out), 0, 1, torch.device("cpu"))
    assert loaders.num_classes == 5 and loaders.num_labeled == 20


def test_data_errors(tree, tmp_path):
    with pytest.raises(DataError, match="cannot fill one batch"):
        _loader(tree, "data.unlabeled_batch_size=41")
    with pytest.raises(DataError):
        _loader(tmp_path)


# ---------------------------------------------------------------------------
# Bad data at training time
# ---------------------------------------------------------------------------


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _garble(path: Path) -> None:
    """Corrupt the Huffman tables but keep every segment length, the scan and the end
    marker: the host-side structure checks pass, decoding fails."""
    data = bytearray(path.read_bytes())
    pos = data.index(b"\xff\xc4")
    while pos < data.index(b"\xff\xda"):  # every DHT segment before the scan
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        data[pos + 5 : pos + 2 + length] = bytes((b * 7 + 13) % 256 for b in data[pos + 5 : pos + 2 + length])
        pos += 2 + length
    path.write_bytes(bytes(data))


def test_bad_files_are_named_or_skipped(tree, tmp_path):
    root = _copy_tree(tree, tmp_path / "tree")
    index = index_image_folder(root / "train")
    truncated, garbled = 5, 17
    path = root / "train" / index.paths[truncated]
    path.write_bytes(path.read_bytes()[:200])
    loader = _loader(root, "loss.suncet_weight=0.0")
    order = UnlabeledPlan(len(index), 6, 0, 1, 0).batches(0)
    with pytest.raises(DataError, match=index.paths[truncated] + ".*truncated"):
        _epoch(loader, 0)
    # skip: replaced by the next image, named once per use, never seen itself.
    batches = _epoch(_loader(root, "loss.suncet_weight=0.0", "data.on_bad_image=skip"), 0)
    named = [(b.step, n) for b in batches for n in b.bad_images]
    step = int(np.argwhere(order == truncated)[0, 0]) if truncated in order else None
    assert [s for s, _ in named] == ([step] if step is not None else [])
    assert all(index.paths[truncated] in n for _, n in named)
    assert truncated not in torch.cat([b.sample_ids for b in batches]).tolist()
    # Corrupt Huffman tables pass the host-side checks; DALI's decoder fails and the
    # error names the file, found by decoding the step's images on the host.
    _garble(root / "train" / index.paths[garbled])
    epoch = next(e for e in range(10) if garbled in UnlabeledPlan(len(index), 6, 0, 1, 0).batches(e))
    with pytest.raises(DataError, match=index.paths[garbled] + ".*decoders.image"):
        _epoch(_loader(root, "loss.suncet_weight=0.0", "data.on_bad_image=skip"), epoch)


def test_damaged_shards_are_named(tree, tmp_path):
    from pipelines.format import layout
    from tools.convert_imagenet import ConvertOptions, convert

    out = tmp_path / "converted"
    convert(ConvertOptions(src=str(tree), out=str(out), splits=("train",), formats=("dali",),
                           labeled_fraction=0.5, shard_size=16, shard_multiple=1, jobs=1, progress=False))
    tars, _ = layout.shard_files(out, "train")
    # Opened while the shard is whole, then truncated under the running loaders.
    loader = _loader(out, "loss.suncet_weight=0.0")
    skipping = _loader(out, "loss.suncet_weight=0.0", "data.on_bad_image=skip")
    images = loader.images
    ends = images._offset + images._length
    cut = int(ends[images._shard == 1].max()) - 1  # the last member of shard 1 loses its last byte
    with open(tars[1], "r+b") as f:
        f.truncate(cut)
    lost = set(np.flatnonzero((images._shard == 1) & (ends > cut)).tolist())
    with pytest.raises(DataError, match=f"{tars[1]} is {cut} bytes, but the converter wrote"):
        _loader(out)  # refused when opened
    lost_step = None
    for epoch in range(4):
        order = UnlabeledPlan(len(images), 6, 0, 1, 0).batches(epoch)
        if lost & set(order.ravel().tolist()):
            lost_step = epoch
            break
    assert lost_step is not None
    with pytest.raises(DataError, match=f"in shard {tars[1]}.*shard ends before"):
        _epoch(loader, lost_step)
    batches = _epoch(skipping, lost_step)
    names = [n for b in batches for n in b.bad_images]
    assert len(names) == len(lost & set(order.ravel().tolist())) and all(str(tars[1]) in n for n in names)
    assert not lost & set(torch.cat([b.sample_ids for b in batches]).tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mixed_decode_matches_cpu(tree):
    cfg = _cfg(tree)
    cpu = build_loaders(cfg, 0, 1, torch.device("cpu"), torch.float16).train
    gpu = build_loaders(cfg, 0, 1, torch.device("cuda", 0), torch.float16).train
    a, b = _epoch(cpu, 0)[0], _epoch(gpu, 0)[0]
    assert b.view1.is_cuda and b.view1.dtype == torch.float16
    assert b.view1.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.sample_ids, b.sample_ids.cpu())
    # Same parameters; GPU JPEG decoding and resampling differ from the CPU's by a level or two.
    diff = (a.view1.float() - b.view1.cpu().float()).abs().mean() * 255 * min(SimCLRRecipe().std)
    assert diff < 3.0


def test_shard_images_survive_pickling(tree, tmp_path):
    import pickle

    from pipelines.encoded_images import shard_images
    from pipelines.format.converted import open_converted
    from tools.convert_imagenet import ConvertOptions, convert

    out = tmp_path / "converted"
    convert(ConvertOptions(src=str(tree), out=str(out), splits=("train",), formats=("dali",),
                           labeled_fraction=0.5, shard_size=16, shard_multiple=1, jobs=1, progress=False))
    images = shard_images(open_converted(out, "train"))
    copy = pickle.loads(pickle.dumps(images))  # what a spawned DataLoader worker receives
    for i in (0, 17, len(images) - 1):
        assert bytes(copy.read(i)) == bytes(images.read(i))
