"""Faults of the FFCV backend: a failing pipeline thread reaches the consumer
instead of hanging it, a pass stopped early can be joined, a damaged or
foreign ``.beton`` is refused by name before FFCV reads it, and an
undecodable JPEG inside it is named instead of becoming noise."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")

from pipelines.backends.ffcv.loader import int_pipeline, open_beton  # noqa: E402
from pipelines.backends.ffcv.orders import PipelineFailure, ScheduledLoader, UnlabeledSchedule  # noqa: E402
from pipelines.errors import DataError  # noqa: E402
from pipelines.format.converted import open_converted  # noqa: E402
from pipelines.plan import UnlabeledPlan  # noqa: E402
from tests.helpers.imagefolder import make_image_folder  # noqa: E402
from pipelines.format import layout  # noqa: E402
from tools.convert_imagenet import ConvertOptions, convert  # noqa: E402

with __import__("pipelines.torch_threads", fromlist=["keep_torch_threads"]).keep_torch_threads():
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

POISONED = 13  # the sample index whose batch makes the pipeline raise


class FailOnSample(Operation):
    """Copies the ``index`` field and raises (in FFCV's compiled thread) on sample ``POISONED``."""

    def generate_code(self):
        poisoned = POISONED

        def check(indices, dst):
            for i in range(indices.shape[0]):
                if indices[i, 0] == poisoned:
                    raise ValueError("poisoned sample")
                dst[i] = indices[i]
            return dst

        return check

    def declare_state_and_memory(self, previous_state):
        return dataclasses.replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape,
                                                                                    previous_state.dtype)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ffcv_faults")
    make_image_folder(root / "src" / "train", 3, 8, 24, seed=0)
    out = root / "out"
    convert(ConvertOptions(src=str(root / "src"), out=str(out), splits=("train",), formats=("ffcv",),
                           labeled_fraction=0.5, jobs=1, progress=False, compress_probability=1.0))  # all JPEG
    return out


def test_pipeline_thread_failure_reaches_the_consumer(converted):
    schedule = UnlabeledSchedule(UnlabeledPlan(24, 4, 0, 1, seed=0))
    spec = int_pipeline("index", None)
    spec.transforms.insert(0, FailOnSample())
    loader = ScheduledLoader(str(layout.beton_path(converted, "train")), schedule, num_workers=1, batches_ahead=1,
                             pipelines={"image": None, "label": None, "index": spec})
    order = schedule.plan.batches(0)
    poisoned_step = int(np.argwhere(order == POISONED)[0, 0])
    outcome: dict = {}

    def consume() -> None:
        seen = []
        try:
            for (ids,) in loader:
                seen.append(ids.view(-1).tolist())
        except PipelineFailure as exc:
            outcome["error"] = exc
        outcome["seen"] = seen

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=120)  # FFCV 1.0.2 alone would block here forever
    assert not consumer.is_alive(), "the consumer hangs on a dead FFCV pipeline thread"
    assert "poisoned sample" in str(outcome["error"]) and "train.beton" in str(outcome["error"])
    assert outcome["seen"] == order[:poisoned_step].tolist()  # every batch before the failure came out


def test_truncated_beton_is_refused_by_name(converted, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(converted, copy)
    beton = layout.beton_path(copy, "train")
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size // 2)
    with pytest.raises(DataError, match=f"{beton} is .* bytes, but the converter wrote"):
        open_beton(open_converted(copy, "train"))


def test_beton_of_another_format_version_is_refused_by_name(converted, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(converted, copy)
    beton = layout.beton_path(copy, "train")
    data = bytearray(beton.read_bytes())
    data[0:2] = (99).to_bytes(2, "little")  # the header's format version
    beton.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{beton}.*format version 99.*reads version 2"):
        open_beton(open_converted(copy, "train"))


def test_pass_stopped_with_a_full_queue_can_be_joined(converted):
    schedule = UnlabeledSchedule(UnlabeledPlan(24, 4, 0, 1, seed=0))  # 6 batches
    loader = ScheduledLoader(str(layout.beton_path(converted, "train")), schedule, num_workers=1, batches_ahead=2,
                             pipelines={"image": None, "label": None, "index": int_pipeline("index", None)})
    epoch = iter(loader)
    for _ in range(4):
        next(epoch)
    deadline = time.time() + 60
    while epoch.output_queue.qsize() < 2 and time.time() < deadline:  # the producer is done: 5, 6 queued,
        time.sleep(0.05)  # and its end-of-pass marker waits for room
    epoch.close()
    epoch.join(timeout=30)
    assert not epoch.is_alive()


def _garble_huffman_tables(data: bytearray, start: int, size: int) -> None:
    """Corrupt the Huffman tables of the JPEG at data[start:start + size], keeping every length."""
    jpeg = data[start : start + size]
    pos, scan = jpeg.index(b"\xff\xc4"), jpeg.index(b"\xff\xda")
    while pos < scan:
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        jpeg[pos + 5 : pos + 2 + length] = bytes((b * 7 + 13) % 256 for b in jpeg[pos + 5 : pos + 2 + length])
        pos += 2 + length
    data[start : start + size] = jpeg


def test_undecodable_jpeg_inside_the_beton_is_named(converted, tmp_path):
    import shutil

    import torch
    from ffcv.reader import Reader

    from pipelines.bad_images import BadImageError
    from train.data import build_loaders
    from train.config import load_config

    copy = tmp_path / "out"
    shutil.copytree(converted, copy)
    beton = layout.beton_path(copy, "train")
    reader = Reader(str(beton))
    ptr = int(reader.metadata[POISONED]["f0"]["data_ptr"])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    data = bytearray(beton.read_bytes())
    _garble_huffman_tables(data, ptr, size)
    beton.write_bytes(bytes(data))  # same size: the manifest check at open passes
    cfg = load_config(None, [f"data.root={copy}", "data.backend=ffcv", "data.num_workers=1", "augment.resolution=16",
                             "data.unlabeled_batch_size=4", "data.support_classes=2",
                             "data.support_images_per_class=2", "run.knn_every_epochs=0"])
    loader = build_loaders(cfg, 0, 1, torch.device("cpu")).train
    loader.set_epoch(0)
    name = open_converted(copy, "train").index.paths[POISONED]
    with pytest.raises(BadImageError, match=f"sample {POISONED} \\({name}\\) cannot be decoded"):
        for _ in loader:
            pass
