"""Counting the ops a call launches, on any device (spft-bench's "ops" column and the tests).

On a GPU every launched op costs microseconds of host time whatever its size, so a path whose
number of ops grows with the number of tokens is slow there even when a CPU hides it. This
dispatch mode counts the ATen ops that do work (views and other aliasing ops launch nothing and
are not counted), looking inside spft's custom ops as :class:`TensorMemoryTracker` does.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import _custom_op_python_impl

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
        if not func.is_view and name not in _NO_WORK:
            self.count += 1
            self.by_op[name] += 1
        return func(*args, **kwargs)


def count_ops(fn) -> int:
    """The number of ops ``fn()`` launches."""
    with OpCounter() as counter:
        fn()
    return counter.count
