"""FFCV backend on a tiny converted dataset whose pixels say what they are.

Every image is a coordinate map: red grows with x, green with y, and blue is
``CODE_STEP * sample index``. So a raw view (FFCV's crop, before the colour
stage) tells which sample it came from (median blue), which part of the image
was cropped (red and green at its borders) and whether it was flipped. The
loader is built once per module (FFCV compiles its pipelines with numba on first
use: ~20 s with one thread per loader, ~60 s with two, which compile parallel
loops), and its colour stage is wrapped to record the raw uint8 images; that
loader is forced onto the device colour path (``BatchColorAugment``), so that
the raw images are FFCV's crops. A second, shorter run checks the CPU default,
where the colour ops run inside FFCV (``FFCVColorAugment``).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from PIL import Image  # noqa: E402

from train.data import build_loaders  # noqa: E402
from pipelines.contract import PretrainBatch  # noqa: E402
from pipelines.errors import DataError  # noqa: E402
from pipelines.format.converted import open_converted  # noqa: E402
from pipelines.labeled import choose_labeled  # noqa: E402
from pipelines.backends.ffcv import loader as ffcv_backend  # noqa: E402
from pipelines.backends.ffcv.loader import FFCVPretrainLoader  # noqa: E402
from pipelines.backends.ffcv.decode import PlannedCropDecoder  # noqa: E402
from pipelines.backends.ffcv.orders import SupportSchedule, UnlabeledSchedule  # noqa: E402
from pipelines.plan import UnlabeledPlan  # noqa: E402
from pipelines.augment.recipe import AugmentConfig  # noqa: E402
from tests.helpers import reference_plan  # noqa: E402
from train.data import labeled_spec  # noqa: E402
from pipelines.format import layout  # noqa: E402
from tools.convert_imagenet import ConvertOptions, convert  # noqa: E402
from train.config import PretrainConfig  # noqa: E402
from tests.helpers.dist import free_port

WIDTH, HEIGHT = 64, 48  # source images
COUNTS = [12, 10, 14, 12]  # images per class: 48 in all, so 8 per step and 2 ranks divide it
CODE_STEP = 5  # blue = CODE_STEP * sample index
B, C, K, V = 8, 2, 2, 2  # unlabeled batch, support classes, images per class, views per support image
RES = 16
EPOCHS = 10  # passes recorded for the statistics (the first one pays the compilation)
CPU_COLOUR_EPOCHS = 3  # passes of the loader with the colour ops inside FFCV
RESUME_EPOCH, RESUME_STEP = 1, 2


def coordinate_image(code: int) -> np.ndarray:
    img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    img[..., 0] = np.round(np.linspace(0, 255, WIDTH))[None, :]
    img[..., 1] = np.round(np.linspace(0, 255, HEIGHT))[:, None]
    img[..., 2] = code
    return img


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ffcv")
    index = 0
    for c, count in enumerate(COUNTS):  # ImageFolder order: class folder, then file name
        folder = root / "src" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(coordinate_image(CODE_STEP * index)).save(folder / f"img_{i:02d}.JPEG", quality=95)
            index += 1
    out = root / "out"
    convert(ConvertOptions(src=str(root / "src"), out=str(out), splits=("train",), formats=("ffcv",),
                           labeled_fraction=0.5, jobs=1, progress=False))
    return out


def make_cfg(root: Path, **data) -> PretrainConfig:
    cfg = PretrainConfig()
    settings = dict(backend="ffcv", root=str(root), unlabeled_batch_size=B, support_classes=C,
                    support_images_per_class=K, support_views=V, num_workers=1)
    cfg.data = dataclasses.replace(cfg.data, **{**settings, **data})
    cfg.augment = AugmentConfig(resolution=RES)
    cfg.run.knn_every_epochs = 0
    cfg.run.seed = 3
    return cfg


class RecordingStage:
    """Wraps one of the loader's colour stages and keeps a copy of its uint8 input, as NCHW."""

    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    def __call__(self, images, seeds, image_major=False):
        self.log.append(images.permute(0, 3, 1, 2).clone())
        return self.inner(images, seeds, image_major)


@pytest.fixture(scope="module")
def run(converted):
    """One loader (colour on the device, as on a GPU), EPOCHS full passes, then a resumed pass of RESUME_EPOCH."""
    torch.set_num_threads(2)  # the converter's FFCV import set it to 1
    cfg = make_cfg(converted)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ffcv_backend, "colour_on_loader", lambda device: False)  # raw views: FFCV's crops
        loaders = build_loaders(cfg, 0, 1, torch.device("cpu"), torch.float32)
    threads_after_build = torch.get_num_threads()
    loader = loaders.train
    stages, support_stage, log = loader.stages, loader.support_stage, []
    loader.stages = [RecordingStage(stage, log) for stage in stages]
    loader.support_stage = RecordingStage(support_stage, log)
    epochs = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        log.clear()
        batches = list(loader)
        epochs.append((batches, [torch.cat(log[2 * i : 2 * i + 2]) for i in range(len(batches))]))  # views, support
    loader.stages, loader.support_stage = stages, support_stage
    loader.set_epoch(RESUME_EPOCH, RESUME_STEP)
    resumed = list(loader)
    assert not loader.colour_on_loader
    return dict(cfg=cfg, loaders=loaders, loader=loader, epochs=epochs, resumed=resumed,
                threads=(threads_after_build, torch.get_num_threads()))


@pytest.fixture(scope="module")
def cpu_colour_run(converted):
    """The CPU default: colour ops inside FFCV's pipelines, normalisation only on the step."""
    cfg = make_cfg(converted)
    loader = build_loaders(cfg, 0, 1, torch.device("cpu"), torch.float32).train
    epochs = []
    for epoch in range(CPU_COLOUR_EPOCHS):
        loader.set_epoch(epoch)
        epochs.append((list(loader), None))
    loader.set_epoch(RESUME_EPOCH, RESUME_STEP)
    return dict(cfg=cfg, loader=loader, epochs=epochs, resumed=list(loader))


def decode_ids(raw: torch.Tensor) -> torch.Tensor:
    return (raw[:, 2].flatten(1).median(dim=1).values.float() / CODE_STEP).round().long()


def crop_geometry(raw: torch.Tensor):
    """Per raw view: (area fraction, aspect ratio w/h, flipped) of the crop it was cut from."""
    r = raw[:, 0].float().mean(dim=1)  # [N, W]: red per output column
    g = raw[:, 1].float().mean(dim=2)  # [N, H]: green per output row
    # Output pixel centres span (RES - 1) / RES of the crop side; red/green are 255 across the image.
    span = (RES - 1) / RES
    w = (r[:, -1] - r[:, 0]).abs() / 255 * (WIDTH - 1) / span
    h = (g[:, -1] - g[:, 0]).abs() / 255 * (HEIGHT - 1) / span
    return (w * h / (WIDTH * HEIGHT)).numpy(), (w / h).numpy(), (r[:, -1] < r[:, 0]).numpy()


def reference_unlabeled(epoch: int, rank: int = 0, world_size: int = 1, seed: int = 3) -> list[list[int]]:
    return reference_plan.reference_unlabeled(sum(COUNTS), B, rank, world_size, seed, epoch)


def reference_support(loader: FFCVPretrainLoader, first: int, n: int) -> list[list[int]]:
    plan = loader.plan.support
    return reference_plan.reference_support(plan.sampler, plan.labeled, first, n)


# --------------------------------------------------------------------------- contract


def test_batches_follow_the_contract(run):
    assert run["loaders"].num_classes == len(COUNTS)
    assert run["loaders"].num_labeled == 24  # the converter's 50 % subset
    loader = run["loader"]
    assert len(loader) == sum(COUNTS) // B
    for epoch, (batches, _) in enumerate(run["epochs"]):
        assert [(b.epoch, b.step) for b in batches] == [(epoch, s) for s in range(len(loader))]
        for b in batches:
            assert isinstance(b, PretrainBatch)
            b.validate()
            assert b.view1.shape == (B, 3, RES, RES)
            assert b.support_images.shape == (C * K * V, 3, RES, RES)
            for t in (b.view1, b.view2, b.support_images):
                assert t.dtype == torch.float32
                assert t.is_contiguous(memory_format=torch.channels_last)
            assert b.support_labels.dtype == torch.int64 and b.sample_ids.dtype == torch.int64


def test_torch_thread_count_survives_ffcv(run):
    assert run["threads"] == (2, 2)


def test_sample_order_is_the_reference_order(run):
    for epoch, (batches, _) in enumerate(run["epochs"][:3]):
        assert [b.sample_ids.tolist() for b in batches] == reference_unlabeled(epoch)
    # every image once per epoch (48 = 6 steps x 8), reshuffled each epoch
    ids = [torch.cat([b.sample_ids for b in batches]) for batches, _ in run["epochs"][:2]]
    assert sorted(ids[0].tolist()) == list(range(sum(COUNTS)))
    assert not torch.equal(ids[0], ids[1])


def test_images_are_the_samples_named_and_labels_match_the_manifest(run, converted):
    samples = layout.read_samples(converted, "train")
    manifest_labels = torch.tensor([s["label"] for s in samples])
    loader = run["loader"]
    steps = len(loader)
    for epoch, (batches, raws) in enumerate(run["epochs"][:3]):
        for step, (b, raw) in enumerate(zip(batches, raws)):
            ids = decode_ids(raw)
            assert torch.equal(ids[:B], b.sample_ids) and torch.equal(ids[B : 2 * B], b.sample_ids)
            support_ids = ids[2 * B :]
            assert torch.equal(manifest_labels[support_ids], b.support_labels)
            # C*K images x V views, image-major: the V views of an image are adjacent
            per_image = support_ids.view(C * K, V)
            assert (per_image == per_image[:, :1]).all()
            expected = reference_support(loader, epoch * steps + step, 1)[0]
            assert per_image[:, 0].tolist() == expected
            blocks = b.support_labels.view(C, K * V)
            assert (blocks == blocks[:, :1]).all() and len(set(blocks[:, 0].tolist())) == C
            assert set(support_ids.tolist()) <= set(run["loaders"].train.plan.support.labeled.tolist())


def test_views_differ(run):
    for batches, raws in run["epochs"]:
        for b, raw in zip(batches, raws):
            assert (raw[:B] != raw[B : 2 * B]).flatten(1).any(dim=1).all()
            assert ((b.view1 - b.view2).abs().flatten(1).amax(dim=1) > 1e-3).all()


def assert_same_batches(resumed: list[PretrainBatch], full: list[PretrainBatch]) -> None:
    assert len(resumed) == len(full) > 0
    for b, ref in zip(resumed, full):
        assert (b.epoch, b.step) == (ref.epoch, ref.step)
        for name in ("sample_ids", "support_labels", "view1", "view2", "support_images"):
            assert torch.equal(getattr(b, name), getattr(ref, name)), (b.step, name)
        assert len(b.views) == len(ref.views) and all(torch.equal(x, y) for x, y in zip(b.views, ref.views))


@pytest.mark.parametrize("which", ["run", "cpu_colour_run"])
def test_resume_mid_epoch_repeats_the_uninterrupted_batches(which, request):
    """Images, crops, flips and colour draws alike: a resumed pass is the rest of the uninterrupted one."""
    run = request.getfixturevalue(which)
    assert_same_batches(run["resumed"], run["epochs"][RESUME_EPOCH][0][RESUME_STEP:])


@pytest.mark.slow
def test_resume_repeats_the_batches_with_parallel_ffcv_threads(converted):
    """Two FFCV threads: images go to numba threads in no fixed order, and each view is
    still drawn from its own seed (``decode``)."""
    from numba.core.errors import NumbaPerformanceWarning

    loader = build_loaders(make_cfg(converted, num_workers=2), 0, 1, torch.device("cpu"), torch.float32).train
    loader.set_epoch(RESUME_EPOCH)
    with warnings.catch_warnings(record=True) as caught:  # numba compiles on the first pass, in FFCV's thread
        warnings.simplefilter("always")
        full = list(loader)
    serial = [str(w.message) for w in caught if issubclass(w.category, NumbaPerformanceWarning)]
    assert not serial, serial  # e.g. a raise inside a prange loop: numba runs that loop on one thread
    loader.set_epoch(RESUME_EPOCH, RESUME_STEP)
    assert_same_batches(list(loader), full[RESUME_STEP:])


def test_augmentations_change_from_epoch_to_epoch(cpu_colour_run):
    views = [{int(i): v for b in batches for i, v in zip(b.sample_ids, b.view1)}
             for batches, _ in cpu_colour_run["epochs"][:2]]
    assert all(not torch.equal(views[0][i], views[1][i]) for i in views[0])


def test_schedules_are_pure_functions_of_the_step(run):
    loader = run["loader"]
    u = UnlabeledSchedule(UnlabeledPlan(sum(COUNTS), B, 0, 1, 3))
    u.set_epoch(4, 5)
    assert u.order().reshape(-1, B).tolist() == reference_unlabeled(4)[5:]
    s = SupportSchedule(loader.plan.support)
    s.set_range(37, 20)  # crosses several sampler epochs
    assert s.order().reshape(-1, C * K).tolist() == reference_support(loader, 37, 20)


def test_stopping_early_stops_ffcv_threads_and_the_next_pass_is_whole(run):
    loader = run["loader"]
    before = threading.active_count()
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)
    it.close()
    assert threading.active_count() <= before
    again = list(loader)  # same epoch from its start
    assert torch.equal(again[0].sample_ids, first.sample_ids) and len(again) == len(loader)
    loader.set_epoch(0, len(loader))  # an epoch already finished
    assert list(loader) == []


def test_cpu_default_runs_the_colour_ops_inside_ffcv(cpu_colour_run):
    loader = cpu_colour_run["loader"]
    assert loader.colour_on_loader and all(stage.on_loader for stage in loader.stages + [loader.support_stage])
    for ffcv_loader in (loader.unlabeled, loader.support):
        images = [spec for spec in ffcv_loader.pipeline_specs.values() if spec.source == "image"]
        assert len(images) == 1  # one read and one decode of each image
        decoder = images[0].decoder
        assert isinstance(decoder, PlannedCropDecoder) and decoder.colour
        assert all(g.recipe == cpu_colour_run["cfg"].augment.base_recipe() for g in decoder.packed.groups)
    for epoch, (batches, _) in enumerate(cpu_colour_run["epochs"]):
        assert [b.sample_ids.tolist() for b in batches] == reference_unlabeled(epoch)
        for b in batches:
            b.validate()
            assert b.view1.shape == (B, 3, RES, RES) and b.support_images.shape == (C * K * V, 3, RES, RES)
            for t in (b.view1, b.view2, b.support_images):
                assert t.dtype == torch.float32 and t.is_contiguous(memory_format=torch.channels_last)
            assert ((b.view1 - b.view2).abs().flatten(1).amax(dim=1) > 1e-3).all()


# --------------------------------------------------------------------------- augmentation statistics


def test_crop_and_flip_statistics_match_the_recipe(run):
    raw = torch.cat([torch.cat(raws) for _, raws in run["epochs"]])
    area, ratio, flipped = crop_geometry(raw)
    n = len(area)
    assert n == EPOCHS * len(run["loader"]) * (2 * B + C * K * V)
    # Reference: torchvision's sampler on the same image size.
    from torchvision.transforms import RandomResizedCrop

    recipe = run["cfg"].augment
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, HEIGHT, WIDTH), list(recipe.crop_scale),
                                                 list(recipe.crop_ratio))[2:] for _ in range(20000)], dtype=float)
    ref_area, ref_ratio = ref[:, 0] * ref[:, 1] / (WIDTH * HEIGHT), ref[:, 1] / ref[:, 0]
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.05, q
        assert abs(np.log(np.quantile(ratio, q) / np.quantile(ref_ratio, q))) < 0.05, q
    assert area.min() > recipe.crop_scale[0] * 0.7 and area.max() < 1.05
    assert abs(flipped.mean() - recipe.flip_prob) < 5 * np.sqrt(0.25 / n)


@pytest.mark.parametrize("which", ["run", "cpu_colour_run"])
def test_grayscale_fraction_matches_the_recipe_per_sample(which, request):
    run = request.getfixturevalue(which)
    recipe = run["cfg"].augment
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    gray_per_batch = []
    for batches, _ in run["epochs"]:
        for b in batches:
            x = torch.cat([b.view1, b.view2, b.support_images]) * std + mean
            gray_per_batch.append(((x - x.mean(dim=1, keepdim=True)).abs().flatten(1).amax(dim=1) < 1e-4).float())
    gray = torch.cat(gray_per_batch)
    p, n = recipe.grayscale_prob, len(gray)
    assert abs(gray.mean().item() - p) < 5 * np.sqrt(p * (1 - p) / n)
    mixed = sum(0 < g.mean() < 1 for g in gray_per_batch)
    assert mixed >= 0.8 * len(gray_per_batch)  # drawn per sample, not once per batch


# --------------------------------------------------------------------------- numba's shared types


def test_building_a_loader_leaves_numbas_shared_types_alone(converted):
    """FFCV 1.0.2 set ``mutable = False`` on numba's shared ``uint8[::1]`` whenever it built a
    loader. Functions compiled for that type before then (our colour kernels, when a second
    loader was built) held dictionary keys whose hash had changed, and numba raised KeyError
    the next time it typed a call to them."""
    from numba import njit, uint8

    @njit
    def first(a):
        return a[0]

    @njit
    def first_plus(a, b):  # typing this call walks ``first``'s compiled signatures
        return first(a) + b

    assert first(np.arange(3, dtype=np.uint8)) == 0  # compiled for the shared uint8[::1]
    shared = uint8[::1]
    build_loaders(make_cfg(converted), 0, 1, torch.device("cpu"), torch.float32)
    assert shared.mutable and uint8[::1] is shared
    assert first_plus(np.arange(3, dtype=np.uint8), 1) == 1


def test_ordered_graph_has_ffcvs_stages_in_a_fixed_order(run):
    """``OrderedGraph`` only fixes the order inside FFCV's stages (a resumed run in another
    process draws in the same order; ``test_stream_resume`` checks that across processes)."""
    from ffcv.pipeline.graph import Graph

    for loader in (run["loader"].unlabeled, run["loader"].support):
        ours, theirs = loader.graph.group_operations(), Graph.group_operations(loader.graph)
        assert [sorted(stage) for stage in ours] == [sorted(stage) for stage in theirs]
        assert ours == loader.graph.group_operations()
        for stage in ours:  # each node after its parent, lowest id first: here, creation order
            assert stage == sorted(stage)


# --------------------------------------------------------------------------- data selection (no loader built)


def test_missing_conversion_is_named(tmp_path):
    with pytest.raises(DataError, match="convert_imagenet"):
        open_converted(tmp_path, "train")


def test_labeled_list_overrides_the_converter_subset(converted, tmp_path):
    split = open_converted(converted, "train")
    assert split.index.classes == tuple(layout.read_classes(converted))
    assert split.labeled.tolist() == layout.read_labeled(converted, "train")
    listing = tmp_path / "labeled.txt"
    listing.write_text("n00000001/img_03.JPEG\nn00000000/img_00.JPEG\n")
    cfg = make_cfg(converted, labeled_list=str(listing))
    chosen = choose_labeled(labeled_spec(cfg), split.index.paths, split.index.labels, "train", split.labeled)
    assert chosen.tolist() == [0, COUNTS[0] + 3]


# --------------------------------------------------------------------------- two ranks


def _worker(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        cfg = make_cfg(Path(root), support_views=1)
        loader = build_loaders(cfg, rank, world_size, torch.device("cpu")).train
        steps = torch.tensor([len(loader)])
        all_steps = [torch.zeros_like(steps) for _ in range(world_size)]
        dist.all_gather(all_steps, steps)
        loader.set_epoch(1)
        batches = list(loader)
        ids = torch.stack([b.sample_ids for b in batches])
        all_ids = [torch.zeros_like(ids) for _ in range(world_size)]
        dist.all_gather(all_ids, ids)
        labels = torch.stack([b.support_labels for b in batches])
        if rank == 0:
            torch.save({"steps": torch.cat(all_steps), "ids": torch.stack(all_ids), "labels": labels},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_gloo_ranks_cover_the_dataset_disjointly(converted, tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(converted), str(tmp_path)), nprocs=world, join=True)
    result = torch.load(tmp_path / "result.pt")
    steps = sum(COUNTS) // world // B
    assert result["steps"].tolist() == [steps] * world
    ids = result["ids"]  # [rank, step, B]
    assert ids.shape == (world, steps, B)
    assert sorted(ids.flatten().tolist()) == list(range(sum(COUNTS)))  # disjoint and complete
    for rank in range(world):
        assert ids[rank].tolist() == reference_unlabeled(1, rank, world)
    assert result["labels"].shape == (steps, C * K)
