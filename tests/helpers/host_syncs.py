"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode('error')``: inside ``host_syncs_forbidden()``
every operation that makes the host wait for a CUDA device raises ``AssertionError`` naming it.

Two layers: Python-level reads of a tensor (``.item()``, ``bool(t)``, ``.tolist()``, ...) are
patched; below autograd, a dispatch mode refuses the operators whose output size or value the
host must read back (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ...) and
tensors made from Python lists inside the step (``torch.tensor([...])``, ``x[[0, 2]]``: on a GPU a
blocking host-to-device copy). A 0-d tensor made from a Python number is allowed (an index
assignment's value: a scalar argument on the GPU too)."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
PYTHON_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.argwhere, aten._unique, aten._unique2, aten.unique_dim,
           aten.unique_consecutive, aten.unique_dim_consecutive, aten.masked_select, aten.bincount, aten.equal,
           aten.is_nonzero}
SYNCING_OVERLOADS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
FROM_PYTHON = {aten.lift_fresh, aten.lift_fresh_copy}


class _Refuse(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in SYNCING or func in SYNCING_OVERLOADS:
            raise AssertionError(f"host sync: {func} inside the step")
        if packet in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                      for i in args[1]):
            raise AssertionError(f"host sync: boolean-mask indexing ({func}) inside the step")
        if packet in FROM_PYTHON and args[0].ndim > 0:
            raise AssertionError(f"host sync: a tensor made from Python data ({func}) inside the step")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs_forbidden():
    """Make every host read of a tensor, and every operator that needs one on a GPU, raise."""
    saved = {n: getattr(torch.Tensor, n) for n in PYTHON_READS}

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside the step")
        return raise_

    for name in PYTHON_READS:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        with _Refuse():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
