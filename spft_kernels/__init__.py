"""spft_kernels: CUDA and Triton kernels for sparse fine-tuning of language models.

``import spft_kernels`` never fails for want of a compiled extension and never initialises
CUDA; see ``available_backends()``.
"""

from ._extension import SpftExtensionWarning
from .adapter_io import load_adapter, merge_adapters, save_adapter
from .backends import available_backends
from .dynamic_mask import DynamicMask
from .index import SparseIndex, random_index
from .layers import RowSparseLinear, SparseDeltaLinear
from .model import (
    SpftConfig,
    get_spft_model,
    make_dynamic_mask,
    merge_and_unload,
    print_trainable_parameters,
    set_pst_sparsity,
    unload,
)
from .pst import PSTLinear, cubic_sparsity, pst_linear, pst_threshold
from .row_delta_linear import row_delta_linear
from .row_gather import row_gather
from .row_importance import row_importance, select_rows
from .row_scatter_add import row_scatter_add_
from .salience import salience_scores
from .scatter_delta import scatter_delta_
from .select import lora_equivalent_params, random_indices, select_topk
from .sparse_delta_linear import sparse_delta_linear

__version__ = "0.1.0"

__all__ = [
    "DynamicMask",
    "PSTLinear",
    "RowSparseLinear",
    "SparseDeltaLinear",
    "SparseIndex",
    "SpftConfig",
    "SpftExtensionWarning",
    "available_backends",
    "cubic_sparsity",
    "get_spft_model",
    "load_adapter",
    "lora_equivalent_params",
    "make_dynamic_mask",
    "merge_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "pst_linear",
    "pst_threshold",
    "random_index",
    "random_indices",
    "row_delta_linear",
    "row_gather",
    "row_importance",
    "row_scatter_add_",
    "salience_scores",
    "save_adapter",
    "scatter_delta_",
    "select_rows",
    "select_topk",
    "set_pst_sparsity",
    "sparse_delta_linear",
    "unload",
]
