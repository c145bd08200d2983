"""FFCV's random-resized-crop decoder, with JPEG decode errors raised instead of ignored.

FFCV 1.0.2's ``RandomResizedCropRGBImageDecoder`` drops libjpeg-turbo's
return code: the bytes of a damaged JPEG inside a ``.beton`` decode into
whatever the buffer held, and training goes on with noise. This decoder is
the same decode-crop-resize per image, on FFCV's threads, but a failed decode
raises ``ValueError(DECODE_ERROR, sample index)`` in FFCV's pipeline thread;
``FailFastEpochIterator`` hands it to the consumer, and the backend names the
image (``sample_of_decode_error``). The error is raised after the parallel
loop: numba runs a ``prange`` loop with a second exit (a ``raise``) on one
thread, which an earlier version of this decoder did with any number of
FFCV workers.

FFCV draws each crop inside the parallel loop, from the random state of
whichever numba thread runs that image, so crops are not reproducible. Here
one seed per image is drawn before the loop, in FFCV's pipeline thread (which
``FailFastEpochIterator`` seeds per batch), and each image's crop is drawn
(with FFCV's own crop sampler) after seeding its thread with it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():  # importing FFCV sets torch's thread count to 1
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

DECODE_ERROR = "libjpeg-turbo cannot decode the JPEG of sample"


class CheckedRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """``RandomResizedCropRGBImageDecoder`` (same arguments, crop distribution and
    memory layout) whose JPEG decode failures raise, naming the sample index,
    and whose crops follow the random state of the calling thread."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        parallel_range = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        crop_and_resize = Compiler.compile(resize_crop)
        random_crop = Compiler.compile(self.get_crop_generator)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        message = DECODE_ERROR

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            n = len(batch_indices)
            crop_seeds = np.random.randint(0, 2 ** 31, n)  # in the calling thread
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
                    np.random.seed(np.uint32(crop_seeds[k]))  # whichever thread runs image k
                    top, left, h, w = random_crop(height, width, scale, ratio)
                    crop_and_resize(image, top, top + h, left, left + w, destination[k])
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
