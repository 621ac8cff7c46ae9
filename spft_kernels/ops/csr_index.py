"""The index of scattered entries as a layer stores it and as the step's ops read it: CSR with
16-bit columns, 2 bytes an entry.

A canonical index (sorted unique flat positions ``row * in + col``, ops/index.py) is row-major, so
it *is* the CSR order of Δ; storing it as CSR costs

- ``crow`` [out + 1]: where each row's entries start (int32; int64 from 2^31 entries);
- ``col_bytes`` uint8 [2 nnz]: each entry's column as 16 bits (4 bytes an entry when
  ``in > 65,536``, which no released language model has).

Why this form (bytes per entry and ops per step, the two axes):

- bytes: 2 an entry plus ``4 (out + 1)`` a layer (16 KiB at 4096 rows). The 2-byte split of
  the flat position it replaces (``compact_index.py``, kept for the adapter file's ``split16``
  form) cost 2 an entry plus 4 per 65,536 weight positions. At LoRA rank 64's count on
  Llama-2-7B (159.9M entries) both are 0.30 GiB; the canonical int32 form was 0.60 GiB, and
  int32 CSR columns would be 0.60 GiB too (so an int32 ``col`` is never kept). The row pointers
  are the trade-off: 5.44 MB at 7B against the split form's 0.40 MB, +0.03 bytes an entry, the
  7B peak 17.714 -> 17.718 GiB (+0.03%, ``spft-bench --memory --rank 64``, merged), for ~10 ops
  fewer a step (below). A pointer form under 4 bytes a row (16-bit row counts, a row-start bit
  in the column's spare sign bit) would cost a cumulative sum or a ``nonzero_static`` and a
  few more ops in every product: not bought;
- ops: the library's sparse products (``torch.sparse.sampled_addmm``, ``torch.mm`` with a CSR
  or its transpose: MKL on the CPU, cuSPARSE on CUDA) read exactly ``crow`` and int32 columns,
  so an op gets them with **one** cast (``int16 -> int32``; two with a mask when
  ``32,768 < in <= 65,536``), where the split flat form needed 7 ops (a ``searchsorted`` of every
  entry into the block ends, shifts and adds) to get the flat index and 3 more to split it into
  rows and columns. The flat index, when something needs it (merge, the state dict, the custom
  kernels), is 3 ops away: ``arange``, ``searchsorted`` into ``crow``, one fused add.

The low halves are kept as bytes, not int16: NCCL has no 16-bit integer type and DDP broadcasts
every buffer. Nothing here syncs with the device: every shape is known on the host.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

# torch warns once per process that CSR tensors are "in beta"; the ops used here (construction,
# sampled_addmm, mm) have been stable since torch 2.0, and the warning would reach every user.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Tensor = torch.Tensor

INT32_LIMIT = 2**31
# Columns below 2^15 are non-negative int16 values: one cast makes them int32. Up to 2^16 they
# need a mask after the cast; beyond, 4 bytes an entry.
_SIGNED_16 = 1 << 15
_UNSIGNED_16 = 1 << 16


def column_bytes(in_features: int) -> int:
    """Bytes a column takes in the stored form."""
    return 2 if in_features <= _UNSIGNED_16 else 4


def pointer_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < INT32_LIMIT else torch.int64


def stored_bytes(nnz: int, out_features: int, in_features: int) -> int:
    """What a layer keeps for ``nnz`` entries of an out x in weight."""
    return column_bytes(in_features) * nnz + (out_features + 1) * torch.tensor([], dtype=pointer_dtype(nnz)).element_size()


@dataclasses.dataclass(frozen=True)
class CsrIndex:
    """``crow`` [out + 1] and ``col_bytes`` uint8 [width * nnz] of an out x in weight."""

    crow: Tensor
    col_bytes: Tensor
    out_features: int
    in_features: int

    @property
    def nnz(self) -> int:
        return self.col_bytes.numel() // column_bytes(self.in_features)

    @classmethod
    def from_flat(cls, flat: Tensor, out_features: int, in_features: int) -> "CsrIndex":
        """From a canonical (sorted, unique, in range) flat index; O(nnz) plus O(out)."""
        wide = flat.long()
        starts = torch.arange(out_features + 1, device=flat.device, dtype=torch.int64) * in_features
        crow = torch.searchsorted(wide, starts).to(pointer_dtype(flat.numel()))
        cols = wide - torch.searchsorted(starts, wide, right=True).sub_(1) * in_features
        width = column_bytes(in_features)
        if width == 2:
            stored = cols.to(torch.int32).to(torch.int16)  # >= 2^15 wraps; columns() masks it back
        else:
            stored = cols.to(torch.int32)
        return cls(crow, stored.view(torch.uint8), out_features, in_features)

    def columns(self) -> Tensor:
        """int32 [nnz]: the CSR column indices (one op; two when 2^15 < in <= 2^16)."""
        if column_bytes(self.in_features) == 4:
            return self.col_bytes.view(torch.int32)
        cols = self.col_bytes.view(torch.int16).to(torch.int32)
        return cols.bitwise_and_(_UNSIGNED_16 - 1) if self.in_features > _SIGNED_16 else cols

    def rows(self, dtype: torch.dtype = torch.int64) -> Tensor:
        """Each entry's row [nnz] (two ops: the entry numbers, their place among the row starts)."""
        entry = torch.arange(self.nnz, device=self.crow.device, dtype=self.crow.dtype)
        return torch.searchsorted(self.crow[1:], entry, right=True, out_int32=dtype == torch.int32)

    def flat(self, dtype: torch.dtype) -> Tensor:
        """The canonical flat positions in ``dtype`` (``index_dtype_for``): ``row * in + col``."""
        if self.nnz == 0:
            return torch.empty(0, dtype=dtype, device=self.crow.device)
        return torch.add(self.columns().to(dtype), self.rows(dtype), alpha=self.in_features)

    def tensor(self, values: Tensor, columns: Optional[Tensor] = None) -> Tensor:
        """Δ as a torch sparse CSR tensor [out, in] holding ``values`` (no copy, no checks: the
        index was validated when it was built)."""
        cols = self.columns() if columns is None else columns
        if cols.dtype != self.crow.dtype:  # (int32 and int32: nothing to cast, not even the call)
            cols = cols.to(self.crow.dtype)
        return torch.sparse_csr_tensor(
            self.crow, cols, values, (self.out_features, self.in_features), check_invariants=False
        )

    def to_list(self) -> list[Tensor]:
        return [self.crow, self.col_bytes]

    @classmethod
    def from_list(cls, tensors: list[Tensor], out_features: int, in_features: int) -> "CsrIndex":
        crow, col_bytes = tensors[:2]
        return cls(crow, col_bytes, out_features, in_features)
