"""Two parts of FFCV 1.0.2's ``Loader``, replaced while our loaders are built.

``OSCacheReader``: numba interns its types (``numba.uint8[::1]`` is one shared object,
and dispatchers key their compiled signatures by it). FFCV's ``OSCacheManager.state_type``
sets ``mutable = False`` on that shared object each time a ``Loader`` is built, meaning to
describe its read-only memory map. The keys of every function compiled for ``uint8[::1]``
before then change their hash, and numba raises ``KeyError`` the next time it types a call
to one of them: our colour kernels failed so once a second loader had been built. This
reader gives FFCV the types it ended up with (a read-only ``uint8[::1]`` map, writable
``uint64[::1]`` offsets and sizes; the reader returns a read-only slice), built as new types.

``OrderedGraph``: FFCV groups a pipeline's operations into stages by popping them from a
``set`` of nodes, which hash by address, so the order of the operations within a stage
changed from process to process. Random operations draw from their thread's numba state in
that order, so the same seeds gave other crops, flips and colours in another process (a
resumed run). Here the node taken next is the one created first, in the same algorithm.

``ffcv_fixes()`` has FFCV's ``Loader`` build these while the block runs; FFCV names both
classes in its own module, which offers no other way in. A ``Loader`` built outside the
block (a user's own, in the same process) still changes numba's shared type.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numba as nb
import numpy as np
from ffcv.loader import loader as ffcv_loader
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.graph import Graph

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


class OrderedGraph(Graph):
    def group_operations(self) -> list[list[int]]:
        """FFCV's stages (jitted and Python operations alternating, each node after its
        parent), the lowest node id first where FFCV took any node of its front. As in FFCV,
        the front of deferred nodes is kept across stages."""
        current_front, next_front, stages = set(self.root_nodes), set(), []
        while current_front:
            current_stage, jitted_stage = [], len(stages) % 2 == 0
            while current_front:
                node = min(current_front, key=self.node_to_id.__getitem__)
                current_front.remove(node)
                if node.is_jitted == jitted_stage or node.is_jitted is None:
                    current_stage.append(self.node_to_id[node])
                    current_front.update(self.adjacency_list[node])
                else:
                    next_front.add(node)
            stages.append(current_stage)
            current_front = next_front
        return stages


@contextmanager
def ffcv_fixes() -> Iterator[None]:
    """FFCV's ``Loader`` built inside the block uses ``OSCacheReader`` and ``OrderedGraph``."""
    saved = ffcv_loader.OSCacheManager, ffcv_loader.Graph
    ffcv_loader.OSCacheManager, ffcv_loader.Graph = OSCacheReader, OrderedGraph
    try:
        yield
    finally:
        ffcv_loader.OSCacheManager, ffcv_loader.Graph = saved
