"""Counting what makes the host wait for the GPU, on a CPU (issue 28; the GPU issues'
tests use it too).

``with HostSyncs() as syncs: ...`` counts, in ``syncs.count`` (and by name in
``syncs.seen``), every operation run inside the block that would stall the host on CUDA:

* scalar reads: ``item``, ``bool()``, ``int()``, ``float()`` (they reach
  ``_local_scalar_dense``), ``is_nonzero``, ``equal``;
* copies between devices (``to``, ``copy_`` across device types);
* operations whose output shape depends on the data, which on CUDA must read a count
  back before they can allocate their output: ``nonzero`` (and ``torch.where(cond)``,
  ``argwhere``), ``masked_select``, boolean-mask indexing (``x[mask]``,
  ``x[mask] = v``), ``unique`` and ``unique_consecutive``, ``repeat_interleave`` without
  ``output_size``, ``bincount``;
* the Python-side reads ``Tensor.tolist`` / ``cpu`` / ``numpy`` (patched: on a CPU
  tensor they dispatch nothing).

On a CPU none of these waits for anything, which is why they are counted by name: a
decode step that is sync-free here is sync-free on the GPU.  ``CUDA_SYNC_OPS`` and
``is_sync`` are the one list; add to them rather than writing another.

``with Ops() as ops: ...`` counts every aten op dispatched (``ops.count``, by name in
``ops.seen``): on a GPU each is roughly one kernel launch.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten overload packets that always make the host wait on CUDA
CUDA_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
    "aten::allclose",
    "aten::nonzero", "aten::argwhere", "aten::masked_select",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::bincount",
})
PYTHON_READS = ("tolist", "cpu", "numpy")  # item() dispatches _local_scalar_dense


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or ()))


def is_sync(func, args, kwargs) -> str | None:
    """The reason ``func(*args, **kwargs)`` makes the host wait on CUDA, or None."""
    name = func._schema.name
    if name in CUDA_SYNC_OPS:
        return name
    if name in ("aten::index", "aten::index_put", "aten::index_put_",
                "aten::_index_put_impl_") and len(args) > 1 and _bool_index(args[1]):
        return name + " (boolean mask)"
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
        return name + " (no output_size)"
    if name in ("aten::_to_copy", "aten::copy_") and args:
        src = args[-1] if name == "aten::copy_" else args[0]
        dst = kwargs.get("device") if name == "aten::_to_copy" else args[0].device
        if isinstance(src, torch.Tensor) and dst is not None and \
                torch.device(dst).type != src.device.type:
            return name + " (across devices)"
    return None


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: Counter[str] = Counter()
        self._patched: list[tuple[str, object]] = []

    @property
    def count(self) -> int:
        return sum(self.seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = is_sync(func, args, kwargs)
        if why is not None:
            self.seen[why] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in PYTHON_READS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                self.seen["Tensor." + _name] += 1
                return _orig(t, *a, **k)
            self._patched.append((name, orig))
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, orig in self._patched:
                setattr(torch.Tensor, name, orig)
            self._patched.clear()


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func._schema.name] += 1
        return func(*args, **(kwargs or {}))
