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
import torch.nn.functional as F
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
    a sparse tensor from them, so the products are then modelled by what they allocate. (A plain
    tensor is never fake: ``is_fake`` costs ~3 µs a call, 2-3 calls a step.)"""
    return t.device.type == "meta" or (type(t) is not Tensor and is_fake(t))


def _operand(t: Tensor, acc: torch.dtype) -> Tensor:
    return t if t.dtype == acc else t.to(acc)


# A step of at most this many ``out x in x tokens`` takes the masked gradient as the dense ``dyᵀ x``
# GEMM and one gather at the flat positions (2 ops) instead of ``sampled_addmm`` (3 ops with the
# columns' cast and the pattern's zeros; ~15 µs of fixed cost on the development CPU). Measured
# there (fp32, one thread, median, dense / sampled; bench/results/cpu-split-tiny-2026-12-02/
# rules.txt): 0.26-0.43x at 2^12-2^16 (64x64 at 1-16 tokens, 256x256 at 1), 0.43-0.87x at 2^18
# (64x64 at 64, 128x128 at 16, 512x512 at 1), 0.74-1.02x at 2^20 (64x64 at 256, 128x128 at 64,
# 256x256 at 16), 1.5-2.5x at 2^22: the bound sits between the last measured wins and the ties.
# The temporary is ``out x in`` of a weight small enough to keep its flat
# positions (``index.KEPT_FLAT_MAX_ENTRIES``: at most 1 MiB), freed at once. On CUDA the same
# shapes are launch-bound: one GEMM and one gather against cuSPARSE's SDDMM (buffer size,
# preprocess, compute) plus the cast and the zeros.
DENSE_GRADIENT_MAX_WORK = 1 << 19


def uses_dense_gradient(csr: CsrIndex, tokens: int) -> bool:
    return csr.out_features * csr.in_features * tokens <= DENSE_GRADIENT_MAX_WORK


def sddmm(x2d: Tensor, dy2d: Tensor, csr: CsrIndex, columns: Optional[Tensor] = None,
          flat: Optional[Tensor] = None) -> Tensor:
    """``grad[k] = Σ_t dy[t, row_k] x[t, col_k]`` [nnz] in fp32 (fp64 for fp64 operands).
    ``flat``: the canonical flat positions, where the caller keeps them (small weights): then a
    small step takes the dense GEMM and a gather (:func:`uses_dense_gradient`)."""
    acc = naive.accumulate_dtype(x2d, dy2d)
    if csr.nnz == 0 or x2d.shape[0] == 0:
        return torch.zeros(csr.nnz, dtype=acc, device=x2d.device)
    if flat is not None and x2d.dtype == acc and dy2d.dtype == acc and uses_dense_gradient(csr, x2d.shape[0]):
        return torch.mm(dy2d.t(), x2d).view(-1).index_select(0, flat)  # (dense ops: fake tensors too)
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
    product, 6 ms; split mode went from 1.10x to about merged's time). A small weight
    (:func:`uses_private_sum`) takes one GEMM with ``W0 + Δ`` instead."""
    acc = naive.accumulate_dtype(x2d, delta)
    if x2d.dtype != acc or weight.dtype != acc:
        return None
    if uses_private_sum(csr):
        return F.linear(x2d, private_sum(weight, delta, csr, columns), None if bias is None else _operand(bias, acc))
    if not uses_library(csr) or _shapes_only(x2d):
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
    if dy2d.dtype != acc or weight.dtype != acc:
        return None
    if uses_private_sum(csr):
        return dy2d.mm(private_sum(weight, delta, csr, columns))
    if not uses_library(csr) or _shapes_only(dy2d):
        return None
    product = torch.mm(csr.tensor(_operand(delta, acc), columns).t(), dy2d.t())
    return torch.addmm(product.t(), dy2d, weight)


# --- small weights: one GEMM with a private W0 + Δ -----------------------------------------------

# Split mode computes ``x (W0 + Δ)ᵀ`` and ``dy (W0 + Δ)`` through a private ``W0 + Δ`` (one
# dense + CSR add, then the GEMM merged mode runs) for weights of at most this many entries.
# Why: at a small weight a step's time is per-call overhead, and the CSR products cost far more
# than their flops: ``dy Δ`` multiplies by the CSR's transpose, a CSC view that torch converts to
# CSR inside every call (MKL gets opA = non-transpose only: a sort and ~12 ops; dx took 46 µs at
# 64x64, 16 tokens, 12.5 µs from a CSR of Δᵀ built beforehand), and each product copies its
# transposed dense operand. Measured (development CPU, fp32, one thread, forward + dx of one
# layer, median; bench/results/cpu-split-tiny-2026-12-02/rules.txt):
#
# | weight, tokens | 1%: private sum / CSR products | 5% |
# |---|---|---|
# | 64x64, 16 / 256 | 0.33x (20 / 62 µs) / 0.44x | 0.31x / 0.42x |
# | 256x256, 16 / 256 | 0.59x / 0.77x | 0.39x / 0.62x |
# | 512x512, 16 / 256 | 0.76x / 0.83x | 0.29x / 0.65x |
# | 1024x1024, 16 / 256 | 0.82x / 0.93x | 0.57x / 0.79x |
#
# so the sum is faster at every size measured; the bound is set by memory, not speed: split
# mode keeps no out x in tensor in general (docs/architecture.md, "one training step"), and this
# temporary is allowed only while it is tiny: at most 2^18 entries (1 MiB in fp32, 2 MiB in
# fp64; 512x512), one at a time, freed inside the op that makes it (the backward makes it
# again: it is never saved), whatever the model's size, so a step's peak memory grows by at
# most 1 MiB. No weight of a 7B-class model is that small (4096x4096 is 2^24), so their memory
# and speed are as before. The result is bitwise merged mode's (``W0 + Δ`` rounded once, then
# the same GEMM), not the split sum's order; both are checked against fp64.
# On CUDA the same bound holds by the same count: one elementwise kernel (torch's dense + CSR
# add) of at most 2^18 entries (~µs) replaces two cuSPARSE SpMM calls (descriptors, a workspace
# and the CSC operand's conversion each), so a small layer's step is launch-bound either way and
# this path launches fewer and cheaper ops.
PRIVATE_SUM_MAX_ENTRIES = 1 << 18


def uses_private_sum(csr: CsrIndex) -> bool:
    """Whether split mode's products go through a private ``W0 + Δ`` (host values only)."""
    return csr.nnz > 0 and csr.out_features * csr.in_features <= PRIVATE_SUM_MAX_ENTRIES


def private_sum(weight: Tensor, delta: Tensor, csr: CsrIndex, columns: Optional[Tensor] = None) -> Tensor:
    """``W0 + Δ`` [out, in] as a new contiguous tensor in the weight's dtype (fp32 / fp64 here:
    the sum rounded once, as merged mode writes it); one op besides the columns' cast. Fake or
    meta operands: a tensor of that size (torch builds no sparse tensor from them)."""
    if _shapes_only(weight):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.add(weight, csr.tensor(_operand(delta, weight.dtype), columns))


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
