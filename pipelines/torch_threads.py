"""``keep_torch_threads``: undo a library's changes to torch's thread count.

FFCV calls ``torch.set_num_threads`` when imported (``ffcv.pipeline.compiler``),
in ``Loader.__init__`` and in ``Loader.__iter__``; left alone, that throttles
the device-side ops and the training step on the CPU to one thread. Every
FFCV import and FFCV loader call in this package goes through this context.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count, as found on entry, on exit."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
