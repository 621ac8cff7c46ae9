"""``SparseDeltaLinear``: a frozen W0 plus trainable scattered entries (SPEFT, SpaRTA); the modes
and the state dict are the base's (``base.py``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.index import SparseIndex
from ..ops.scatter_delta import scatter_delta_
from ..ops.sparse_delta_linear import sparse_delta_linear
from .base import _FrozenBaseDeltaLinear


class SparseDeltaLinear(_FrozenBaseDeltaLinear):
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ`` holding ``delta[k]`` at flat position ``index[k]``.

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [nnz], fp32 master, zeros at start), ``index`` (buffer [nnz], canonical).
    """

    _POSITIONS = "index"
    _UNIT = "entries"
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = True  # merged positions are flat offsets into the weight
    _HAS_FUSED_MODE = True

    def __init__(self, in_features: int, out_features: int, index: Optional[torch.Tensor], *args, **kwargs) -> None:
        # bias, device, dtype and the keyword-only mode, backend, delta_dtype, name: see the base.
        super().__init__(in_features, out_features, index, *args, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        index: torch.Tensor,
        mode: str = "auto",
        backend: str = "auto",
        *,
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> "SparseDeltaLinear":
        """Wrap ``linear`` without copying its weight: the layer shares (and freezes) the weight and
        bias tensors, and starts with ``delta = 0`` so that it computes exactly what ``linear`` did."""
        return cls._wrap(linear, index, mode, backend, delta_dtype, name)

    # --- the index --------------------------------------------------------------------------

    def set_index(self, index: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the mask: validate ``index`` (unsorted input is sorted together with ``values``),
        rebuild the cached metadata and set ``delta`` to ``values`` (zeros if None). The layer is
        unmerged first and re-merged afterwards if it was merged. ``delta`` gets new storage, so an
        optimizer holding it must be rebuilt (or its state reset)."""
        self._set_positions(index, values)

    @classmethod
    def _validate(cls, index, out_features, in_features, device, name):
        return SparseIndex.build(index, out_features, in_features, device=device, name=name)

    def _adopt(self, sparse_index: SparseIndex) -> None:
        self.register_buffer("index", sparse_index.flat)
        # Derived once per mask; non-persistent so they follow .to() but never reach a state dict.
        self.register_buffer("_row_ptr", sparse_index.row_ptr, persistent=False)
        self.register_buffer("_col_ptr", sparse_index.col_ptr, persistent=False)
        self.register_buffer("_csc_perm", sparse_index.csc_perm, persistent=False)
        self.register_buffer("_tile_ptr", sparse_index.tile_ptr, persistent=False)

    @staticmethod
    def _positions_tensor(sparse_index: SparseIndex) -> torch.Tensor:
        return sparse_index.flat

    def _delta_shape(self, sparse_index: SparseIndex) -> tuple:
        return (sparse_index.nnz,)

    def sparse_index(self) -> SparseIndex:
        """The cached, validated index (no validation or rebuild: O(1))."""
        return SparseIndex(
            self.index, self._row_ptr, self._col_ptr, self._csc_perm, self.out_features, self.in_features,
            self._tile_ptr,
        )

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def _gather_w0(self) -> torch.Tensor:
        return self.weight.view(-1).index_select(0, self.index)

    def _write(self, weight, base, delta):
        return scatter_delta_(weight, self.index, base=base, delta=delta, backend=self.backend)

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta_linear(
            x, self.weight, self.delta, self.sparse_index(), self.bias, backend=self.backend, merged=self._merged,
            fused=self.mode == "fused" and not self._merged,
        )

    def _describe(self) -> str:
        total = self.in_features * self.out_features
        density = self.nnz / total if total else 0.0
        return f"nnz={self.nnz}, density={density:.4g}"
