"""spft_kernels: CUDA and Triton kernels for sparse fine-tuning of language models.

``import spft_kernels`` never fails for want of a compiled extension and never initialises
CUDA; see ``available_backends()``.
"""

from ._extension import SpftExtensionWarning
from .backends import available_backends
from .dynamic_mask import DynamicMask
from .index import SparseIndex, random_index
from .layers import SparseDeltaLinear
from .row_gather import row_gather
from .salience import salience_scores
from .select import lora_equivalent_params, random_indices, select_topk
from .scatter_delta import scatter_delta_
from .sparse_delta_linear import sparse_delta_linear

__version__ = "0.1.0"

__all__ = [
    "DynamicMask",
    "SparseDeltaLinear",
    "SparseIndex",
    "SpftExtensionWarning",
    "available_backends",
    "lora_equivalent_params",
    "random_indices",
    "random_index",
    "row_gather",
    "salience_scores",
    "scatter_delta_",
    "select_topk",
    "sparse_delta_linear",
]
