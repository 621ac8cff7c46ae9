"""Memory measurement that works on every device, used by spft-bench and the tests.

``TensorMemoryTracker`` is a dispatch mode that sees every tensor storage created while it is
active, including those made inside spft's own custom ops (their Python implementations are
run under the mode, where the mode would otherwise see one opaque call), and follows each
storage until it is freed. It reports the peak of live bytes and the largest single
allocation. On CUDA the allocator's own statistics are the better peak (they include
workspaces); the CPU has no such statistics, hence this.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _custom_op_python_impl(func):
    """The Python body of an spft custom op (so that its inner allocations are seen), or None."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # private API: without it the op is measured as one call
        return None
    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks storages created while active.

    Attributes after (or during) use: ``current_bytes``, ``peak_bytes`` (live bytes of storages
    created under the tracker, plus ``baseline_bytes``), ``largest_numel`` and ``largest_shape``
    (the biggest tensor any op allocated), ``large_shapes`` (the shapes of every allocation of
    at least ``record_at_least`` elements, in order). ``on_peak()`` is called whenever the peak
    grows (e.g. to see what is alive at that moment). Works under ``FakeTensorMode`` (enter the
    fake mode first): fake tensors have storages of their real size, so a whole model's step
    can be measured without its memory."""

    def __init__(
        self,
        baseline: Optional[Iterable[torch.Tensor]] = None,
        *,
        record_at_least: Optional[int] = None,
        on_peak: Optional[Callable[[], None]] = None,
    ):
        super().__init__()
        self.baseline_bytes = _storage_bytes(baseline or ())
        self.current_bytes = 0
        self.peak_bytes = self.baseline_bytes
        self.largest_numel = 0
        self.largest_shape: tuple = ()
        self.largest_op = ""
        self.large_shapes: list[tuple] = []
        self._record_at_least = record_at_least
        self._on_peak = on_peak
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_python_impl(func) if func.namespace == "spft" else None
        if body is not None:
            with self, torch.no_grad():
                out = body(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        # An output that shares an input's storage (a view, an in-place result) allocated nothing.
        input_storages = {t.untyped_storage()._cdata for t in _dense_parts(tree_flatten((args, kwargs))[0])}
        for tensor in _dense_parts(tree_flatten(out)[0]):
            self._track(tensor, str(func), input_storages)
        return out

    def _track(self, tensor: torch.Tensor, op: str, input_storages: set) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live or key in input_storages:
            return
        if tensor.numel() > self.largest_numel:
            self.largest_numel, self.largest_shape, self.largest_op = tensor.numel(), tuple(tensor.shape), op
        if self._record_at_least is not None and tensor.numel() >= self._record_at_least:
            self.large_shapes.append(tuple(tensor.shape))
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current_bytes += nbytes
        if self.baseline_bytes + self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.baseline_bytes + self.current_bytes
            if self._on_peak is not None:
                self._on_peak()
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        nbytes = self._live.pop(key, 0)
        self.current_bytes -= nbytes


def _dense_parts(values) -> list[torch.Tensor]:
    """The strided tensors that hold the data of the tensors among ``values`` (a sparse tensor's
    indices and values; nothing for meta tensors)."""
    parts = []
    for value in values:
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        if value.layout == torch.strided:
            parts.append(value)
        elif value.layout == torch.sparse_coo:
            parts += [value._indices(), value._values()]
        elif value.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts += [value.crow_indices(), value.col_indices(), value.values()]
        elif value.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts += [value.ccol_indices(), value.row_indices(), value.values()]
    return parts


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in _dense_parts(tensors):
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total
