"""The DALI feed's CUDA costs and safety, checked on the CPU: the mean colour stays on the GPU in the
``mixed`` graph (no device-to-host copy per view), the external source's host work runs in a
thread of its own with the same batches, and DALI's zero-copy outputs stay referenced until the
device has run the step that reads them (CUDA events faked).
"""
from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.dali

from nvidia.dali import fn, pipeline_def  # noqa: E402

import pipelines.backends.dali as dali_backend  # noqa: E402
from pipelines.augment.dali import augment_view, group_view_params, simclr_pipeline, view_fields  # noqa: E402
from pipelines.augment.draws import image_seeds  # noqa: E402
from pipelines.augment.recipe import SimCLRRecipe, ViewGroup  # noqa: E402
from pipelines.prefetch import Prefetcher  # noqa: E402
from tests.helpers.imagefolder import make_image_folder, smooth_image  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import build_loaders  # noqa: E402


# --------------------------------------------------------------------------- the graph


def test_the_mixed_graph_keeps_every_image_tensor_on_the_gpu():
    """Before: each view's mean colour went through ``.cpu()`` (a GPU op feeding a CPU one)."""
    recipes = [SimCLRRecipe(resolution=32, solarize_prob=0.2)] * 2 + [SimCLRRecipe(resolution=16)] * 2
    pipe = simclr_pipeline(lambda: None, recipes, decoder_device="mixed", float16=True, channels_last=True,
                           batch_size=2, num_threads=1, device_id=0, seed=0)
    pipe._build_graph()  # the graph only: no GPU needed
    ops = list(pipe._ops)
    assert any(op.name.startswith("__Mean") for op in ops)
    on_gpu = {node.name for op in ops for node in op.outputs if node.device == "gpu"}
    for op in ops:  # ``.cpu()`` shows as a GPU op's output read on the CPU
        to_host = [node.name for node in op.inputs if node.name in on_gpu and node.device == "cpu"]
        assert not to_host, f"{op.name} reads {to_host} on the host"


def test_the_device_route_of_the_colour_map_equals_the_host_route():
    """The GPU route (mean kept where the views are, added by arithmetic ops) built on the CPU."""
    recipe = SimCLRRecipe(resolution=24, jitter_strength=1.5)
    rng = np.random.default_rng(3)
    n = 16
    images = [smooth_image(rng, (30 + i, 28)) for i in range(n)]
    sizes = np.array([img.shape[:2] for img in images])
    seeds = image_seeds(np.uint64(9), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))
    (params,) = group_view_params(seeds, sizes, [ViewGroup(1, recipe)])
    assert params.offset.any()  # contrast pulls towards some crops' means

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=0)
    def graph(mean_on_device: bool):
        x, *flat = fn.external_source(source=lambda: (images, *params.as_tuple(recipe)),
                                      num_outputs=1 + len(view_fields(recipe)), batch=True)
        return augment_view(x, dict(zip(view_fields(recipe), flat)), recipe, False, True, mean_on_device)

    outputs = []
    for on_device in (False, True):
        pipe = graph(on_device)
        pipe.build()
        (out,) = pipe.run()
        outputs.append(np.array(out.as_tensor()))
    np.testing.assert_array_equal(outputs[0], outputs[1])


# --------------------------------------------------------------------------- the prefetching thread


def test_prefetcher_makes_items_in_order_in_another_thread():
    threads = set()

    def make(i):
        threads.add(threading.get_ident())
        return i * i

    p = Prefetcher(make, range(7), depth=2)
    assert [p.next() for _ in range(7)] == [i * i for i in range(7)]
    for _ in range(2):
        with pytest.raises(StopIteration):
            p.next()
    assert threads == {p._thread.ident} and threading.get_ident() not in threads


def test_prefetcher_raises_an_error_where_its_item_was_and_makes_nothing_after_it():
    made = []

    def make(i):
        made.append(i)
        if i == 3:
            raise KeyError("image 3")
        return i

    p = Prefetcher(make, range(10), depth=4)
    assert [p.next() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="image 3"):
        p.next()
    with pytest.raises(StopIteration):
        p.next()
    p.stop()
    assert made == [0, 1, 2, 3]


def test_prefetcher_runs_at_most_depth_ahead_and_stops():
    made = []
    p = Prefetcher(made.append, range(100), depth=2)
    deadline = time.monotonic() + 10
    while len(made) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(made) == 3  # two queued, a third made and waiting for room
    p.stop()
    assert not p._thread.is_alive() and len(made) == 3
    with pytest.raises(StopIteration):
        p.next()


# --------------------------------------------------------------------------- the loader

RES = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali_feed")
    make_image_folder(root / "train", 4, 6, (40, 36), seed=1)
    return root


def _loader(root: Path, *extra: str):
    cfg = load_config(None, [f"data.root={root}", "data.backend=dali", "data.num_workers=1",
                             f"augment.resolution={RES}", "data.unlabeled_batch_size=4", "data.support_classes=2",
                             "data.support_images_per_class=2", "data.labeled_fraction=0.5",
                             "run.knn_every_epochs=0", *extra])
    return build_loaders(cfg, 0, 1, torch.device("cpu"), torch.float32).train


def test_the_feed_reads_off_the_training_thread_and_gives_the_sequential_batches(tree):
    loader = _loader(tree)
    feed = loader.unlabeled.feed
    readers = set()
    checked = feed.images.checked

    def watched(i):
        readers.add(threading.get_ident())
        return checked(i)

    feed.images.checked = watched
    loader.set_epoch(1)
    assert len(list(loader)) == len(loader)
    assert readers and threading.get_ident() not in readers  # before: DALI called the feed from here

    loader.unlabeled_steps.epoch = 2
    steps = range(1, len(loader))
    feed.start(steps)
    fed = []
    while True:
        try:
            fed.append(feed())
        except StopIteration:
            break
    assert len(fed) == len(steps)
    for step, got in zip(steps, fed):
        for a, b in zip(got, feed.batch(step)):  # images, ids, then every view's parameters
            if isinstance(a, list):
                assert all(np.array_equal(x, y) for x, y in zip(a, b))
            else:
                np.testing.assert_array_equal(a, b)


class FakeEvent:
    """A CUDA event that completes when the test says so."""

    made: list = []
    done_up_to = -1  # events with a number <= this have completed

    def __init__(self):
        self.number = len(FakeEvent.made)
        FakeEvent.made.append(self)

    def record(self):
        pass

    def query(self) -> bool:
        return self.number <= FakeEvent.done_up_to

    def synchronize(self):
        FakeEvent.done_up_to = max(FakeEvent.done_up_to, self.number)


def test_dali_outputs_stay_referenced_until_the_step_reading_them_has_run(tree, monkeypatch):
    """Before: a batch's DALI buffers went back to DALI as soon as the consumer dropped it."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "made", [])
    monkeypatch.setattr(FakeEvent, "done_up_to", -1)
    in_use = getattr(dali_backend, "OutputsInUse", object)

    class OnCuda(in_use):
        def __init__(self, device):
            super().__init__(torch.device("cuda"))

    monkeypatch.setattr(dali_backend, "OutputsInUse", OnCuda, raising=False)
    loader = _loader(tree)
    watched = []
    for stream in (loader.unlabeled, loader.support):
        real = stream.next

        def next_and_watch(real=real):
            out = real()
            watched.append([weakref.ref(t) for t in out.values()])
            return out

        monkeypatch.setattr(stream, "next", next_and_watch)

    def alive(step: int) -> bool:
        gc.collect()
        refs = watched[2 * step] + watched[2 * step + 1]  # the step's unlabeled and support outputs
        return all(r() is not None for r in refs)

    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)  # step 0, dropped at once
    next(batches)  # step 1: step 0's work is queued behind event 0, not yet complete
    next(batches)
    assert alive(0) and alive(1)
    FakeEvent.done_up_to = 0  # the device has run step 0
    next(batches)
    assert not alive(0) and alive(1) and alive(2)
    batches.close()  # the end of the pass waits for every step handed out
    assert FakeEvent.done_up_to == len(FakeEvent.made) - 1 == 3
    assert not any(alive(step) for step in range(4))
