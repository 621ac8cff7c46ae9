"""``SparseDeltaLinear``: a frozen W0 plus trainable scattered entries (SPEFT, SpaRTA); the modes
and the state dict are the base's (``base.py``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops._guards import builds_state
from ..ops.csr_index import CsrIndex, column_bytes
from ..ops.index import DERIVED, SparseIndex
from ..ops.scatter_delta import scatter_delta_
from ..ops.sparse_delta_linear import sparse_delta_linear
from .base import _FrozenBaseDeltaLinear


def _metadata_buffer(name: str) -> str:
    return "_" + name


class SparseDeltaLinear(_FrozenBaseDeltaLinear):
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ`` holding ``delta[k]`` at flat position ``index[k]``.

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [nnz], fp32 master, zeros at start), ``index`` ([nnz], canonical: read-only,
    expanded on each access from the 2 bytes an entry the layer stores, ops/compact_index.py;
    the state dict holds it as before). Change positions with :meth:`set_index`.
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
    def _validate(cls, index, out_features, in_features, device, name, layer=None):
        return SparseIndex.build(index, out_features, in_features, device=device, name=name)

    def _adopt(self, sparse_index: SparseIndex) -> None:
        # Stored as CSR with 16-bit columns (2 bytes an entry instead of 4: 0.30 GiB at SpaRTA r64
        # on Llama-2-7B; ops/csr_index.py): the form the step's sparse products read, so a step
        # casts the columns once instead of expanding a flat index. The state dict still holds
        # the canonical index (_current_positions). Non-persistent buffers: they follow .to() and
        # DDP's buffer broadcast (bytes: NCCL has no 16-bit integers).
        csr = sparse_index.csr()
        self.register_buffer("_index_crow", csr.crow, persistent=False)
        self.register_buffer("_index_col_bytes", csr.col_bytes, persistent=False)
        # The derived forms (CSR/CSC pointers, tile pointers) are built when a kernel that reads
        # them first runs (SparseIndex), then kept as non-persistent buffers: they follow .to()
        # but never reach a state dict. The default (reference) path never builds them.
        for name in DERIVED:
            self._buffers.pop(_metadata_buffer(name), None)
        for name, tensor in sparse_index.cached().items():
            self._keep_metadata(name, tensor)

    def _keep_metadata(self, name: str, tensor: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():  # a traced graph must not add module state
            self.register_buffer(_metadata_buffer(name), tensor, persistent=False)

    @staticmethod
    def _positions_tensor(sparse_index: SparseIndex) -> torch.Tensor:
        return sparse_index.flat

    def _delta_shape(self, sparse_index: SparseIndex) -> tuple:
        return (sparse_index.nnz,)

    def sparse_index(self) -> SparseIndex:
        """The validated index with the derived forms built so far (no validation or rebuild:
        O(1)); a derived form read from it for the first time is built then and kept."""
        cached = {name: self._buffers.get(_metadata_buffer(name)) for name in DERIVED}
        csr = CsrIndex(self._index_crow, self._index_col_bytes, self.out_features, self.in_features)
        return SparseIndex(None, self.out_features, self.in_features, csr=csr, on_build=self._keep_metadata, **cached)

    @property
    def index(self) -> torch.Tensor:
        """The canonical flat positions (sorted, int32/int64), expanded on each access: O(nnz), no
        host sync. A new tensor each time: writing into it changes nothing (use set_index)."""
        return self.sparse_index().flat

    @property
    def nnz(self) -> int:
        return self._index_col_bytes.numel() // column_bytes(self.in_features)

    def _current_positions(self) -> torch.Tensor:
        # The state dict's index: canonical, as DESIGN.md's format and every earlier state dict
        # have it (4 bytes an entry while the state dict lives; the weight is never copied).
        return self.index

    # --- folding (dynamic masks) --------------------------------------------------------------

    @builds_state
    @torch.no_grad()
    def fold_delta(self) -> None:
        """``W0 ← W0 + Δ`` (fp32 sum rounded once, O(nnz)) and ``Δ ← 0``: the layer computes the
        same function with the trained values moved into its weight (SPEFT's dynamic masks fold
        before reselecting). The original W0 of every position ever folded is kept aside
        (``original_w0()``, ~10 bytes a position, in memory only), so that ``save_adapter`` still
        writes an adapter relative to the original base. Refused for a shared weight."""
        if self.weight_shared_with is not None:
            raise ValueError(
                f"{self.layer_name}: the weight is shared with {self.weight_shared_with!r}; folding the delta "
                "into it would change that module too"
            )
        self._refuse_while_lent("fold_delta()")
        was_merged = self._merged
        self.unmerge()
        flat = self.index.long()
        folded = self.original_w0()
        if folded is None:
            positions, values = flat, self._weight_at(flat)
        else:
            new = flat[~torch.isin(flat, folded[0])]
            positions, order = torch.sort(torch.cat([folded[0], new]))
            values = torch.cat([folded[1], self._weight_at(new)])[order]
        self.register_buffer("_folded_index", positions, persistent=False)
        self.register_buffer("_folded_w0", values, persistent=False)
        scatter_delta_(self.weight, self.index, delta=self.delta, backend=self.backend)
        self.delta.zero_()
        self.delta.grad = None
        if was_merged:
            self.merge()

    def original_w0(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(positions, values)``: the W0 the layer was built on at every flat position
        ``fold_delta`` changed (sorted int64 positions, values in the weight's dtype), or None when
        nothing was folded."""
        positions = getattr(self, "_folded_index", None)
        return None if positions is None else (positions, self._folded_w0)

    def _weight_at(self, flat: torch.Tensor) -> torch.Tensor:
        rows = torch.div(flat, self.in_features, rounding_mode="floor")
        return self.weight.detach()[rows, flat - rows * self.in_features]

    def _gather_w0(self) -> torch.Tensor:
        return self.weight.view(-1).index_select(0, self.index)

    def _write(self, weight, base, delta):
        return scatter_delta_(weight, self.index, base=base, delta=delta, backend=self.backend)

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta_linear(
            x, self.weight, self.delta, self.sparse_index(), self.bias, backend=self.backend, merged=self._computes_merged(),
            fused=self.mode == "fused" and not self._computes_merged(),
        )

    def _describe(self) -> str:
        total = self.in_features * self.out_features
        density = self.nnz / total if total else 0.0
        return f"nnz={self.nnz}, density={density:.4g}"
