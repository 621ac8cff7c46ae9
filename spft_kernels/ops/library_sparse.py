"""The products with a scattered Δ through the library's sparse ops, one op each: the default
path on every device (MKL on the CPU, cuSPARSE on CUDA).

- the delta gradient ``grad[k] = Σ_t dy[t, row_k] x[t, col_k]``: ``torch.sparse.sampled_addmm``
  of ``dyᵀ`` (a view, no copy) and ``x`` on the CSR pattern;
- ``x Δᵀ``: ``(Δ_csr @ xᵀ)ᵀ``;
- ``dy Δ``: ``(Δ_csrᵀ @ dyᵀ)ᵀ`` (the transpose of a CSR tensor is its CSC view: no copy).

Measured on the development CPU (2 cores shared, fp32, median of 9, interleaved;
bench/results/cpu-sparse-library-2026-12-02), against the dense ``dyᵀx`` GEMM:

| shape, tokens | density | sampled_addmm | CSR ``x Δᵀ`` | CSC ``dy Δ`` | row blocks (before) |
|---|---|---|---|---|---|
| 2048x2048, 1,024 | 0.1% | 0.07x | 0.04x | 0.05x | 0.32x |
| 2048x2048, 1,024 | 1% | 0.09x | 0.08x | 0.09x | 1.07x |
| 2048x2048, 1,024 | 5% | 0.24x | 0.30x | 0.40x | 1.08x |
| 32768x4096, 256 | 1% | 0.05x | 0.05x | 0.14x | 0.61x |

Each is one op (the row blocks: 31-103), bitwise repeatable run to run, and its cost follows
nnz x tokens, never blocks x nnz. The rule: the library op wherever the density is at most
``LIBRARY_MAX_DENSITY``; its cost grows with the density (0.24x at 5%), the dense GEMM's does
not, so above ~20% the row blocks (one dense GEMM in total, ops/naive.py) are cheaper.

Dtypes: MKL's CSR products take fp32 and fp64 only, and cuSPARSE's SDDMM has no bf16 (torch
upcasts bf16 to fp32 itself there; PyTorch PRs #165056, #187681), so half-precision operands are
cast to fp32 here on every device (two extra ops: x and dy; an fp32 copy of each, as the row
blocks made on the CPU). The sums accumulate in fp32 (fp64 for fp64 operands). On CUDA the same
rule is stated, not yet measured: cuSPARSE's fp32 SDDMM runs on CUDA cores (2·nnz·T flops), so
at bf16 on a GPU it beats the tensor-core row blocks only while ``density < ~1/(2 × the
tensor-core/CUDA-core rate ratio)`` ≈ 5%; the GPU session's ``spft-bench`` decides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from . import naive
from .csr_index import CsrIndex
from .index import index_dtype_for

Tensor = torch.Tensor

# Above this density the row blocks of ops/naive.py (one dense GEMM in total) are cheaper than the
# library's sparse products, whose cost grows with nnz (0.24x-0.40x the GEMM at 5%, measured).
LIBRARY_MAX_DENSITY = 0.2


def uses_library(csr: CsrIndex) -> bool:
    """Whether the library's sparse ops run (from host values only: no device sync)."""
    total = csr.out_features * csr.in_features
    return total > 0 and csr.nnz <= LIBRARY_MAX_DENSITY * total


def _shapes_only(t: Tensor) -> bool:
    """Fake or meta tensors (torch.compile's tracing, ``spft-bench --memory``): torch cannot build
    a sparse tensor from them, so the products are then modelled by what they allocate."""
    return t.device.type == "meta" or is_fake(t)


def _operand(t: Tensor, acc: torch.dtype) -> Tensor:
    return t if t.dtype == acc else t.to(acc)


def sddmm(x2d: Tensor, dy2d: Tensor, csr: CsrIndex, columns: Optional[Tensor] = None) -> Tensor:
    """``grad[k] = Σ_t dy[t, row_k] x[t, col_k]`` [nnz] in fp32 (fp64 for fp64 operands)."""
    acc = naive.accumulate_dtype(x2d, dy2d)
    if csr.nnz == 0 or x2d.shape[0] == 0:
        return torch.zeros(csr.nnz, dtype=acc, device=x2d.device)
    if not uses_library(csr):
        return naive.sddmm(x2d, dy2d, csr.flat(_flat_dtype(csr)))
    # The pattern's values are read (beta * values): zeros, or a NaN in them would leak through.
    values = torch.zeros(csr.nnz, dtype=acc, device=x2d.device)
    if _shapes_only(x2d):  # sampled_addmm returns a new CSR: its values and int64 copies of the indices
        cols = csr.columns() if columns is None else columns
        result_indices = (csr.crow.to(torch.int64, copy=True), cols.to(torch.int64, copy=True))
        result_values = torch.empty_like(values)
        del result_indices  # freed with the CSR result, once its values are taken
        return result_values
    pattern = csr.tensor(values, columns)
    return torch.sparse.sampled_addmm(pattern, _operand(dy2d, acc).t(), _operand(x2d, acc), beta=0.0).values()


def x_delta_t(x2d: Tensor, delta: Tensor, csr: CsrIndex, columns: Optional[Tensor] = None) -> Tensor:
    """``x Δᵀ`` as a [T, out] view (of an [out, T] result) in the accumulate dtype."""
    return _product(x2d, delta, csr, columns, transposed=False)


def dy_delta(dy2d: Tensor, delta: Tensor, csr: CsrIndex, columns: Optional[Tensor] = None) -> Tensor:
    """``dy Δ`` as a [T, in] view (of an [in, T] result) in the accumulate dtype."""
    return _product(dy2d, delta, csr, columns, transposed=True)


def _product(dense2d: Tensor, delta: Tensor, csr: CsrIndex, columns: Optional[Tensor], transposed: bool) -> Tensor:
    """``dense Δᵀ`` (``transposed``: ``dense Δ``) as a [T, width] view of a [width, T] result."""
    acc = naive.accumulate_dtype(dense2d, delta)
    width = csr.in_features if transposed else csr.out_features
    if not uses_library(csr):
        zeros = torch.zeros(dense2d.shape[0], width, dtype=acc, device=dense2d.device)
        reference = naive.spmm_t_add if transposed else naive.spmm_add
        return reference(zeros, dense2d, delta, csr.flat(_flat_dtype(csr)))
    if _shapes_only(dense2d):
        return dense2d.new_empty((width, dense2d.shape[0]), dtype=acc).t()
    sparse = csr.tensor(_operand(delta, acc), columns)
    return torch.mm(sparse.t() if transposed else sparse, _operand(dense2d, acc).t()).t()


def linear_with_delta(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, csr: CsrIndex,
                      columns: Optional[Tensor] = None) -> Optional[Tensor]:
    """``x W0ᵀ + b + x Δᵀ`` [T, out] in two ops, or None where they do not apply (half-precision
    operands, the row-block fallback, fake tensors): the CSR product ``b + Δ xᵀ`` [out, T] is
    the accumulator the dense GEMM adds into (``addmm`` of its transpose), so no strided add of
    a transposed product follows (that add cost 12 ms at 2048x2048, 1,024 tokens: more than the
    product, 6 ms; split mode went from 1.10x to about merged's time)."""
    acc = naive.accumulate_dtype(x2d, delta)
    if x2d.dtype != acc or weight.dtype != acc or not uses_library(csr) or _shapes_only(x2d):
        return None
    pattern = csr.tensor(_operand(delta, acc), columns)
    if bias is None:
        product = torch.mm(pattern, x2d.t())
    else:
        product = torch.addmm(_operand(bias, acc)[:, None].expand(csr.out_features, x2d.shape[0]), pattern, x2d.t())
    return torch.addmm(product.t(), x2d, weight.t())


def dx_with_delta(dy2d: Tensor, weight: Tensor, delta: Tensor, csr: CsrIndex,
                  columns: Optional[Tensor] = None) -> Optional[Tensor]:
    """``dy W0 + dy Δ`` [T, in] in two ops (as :func:`linear_with_delta`), or None."""
    acc = naive.accumulate_dtype(dy2d, delta)
    if dy2d.dtype != acc or weight.dtype != acc or not uses_library(csr) or _shapes_only(dy2d):
        return None
    product = torch.mm(csr.tensor(_operand(delta, acc), columns).t(), dy2d.t())
    return torch.addmm(product.t(), dy2d, weight)


def add_rounded_(base: Optional[Tensor], product: Tensor, dtype: torch.dtype) -> Tensor:
    """``base + product`` in ``dtype``, rounded once: in place into ``base`` when it has the
    product's dtype (one op), else summed in the product's dtype and rounded (two or three)."""
    if base is None:
        return _contiguous(product, dtype)
    if base.dtype == product.dtype:
        return base.add_(product)
    return _contiguous(product.add(base), dtype)


def _contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    # .to(the same dtype, memory_format=...) returns a transposed view as it is: copy explicitly.
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _flat_dtype(csr: CsrIndex) -> torch.dtype:
    return index_dtype_for(csr.out_features, csr.in_features)
