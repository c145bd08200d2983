"""FFCV's OS-cache memory manager, without its side effect on numba's shared types.

numba interns its types: ``numba.uint8[::1]`` is one shared object, and dispatchers key
their compiled signatures by it. FFCV 1.0.2's ``OSCacheManager.state_type`` sets
``mutable = False`` on that shared object (meaning to describe its read-only memory map),
each time a ``Loader`` is built. The keys of every function compiled for ``uint8[::1]``
before then change their hash, and numba raises ``KeyError`` the next time it types a call
to one of them: our colour kernels failed so once a second loader had been built.

``OSCacheReader`` gives FFCV the types it ended up with (a read-only ``uint8[::1]`` map,
writable ``uint64[::1]`` offsets and sizes; the reader returns a read-only slice), built as
new types. ``keep_numba_types()`` has FFCV's ``Loader`` build it while the block runs; FFCV
names the manager in its own module, which offers no other way in. A ``Loader`` built
outside the block (a user's own, in the same process) still changes the shared type.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numba as nb
import numpy as np
from ffcv.loader import loader as ffcv_loader
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.compiler import Compiler

READONLY_BYTES = nb.types.Array(nb.uint8, 1, "C", readonly=True)
OFFSETS = nb.types.Array(nb.uint64, 1, "C")


class OSCacheReader(OSCacheManager):
    @property
    def state_type(self) -> nb.types.Tuple:
        return nb.types.Tuple([READONLY_BYTES, OFFSETS, OFFSETS])  # (memory map, pointers, sizes)

    def compile_reader(self):
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, READONLY_BYTES(nb.uint64, self.state_type))


@contextmanager
def keep_numba_types() -> Iterator[None]:
    """FFCV's ``Loader`` built inside the block uses ``OSCacheReader`` for its OS cache."""
    saved = ffcv_loader.OSCacheManager
    ffcv_loader.OSCacheManager = OSCacheReader
    try:
        yield
    finally:
        ffcv_loader.OSCacheManager = saved
