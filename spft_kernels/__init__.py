"""spft_kernels: CUDA and Triton kernels for sparse fine-tuning of language models.

``import spft_kernels`` never fails for want of a compiled extension and never initialises
CUDA; see ``available_backends()``.
"""

from ._extension import SpftExtensionWarning
from .backends import available_backends
from .index import SparseIndex, random_index
from .layers import SparseDeltaLinear
from .pst import PSTLinear, cubic_sparsity, pst_linear, pst_threshold
from .row_gather import row_gather
from .scatter_delta import scatter_delta_
from .sparse_delta_linear import sparse_delta_linear

__version__ = "0.1.0"

__all__ = [
    "PSTLinear",
    "SparseDeltaLinear",
    "SparseIndex",
    "SpftExtensionWarning",
    "available_backends",
    "cubic_sparsity",
    "pst_linear",
    "pst_threshold",
    "random_index",
    "row_gather",
    "scatter_delta_",
    "sparse_delta_linear",
]
