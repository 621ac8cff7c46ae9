"""Counting the ops a call launches, on any device (spft-bench's "ops" column and the tests).

On a GPU every launched op costs microseconds of host time whatever its size, so a path whose
number of ops grows with the number of tokens is slow there even when a CPU hides it. This
dispatch mode counts the ATen ops that do work, looking inside spft's custom ops as
:class:`TensorMemoryTracker` does. An op does no work when every tensor it returns lives in the
storage of one of its inputs and it writes none (a view, ``.to`` or ``.contiguous()`` that had nothing to do, a
sparse tensor built around given index and value tensors); one that allocates does, aliasing
schema or not: ``aten::to`` is declared aliasing but copies when it casts.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import _custom_op_python_impl, _dense_parts

# Ops that only describe or alias memory (no kernel runs).
_NO_WORK = {"aten::detach", "aten::lift_fresh", "aten::alias", "aten::_to_copy_meta"}


class OpCounter(TorchDispatchMode):
    """``count``: ops that did work while active; ``by_op``: the same per op name."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_python_impl(func) if func.namespace == "spft" else None
        if body is not None:
            with self, torch.no_grad():
                return body(*args, **kwargs)
        name = func._schema.name
        out = func(*args, **kwargs)
        if name not in _NO_WORK and (func._schema.is_mutable or not _aliases_inputs(out, args, kwargs)):
            self.count += 1
            self.by_op[name] += 1
        return out


def _aliases_inputs(out, args, kwargs) -> bool:
    """Whether every tensor ``out`` holds lives in an input's storage (an op with no tensor
    output, e.g. an in-place op returning None, does work)."""
    outputs = _dense_parts(tree_flatten(out)[0])
    if not outputs:
        return False
    inputs = {t.untyped_storage()._cdata for t in _dense_parts(tree_flatten((args, kwargs))[0])}
    return all(t.untyped_storage()._cdata in inputs for t in outputs)


def count_ops(fn) -> int:
    """The number of ops ``fn()`` launches."""
    with OpCounter() as counter:
        fn()
    return counter.count
