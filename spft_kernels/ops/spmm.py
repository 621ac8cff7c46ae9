"""Sparse x dense products with a trainable sparse ``Δ`` (entries ``delta[k]`` at flat
positions ``index[k] = row * in + col``), each returning ``base + product`` rounded once:

- ``spmm_add(base, x, delta, index, row_ptr)``             -> ``base + x Δᵀ`` (CSR, by output row)
- ``spmm_t_add(base, dy, delta, index, col_ptr, csc_perm)`` -> ``base + dy Δ``  (CSC, by input column)

2-D operands [T, features]; accumulation in fp32 (fp64 for fp64 operands); the order of the sum
is fixed, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch

from . import naive
from ._linear_args import unit_feature_stride
from ._triton import tl, triton
from .backends import implementation, register, resolve_backend

Tensor = torch.Tensor


# --- spmm_add: base + x Δᵀ -----------------------------------------------------------------


@torch.library.custom_op("spft::spmm_add", mutates_args=())
def spmm_add(base: Tensor, x: Tensor, delta: Tensor, index: Tensor, row_ptr: Tensor, backend: str) -> Tensor:
    """``base + x Δᵀ`` for 2-D ``base`` [T, out] and ``x`` [T, in]; fp32 accumulation, one rounding."""
    chosen = resolve_backend("spmm_add", backend, x.device)
    return implementation("spmm_add", chosen)(base, x, delta, index, row_ptr)


@spmm_add.register_fake
def _(base, x, delta, index, row_ptr, backend):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@register("spmm_add", "reference")
def _spmm_add_reference(base, x, delta, index, row_ptr):
    return naive.spmm_add(base, x, delta, index)


# --- spmm_t_add: base + dy Δ ----------------------------------------------------------------


@torch.library.custom_op("spft::spmm_t_add", mutates_args=())
def spmm_t_add(
    base: Tensor, dy: Tensor, delta: Tensor, index: Tensor, col_ptr: Tensor, csc_perm: Tensor, backend: str
) -> Tensor:
    """``base + dy Δ`` for 2-D ``base`` [T, in] and ``dy`` [T, out]."""
    chosen = resolve_backend("spmm_t_add", backend, dy.device)
    return implementation("spmm_t_add", chosen)(base, dy, delta, index, col_ptr, csc_perm)


@spmm_t_add.register_fake
def _(base, dy, delta, index, col_ptr, csc_perm, backend):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@register("spmm_t_add", "reference")
def _spmm_t_add_reference(base, dy, delta, index, col_ptr, csc_perm):
    return naive.spmm_t_add(base, dy, delta, index)


# --- CUDA (csrc/spmm.cu) ---------------------------------------------------------------------
# Not picked by "auto" until verified and measured on a GPU (see backends.register).


@register("spmm_add", "cuda", auto=False)
def _spmm_add_cuda(base, x, delta, index, row_ptr):
    return torch.ops.spft.cuda_spmm_add(unit_feature_stride(base), unit_feature_stride(x), delta, index, row_ptr)


@register("spmm_t_add", "cuda", auto=False)
def _spmm_t_add_cuda(base, dy, delta, index, col_ptr, csc_perm):
    return torch.ops.spft.cuda_spmm_t_add(
        unit_feature_stride(base), unit_feature_stride(dy), delta, index, col_ptr, csc_perm
    )


# --- Triton -------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _spmm_kernel(
        base_ptr, src_ptr, out_ptr, pointers_ptr, perm_ptr, flat_ptr, delta_ptr,
        num_tokens, in_features, stride_base_t, stride_base_f, stride_src, stride_out,
        TRANSPOSED: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        # One program: output feature `o` (a row of Δ, or a column when TRANSPOSED) for BLOCK_T
        # tokens; the entries of `o` are consumed BLOCK_E at a time in index order, so the sum's
        # order is fixed. Positions in int64: t * stride and row * in can pass 2**31.
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        o = tl.program_id(0)
        tokens = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        token_mask = tokens < num_tokens
        start = tl.load(pointers_ptr + o).to(tl.int64)
        end = tl.load(pointers_ptr + o + 1).to(tl.int64)
        acc = tl.zeros((BLOCK_T,), dtype=acc_dtype)
        for first in range(start, end, BLOCK_E):
            slots = first + tl.arange(0, BLOCK_E)
            slot_mask = slots < end
            if TRANSPOSED:
                entries = tl.load(perm_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
            else:
                entries = slots
            positions = tl.load(flat_ptr + entries, mask=slot_mask, other=0).to(tl.int64)
            rows = positions // in_features
            gathered = rows if TRANSPOSED else positions - rows * in_features
            values = tl.load(delta_ptr + entries, mask=slot_mask, other=0.0).to(acc_dtype)
            src = tl.load(
                src_ptr + tokens[:, None] * stride_src + gathered[None, :],
                mask=token_mask[:, None] & slot_mask[None, :],
                other=0.0,
            ).to(acc_dtype)
            acc += tl.sum(src * values[None, :], axis=1)
        # base in any layout (a transposed dy or y is [features, T] in memory): both strides.
        base = tl.load(base_ptr + tokens * stride_base_t + o * stride_base_f, mask=token_mask, other=0.0).to(acc_dtype)
        tl.store(out_ptr + tokens * stride_out + o, (base + acc).to(out_ptr.dtype.element_ty), mask=token_mask)

    def _spmm_triton(base, src, delta, index, pointers, perm, in_features, transposed):
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        num_tokens, num_outputs = base.shape
        if num_tokens == 0 or num_outputs == 0:
            return out
        src = unit_feature_stride(src)
        block_t = 64
        grid = (num_outputs, triton.cdiv(num_tokens, block_t))
        _spmm_kernel[grid](
            base, src, out, pointers, perm if perm is not None else pointers, index, delta,
            num_tokens, in_features, base.stride(0), base.stride(1), src.stride(0), out.stride(0),
            TRANSPOSED=transposed, ACC_FP64=naive.accumulate_dtype(base, src, delta) == torch.float64,
            BLOCK_T=block_t, BLOCK_E=32,
        )
        return out

    @register("spmm_add", "triton")
    def _spmm_add_triton(base, x, delta, index, row_ptr):
        return _spmm_triton(base, x, delta, index, row_ptr, None, x.shape[1], transposed=False)

    @register("spmm_t_add", "triton")
    def _spmm_t_add_triton(base, dy, delta, index, col_ptr, csc_perm):
        return _spmm_triton(base, dy, delta, index, col_ptr, csc_perm, base.shape[1], transposed=True)
