"""The FFCV backend's decoder: one read and one JPEG decode per image, every planned view cut from it.

FFCV 1.0.2 decodes an image field once per pipeline, so two views meant two
decodes and SwAV's 2 + 6 crops eight. ``PlannedCropDecoder`` is one
operation on the ``image`` field that decodes each image once (libjpeg-turbo,
on FFCV's threads) and writes all its views, every view group at its own
resolution, into one packed uint8 row per image (``PackedViews`` says where
each view lies and unpacks the rows into the contract's tensors). Per view
it takes the planned crop box, flip and colour (``pipelines.augment.draws``,
the draws every backend takes), resizes with FFCV's own ``resize_crop``
(OpenCV, area interpolation) and, when the colour stage runs on the CPU,
applies it in place (``colour_kernels.finish_view``).

Seeds: the plan gives each image of a step ``image_seed(key, sample index,
position)``. The key is the step's (``pipelines.plan.step_key``), which
FFCV's compiled code can only receive through numba's random state:
``orders.FailFastEpochIterator`` seeds the pipeline thread with the step's
32-bit key seed before each batch, and the decoder reads the key back with
one ``np.random.random()`` before its parallel loop. The position is
``position_offset + k % position_period`` for the ``k``-th image of the batch
(support batches: the image's place in its class block; unlabeled: 0).

JPEG decode errors raise ``ValueError(DECODE_ERROR, sample index)`` after the
parallel loop (numba runs a ``prange`` loop with a second exit on one thread);
``FailFastEpochIterator`` hands it to the consumer and the backend names the
image (``sample_of_decode_error``). FFCV's own decoders ignore
libjpeg-turbo's return code and train on whatever the buffer held.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from pipelines.augment.colour_kernels import finish_view
from pipelines.augment.draws import COLOUR_SLOTS, RECIPE_SLOTS, colour_draw, crop_box, image_seed, recipe_vector, \
    view_seed
from pipelines.augment.recipe import ViewGroup
from pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():  # importing FFCV sets torch's thread count to 1
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

DECODE_ERROR = "libjpeg-turbo cannot decode the JPEG of sample"
KEY_SCALE = 9007199254740992.0  # 2 ** 53: the key is the first double of the seeded state, as 53 bits


class PackedViews:
    """Where each view of ``groups`` lies in a packed row: group ``g``'s ``count`` views of
    ``r x r x 3`` bytes each, one after another, groups in order."""

    def __init__(self, groups: Sequence[ViewGroup]):
        self.groups = tuple(groups)
        sizes = [g.count * g.resolution * g.resolution * 3 for g in self.groups]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def row_bytes(self) -> int:
        return int(self.offsets[-1])

    def group(self, rows: torch.Tensor, g: int, image_major: bool = False) -> torch.Tensor:
        """Group ``g`` of uint8 ``rows`` [B, row_bytes] as uint8 [count * B, r, r, 3], view-major
        (the contract's order) or image-major (an image's views adjacent); always a copy."""
        count, r = self.groups[g].count, self.groups[g].resolution
        x = rows[:, self.offsets[g] : self.offsets[g + 1]].view(-1, count, r, r, 3)  # [B, count, r, r, 3]
        out = torch.empty((x.shape[0] * count, r, r, 3), dtype=torch.uint8, device=rows.device)
        if image_major:
            out.view(x.shape[0], count, r, r, 3).copy_(x)
        else:
            out.view(count, x.shape[0], r, r, 3).copy_(x.transpose(0, 1))
        return out


class PlannedCropDecoder(Operation):
    """Decode once per image, then every planned view of ``groups`` (numbered from
    ``first_view``), into one packed uint8 row per image (``PackedViews``); with ``colour`` the
    views are also coloured (jitter, grayscale, blur, solarize), else only flipped."""

    def __init__(self, groups: Sequence[ViewGroup], colour: bool, first_view: int = 0,
                 position_offset: int = 0, position_period: int = 0):
        super().__init__()
        self.packed = PackedViews(groups)
        self.colour, self.first_view = colour, first_view
        self.position_offset, self.position_period = position_offset, position_period

    def declare_state_and_memory(self, previous_state: State):
        max_pixels = np.uint64(self.metadata["height"].max()) * np.uint64(self.metadata["width"].max())
        u8 = np.dtype("<u1")
        shape = (self.packed.row_bytes,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        parallel_range = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        crop_and_resize = Compiler.compile(resize_crop)
        groups = self.packed.groups
        n_groups = len(groups)
        counts = np.array([g.count for g in groups], np.int64)
        sides = np.array([g.resolution for g in groups], np.int64)
        offsets = self.packed.offsets.copy()
        kernels = np.array([g.recipe.blur_kernel_size for g in groups], np.int64)
        recipes = np.stack([recipe_vector(g.recipe) for g in groups]).reshape(n_groups, RECIPE_SLOTS)
        colour, first_view = self.colour, np.int64(self.first_view)
        position_offset, position_period = np.int64(self.position_offset), np.int64(self.position_period)
        message, key_scale, colour_slots = DECODE_ERROR, KEY_SCALE, COLOUR_SLOTS

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            n = len(batch_indices)
            key = np.uint64(np.random.random() * key_scale)  # the step's key (module docstring)
            failed = np.zeros(n, np.bool_)
            for k in parallel_range(n):  # no raise in here: numba would run the loop on one thread
                sample = batch_indices[k]
                field = metadata[sample]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = scratch[k]
                    failed[k] = decode_jpeg(data, image, height, width, height, width, 0, 0, 1, 1, False, False) != 0
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:  # stored raw
                    image = data.reshape(height, width, 3)
                if not failed[k]:
                    position = position_offset + (k % position_period if position_period > 0 else 0)
                    seed = np.uint64(image_seed(key, sample, position))  # uint64 in Python mode too
                    row = destination[k]
                    draws = np.empty(colour_slots, np.float64)
                    view = first_view
                    for g in range(n_groups):
                        r = sides[g]
                        size = r * r * 3
                        for v in range(counts[g]):
                            s = np.uint64(view_seed(seed, view))
                            top, left, h, w = crop_box(s, height, width, recipes[g])
                            start = offsets[g] + v * size
                            out = row[start : start + size].reshape(r, r, 3)
                            crop_and_resize(image, top, top + h, left, left + w, out)
                            colour_draw(s, recipes[g], draws)
                            finish_view(out, draws, kernels[g], colour)
                            view += 1
            for k in range(n):
                if failed[k]:
                    raise ValueError(message, batch_indices[k])
            return destination[:n]

        decode.is_parallel = True
        return decode


def sample_of_decode_error(exc: BaseException) -> int | None:
    """The sample index carried by this decoder's error, found along ``exc``'s causes."""
    while exc is not None:
        if isinstance(exc, ValueError) and len(exc.args) == 2 and exc.args[0] == DECODE_ERROR:
            return int(exc.args[1])
        exc = exc.__cause__
    return None
