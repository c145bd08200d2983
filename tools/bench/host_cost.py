"""``--mode host``: the host's CPU time per unlabeled image of each loader backend as it is
configured on a GPU, from which ``tools.bench.report.add_host_cores`` derives the cores one GPU needs.

On a GPU machine each backend runs as training runs it, and the figure is the CPU time of this
process and its workers. On a machine without one, each backend is built as on a GPU and the
device's share of the work is left out, so that a CPU-only machine can say what a GPU node's host
will spend:

- torch: the DataLoader workers decode, cut, flip and colour every view, as on a GPU; the main
  process takes the uint8 batches as they come (on a GPU it only copies and normalises them there);
- FFCV: FFCV's threads decode, crop and flip (``colour_on_loader`` false, as on a GPU) and the main
  thread draws and plans every view's colour parameters, as on a GPU; ``BatchColorAugment.apply``,
  the device's work, is left out;
- DALI: on a GPU the whole graph (``mixed`` decode, every view's augmentation) runs on the device
  and the host's share is the feed, the ``external_source`` callbacks (the plan, each image's bytes
  read and checked, every view's parameters), called here directly, without the graph.

Not counted on a CPU: the host's cost of launching the device's work (kernel launches, in the
training process), and for DALI any JPEG decoding that its ``mixed`` decoder leaves to CPU threads
(Huffman decoding where the GPU's hardware JPEG decoder is not used).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pipelines.contract import PretrainLoader
from tools.bench.measure import endless


class HostSideOnly:
    """Stands for the device's colour stage on a CPU: the host's part (planning each batch's
    parameters, and anything else the stage does) runs as on a GPU; ``apply``, the device's
    work, returns the images as they came."""

    def __init__(self, augment):
        self.augment = augment

    def __getattr__(self, name: str):
        return getattr(self.augment, name)

    def apply(self, images: torch.Tensor, params) -> torch.Tensor:
        return images


@contextlib.contextmanager
def built_as_on_gpu(backend: str, device: torch.device) -> Iterator[None]:
    """Around building ``backend``'s loader: on a CPU, FFCV leaves the colour stage to the device."""
    if backend != "ffcv" or device.type != "cpu":
        yield
        return
    from pipelines.backends.ffcv import loader as ffcv_loader

    decide = ffcv_loader.colour_on_loader
    ffcv_loader.colour_on_loader = lambda device: False
    try:
        yield
    finally:
        ffcv_loader.colour_on_loader = decide


def host_batches(loader: PretrainLoader, backend: str, device: torch.device) -> Iterator:
    """What the host produces per step for ``loader`` (built under ``built_as_on_gpu``), endlessly."""
    if device.type != "cpu":
        return endless(loader)
    if backend == "dali":
        return dali_feed(loader)
    if backend == "ffcv":
        stages = list(loader.stages) + ([loader.support_stage] if loader.support is not None else [])
        if any(stage.on_loader for stage in stages):
            raise RuntimeError("the FFCV loader coloured its views on the host: built outside built_as_on_gpu?")
        for stage in stages:
            stage.augment = HostSideOnly(stage.augment)
    elif backend == "torch":
        loader._to_device = lambda images, recipe: images  # the GPU's copy and normalisation
    return endless(loader)


def dali_feed(loader) -> Iterator[list[tuple]]:
    """The DALI loader's ``external_source`` callbacks (unlabeled and support) for each step,
    epoch after epoch, as its graph would call them; the graph itself does not run."""
    streams = [(loader.unlabeled.feed, loader.unlabeled_steps)]
    if loader.support is not None:
        streams.append((loader.support.feed, loader.support_steps))
    epoch = 0
    while True:
        for feed, steps in streams:
            steps.epoch = epoch
            feed.start(range(len(loader)))
        for _ in range(len(loader)):
            yield [feed() for feed, _ in streams]
        epoch += 1
