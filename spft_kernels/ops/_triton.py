"""Optional Triton import: ``triton``/``tl`` are None when Triton is not installed, and the
Triton kernels (defined under ``if triton is not None``) are then simply not registered.

Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the CPU tests; it must be set before spft_kernels is imported).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton (reference and cuda backends)
    triton = None
    tl = None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
