"""spft_kernels: CUDA and Triton kernels for sparse fine-tuning of language models.

``import spft_kernels`` never fails for want of a compiled extension and never initialises
CUDA; see ``available_backends()``.

The folders are the architecture, and imports point one way (``python_tests/test_layering.py``):

- ``ops/``: one file per op (custom op, backends, autograd), the reference math (``naive.py``),
  the index format, backend dispatch, the extension and Triton loaders;
- ``nn/``: the layers (``SparseDeltaLinear``, ``RowSparseLinear``, ``BlockSparseLinear``, ``PSTLinear``)
  on one base (``SpftLayer``), one file per position kind, registered in one place
  (``register_kind``), and the kinds of frozen base (``FrozenBase``);
- ``masks/``: choosing what trains (targets, salience scores, top-k, row importance, dynamic masks);
- ``integration/``: the peft-style model API (config, conversion, merging, adapter files);
- ``bench/``: ``spft-bench``, the end-to-end bench, reports, memory tracking.
"""

from .integration.adapter.from_peft import from_peft
from .integration.adapter.load import load_adapter
from .integration.adapter.merge import merge_adapters
from .integration.adapter.save import save_adapter
from .integration.config import SpftConfig
from .integration.conversion import get_spft_model, make_dynamic_mask, set_pst_sparsity
from .integration.merge import merge_and_unload, unload
from .integration import model_methods as _model_methods  # noqa: F401 (registers the methods of converted models)
from .integration.named_adapters import add_adapter, delete_adapter, disable_adapter, set_adapter
from .integration.pretrained import save_pretrained_merged
from .integration.modes import set_mode
from .integration.surgery import print_trainable_parameters
from .masks.dynamic_mask import DynamicMask
from .masks.row_importance import row_importance, select_rows
from .masks.salience import salience_scores
from .masks.select import EmptySelectionWarning, lora_equivalent_params, random_indices, select_topk
from .masks.select_blocks import random_blocks, select_blocks
from .nn.base import SpftLayer
from .nn.block_sparse_linear import BlockSparseLinear
from .nn.delta_layer import DeltaLayer
from .nn.frozen_base import DenseBase, FrozenBase, register_base_kind
from .nn.pst_linear import PSTLinear, PSTOptions
from .nn.registry import register_kind, registered_kinds, unregister_kind
from .nn.row_sparse_linear import RowSparseLinear
from .nn.sparse_delta_linear import SparseDeltaLinear
from .ops._extension import SpftExtensionWarning
from .ops.backends import available_backends
from .ops.block_delta_linear import block_delta_linear
from .ops.index import SparseIndex, random_index
from .ops.pst_linear import cubic_sparsity, pst_linear, pst_threshold
from .ops.row_delta_linear import row_delta_linear
from .ops.row_gather import row_gather
from .ops.row_scatter_add import row_scatter_add_
from .ops.scatter_delta import scatter_delta_
from .ops.sparse_delta_linear import sparse_delta_linear

__version__ = "0.1.0"

# Imported on first use: they import transformers (integration/trainer.py).
_LAZY = {"SpftTrainer": "trainer", "SpftTrainerMixin": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".integration.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockSparseLinear",
    "DeltaLayer",
    "DenseBase",
    "FrozenBase",
    "PSTOptions",
    "SpftLayer",
    "register_base_kind",
    "register_kind",
    "registered_kinds",
    "unregister_kind",
    "DynamicMask",
    "EmptySelectionWarning",
    "PSTLinear",
    "RowSparseLinear",
    "SparseDeltaLinear",
    "SparseIndex",
    "SpftConfig",
    "SpftExtensionWarning",
    "SpftTrainer",
    "SpftTrainerMixin",
    "add_adapter",
    "available_backends",
    "block_delta_linear",
    "cubic_sparsity",
    "delete_adapter",
    "disable_adapter",
    "from_peft",
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
    "random_blocks",
    "random_indices",
    "row_delta_linear",
    "row_gather",
    "row_importance",
    "row_scatter_add_",
    "salience_scores",
    "save_adapter",
    "save_pretrained_merged",
    "scatter_delta_",
    "select_blocks",
    "select_rows",
    "select_topk",
    "set_adapter",
    "set_mode",
    "set_pst_sparsity",
    "sparse_delta_linear",
    "unload",
]
