"""Multi-crop on every backend: the same view groups, in the contract's order, with the plan's
crops, from one decode per image.

The images are coordinate maps (red grows with x, green with y, blue codes the
sample), so a view shows which box it was cut from: one pixel of shift changes
it by about 1.5 grey levels on average. Each backend's views (colour off) are
compared with an independent reference: the source image decoded by PIL, cut
at the plan's box (``pipelines.augment.draws``) and resized by torchvision's
``resized_crop`` with antialiasing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipelines.augment.draws import draw_views
from pipelines.image_folder import index_image_folder
from train.config import load_config
from train.data import build_loaders

WIDTH, HEIGHT = 64, 48
CLASSES, PER_CLASS, B, C, K = 4, 6, 6, 2, 2
GROUPS = ((2, 24), (3, 12))  # (count, resolution)
VIEWS = ("augment.views=[{count: 2, resolution: 24, crop_scale: [0.3, 1.0]}, "
         "{count: 3, resolution: 12, crop_scale: [0.1, 0.3]}]")
NO_COLOUR = ["augment.jitter_prob=0.0", "augment.grayscale_prob=0.0", "augment.blur_prob=0.0"]
CROP_TOLERANCE = 1.0  # mean grey levels; the backends measured 0.05-0.7, a one-pixel shift ~1.5
BACKENDS = ("torch", "dali", "ffcv")


def coordinate_image(code: int) -> np.ndarray:
    img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    img[..., 0] = np.round(np.linspace(0, 255, WIDTH))[None, :]
    img[..., 1] = np.round(np.linspace(0, 255, HEIGHT))[:, None]
    img[..., 2] = code
    return img


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multicrop")
    index = 0
    for c in range(CLASSES):
        folder = root / "src" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(coordinate_image(10 * index)).save(folder / f"img_{i:02d}.JPEG", quality=95)
            index += 1
    roots = {"torch": root / "src", "dali": root / "src"}
    if _installed("ffcv"):
        from tools.convert_imagenet import ConvertOptions, convert

        # "ffcv": pixels stored raw, as PIL decoded them (the crop tests compare pixels with PIL's decode);
        # "ffcv-jpeg": every image re-encoded as JPEG (the decode count)
        for name, jpeg in (("ffcv", 0.0), ("ffcv-jpeg", 1.0)):
            convert(ConvertOptions(src=str(root / "src"), out=str(root / name), splits=("train",), formats=("ffcv",),
                                   labeled_fraction=0.5, jobs=1, progress=False, compress_probability=jpeg))
            roots[name] = root / name
    return roots


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _require(backend: str) -> None:
    if backend != "torch":
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])


def _cfg(data: dict[str, Path], backend: str, *extra: str, root: str | None = None):
    return load_config(None, [f"data.backend={backend}", f"data.root={data[root or backend]}", f"data.unlabeled_batch_size={B}",
                              f"data.support_classes={C}", f"data.support_images_per_class={K}", "data.num_workers=1",
                              "data.labeled_fraction=0.5", "run.knn_every_epochs=0", VIEWS, *extra])


def _loader(data, backend, *extra, root: str | None = None):
    return build_loaders(_cfg(data, backend, *extra, root=root), 0, 1, torch.device("cpu")).train


def _levels(x: torch.Tensor, cfg) -> torch.Tensor:
    """Normalised views back to 0..255."""
    mean, std = torch.tensor(cfg.augment.mean).view(1, 3, 1, 1), torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    return (x.float() * std + mean) * 255


def _reference_views(sources: list[torch.Tensor], ids: np.ndarray, seeds: np.ndarray, shift: int = 0) -> list:
    """Each group's views of ``ids`` as the plan cuts them, by torchvision, view-major;
    ``shift`` moves every box that many pixels sideways (the control)."""
    groups = _cfg({"torch": Path(".")}, "torch").augment.view_groups()
    out, first = [], 0
    for group in groups:
        d = draw_views(seeds, first, group.count, np.tile([[HEIGHT, WIDTH]], (len(ids), 1)), group.recipe)
        views = []
        for row in range(len(d)):
            top, left, h, w = (int(x) for x in d.crop[row])
            left = left + shift if left + shift + w <= WIDTH else left - shift
            v = TF.resized_crop(sources[ids[row % len(ids)]], top, left, h, w, [group.resolution] * 2, antialias=True)
            views.append(TF.horizontal_flip(v) if d.flip[row] else v)
        out.append(torch.stack(views).float())
        first += group.count
    return out


@pytest.fixture(scope="module")
def plain_batches(data):
    """Two steps of epoch 1 from each installed backend, colour off."""
    out = {}
    for backend in BACKENDS:
        if backend in data:
            loader = _loader(data, backend, *NO_COLOUR)
            loader.set_epoch(1)
            out[backend] = (list(loader)[:2], loader.plan)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_come_in_the_contracts_shapes_and_order(backend, data, plain_batches):
    _require(backend)
    batches, plan = plain_batches[backend]
    for step, batch in enumerate(batches):
        batch.validate(groups=GROUPS)
        assert [tuple(x.shape) for x in batch.views] == [(n * B, 3, r, r) for n, r in GROUPS]
        assert batch.support_images.shape == (C * K, 3, 24, 24)  # the support views take group 0's recipe
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in batch.views)
        assert batch.sample_ids.tolist() == plan.unlabeled.batches(1)[step].tolist()  # the plan's images


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_are_the_plans_crops_of_each_group(backend, data, plain_batches):
    """Row ``v * B + i`` of group g is view v of image i, cut where the plan says, flipped where it
    says: within the backend's resampling, and far from the same crops one pixel off."""
    _require(backend)
    batches, plan = plain_batches[backend]
    cfg = _cfg(data, backend)
    index = index_image_folder(data["torch"] / "train")
    sources = [torch.from_numpy(np.array(Image.open(data["torch"] / "train" / p).convert("RGB"))).permute(2, 0, 1)
               for p in index.paths]
    for batch in batches:
        ids = batch.sample_ids.numpy()
        seeds = plan.unlabeled.image_seeds(1, ids)
        reference, shifted = _reference_views(sources, ids, seeds), _reference_views(sources, ids, seeds, shift=1)
        for g, (ours, ref, off) in enumerate(zip(batch.views, reference, shifted)):
            err = (_levels(ours, cfg) - ref).abs().mean().item()
            control = (off - ref).abs().mean().item()
            assert err < CROP_TOLERANCE < control, (g, err, control)


@pytest.fixture(scope="module")
def coloured_batches(data):
    """Two steps from each installed backend with grayscale, blur, solarize and flips, no jitter
    (the jitter ops are compared op by op: test_dali_backend, test_colour_kernels)."""
    extra = ["augment.jitter_prob=0.0", "augment.solarize_prob=0.3"]
    out = {}
    for backend in BACKENDS:
        if backend in data:
            loader = _loader(data, backend, *extra)
            loader.set_epoch(0)
            out[backend] = list(loader)[:2]
    return out


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_each_group_matches_the_torch_backend_with_colour(backend, data, coloured_batches):
    _require(backend)
    cfg = _cfg(data, "torch")
    for ours, ref in zip(coloured_batches[backend], coloured_batches["torch"]):
        assert torch.equal(ours.sample_ids, ref.sample_ids)
        for g, (x, y) in enumerate(zip(ours.views + (ours.support_images,), ref.views + (ref.support_images,))):
            err = (_levels(x, cfg) - _levels(y, cfg)).abs().mean().item()
            assert err < CROP_TOLERANCE, (g, err)


# --------------------------------------------------------------------------- one decode per image


def test_torch_backend_decodes_each_image_once_per_step(data, monkeypatch):
    import pipelines.backends.torch as backend

    opened = []
    real = backend.open_rgb
    monkeypatch.setattr(backend, "open_rgb", lambda path: opened.append(path) or real(path))
    loader = _loader(data, "torch", "data.num_workers=0")
    loader.set_epoch(0)
    batches = list(loader)
    assert len(opened) == len(batches) * (B + C * K)  # 5 views of each unlabeled image, one decode


def test_dali_graph_holds_one_decoder_fed_once_per_image(data):
    _require("dali")
    loader = _loader(data, "dali")
    for stream, images in ((loader.unlabeled, B), (loader.support, C * K)):
        ops = [str(op.spec).splitlines()[0] for op in stream.iterator._pipes[0]._ops]
        assert sum("decoders__Image" in op for op in ops) == 1, ops
        assert sum("Resize" in op for op in ops) == stream.feed.views  # one crop per view, from that decode
        stream.feed.start(range(1))
        encoded, ids, *params = stream.feed()
        assert len(encoded) == len(ids) == images


def test_ffcv_decodes_each_image_once_per_step(data, monkeypatch):
    """FFCV run as plain Python (its ``Compiler`` disabled), libjpeg-turbo's decode counted."""
    _require("ffcv")
    import pipelines.backends.ffcv.decode as decode
    from ffcv.pipeline.compiler import Compiler

    calls = []
    real = decode.imdecode
    monkeypatch.setattr(decode, "imdecode", lambda *args: calls.append(1) or real(*args))
    Compiler.set_enabled(False)
    try:
        loader = _loader(data, "ffcv", root="ffcv-jpeg")
        loader.set_epoch(0)
        batches = list(loader)
    finally:
        Compiler.set_enabled(True)
    assert len(calls) == len(batches) * (B + C * K)  # every image stored as JPEG (compress_probability 1)
    assert [tuple(x.shape) for x in batches[0].views] == [(n * B, 3, r, r) for n, r in GROUPS]
