"""Loading of the compiled CUDA extension ``spft_kernels._C``.

Never initialises CUDA (loading the library only registers ops); a missing or mismatched build
warns once and the package falls back to the other backends.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Optional


class SpftExtensionWarning(UserWarning):
    """The CUDA extension could not be loaded; the cuda backend is unavailable."""


_load_error: Optional[str] = None


@functools.lru_cache(maxsize=None)
def load_cuda_extension():
    """The extension module, or None (with one warning) when it is not built or does not load."""
    global _load_error
    try:
        module = importlib.import_module("spft_kernels._C")
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and error.name == "spft_kernels._C"
        _load_error = (
            "spft_kernels._C is not built (no CUDA toolkit at install time, or SPFT_SKIP_CUDA_BUILD=1)"
            if missing
            else f"spft_kernels._C failed to load, probably built against another torch/CUDA: {error}"
        )
        if not missing:
            warnings.warn(f"{_load_error}; the cuda backend is disabled", SpftExtensionWarning, stacklevel=3)
        return None
    _load_error = None
    _register_fakes()
    return module


@functools.lru_cache(maxsize=None)
def _register_fakes():
    # Shapes of the C++ ops for torch.compile and meta tensors (once per process).
    import torch

    @torch.library.register_fake("spft::cuda_scatter_delta_")
    def _(weight, index, base, delta, alpha):
        return None

    @torch.library.register_fake("spft::cuda_row_gather")
    def _(src, rows):
        return src.new_empty((src.shape[0], rows.numel()))

    @torch.library.register_fake("spft::cuda_row_scatter_add_")
    def _(y, z, rows):
        return None

    @torch.library.register_fake("spft::cuda_spmm_add")
    def _(base, x, delta, index, row_ptr):
        return torch.empty_like(base, memory_format=torch.contiguous_format)

    @torch.library.register_fake("spft::cuda_spmm_t_add")
    def _(base, dy, delta, index, col_ptr, csc_perm):
        return torch.empty_like(base, memory_format=torch.contiguous_format)

    @torch.library.register_fake("spft::cuda_sddmm")
    def _(x, dy, index, tile_ptr):
        return x.new_empty(index.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("spft::cuda_fused_delta_linear")
    def _(x, weight, delta, index, row_ptr, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


def cuda_extension_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    load_cuda_extension()
    return _load_error
