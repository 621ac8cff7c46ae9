"""SDDMM for the delta gradient: ``grad[k] = Σ_t dy[t, row_k] · x[t, col_k]`` over only the
masked entries (never the dense ``dyᵀx``), reading ``x`` and ``dy`` in their native row-major
layout, accumulating in fp32 (fp64 for fp64 inputs), deterministically.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import naive
from ._linear_args import unit_feature_stride
from ._triton import tl, triton
from .backends import implementation, register, resolve_backend
from .index import TILE_K

Tensor = torch.Tensor


# --- sddmm: d delta --------------------------------------------------------------------------


@torch.library.custom_op("spft::sddmm", mutates_args=())
def sddmm(x: Tensor, dy: Tensor, index: Tensor, tile_ptr: Optional[Tensor], backend: str) -> Tensor:
    """``grad[k] = Σ_t dy[t, row_k] x[t, col_k]`` for 2-D ``x`` [T, in], ``dy`` [T, out]; fp32
    result (fp64 for fp64 inputs). ``tile_ptr`` (``SparseIndex.tile_ptr``, present at densities
    where it pays) lets the Triton backend run the tensor-core variant."""
    chosen = resolve_backend("sddmm", backend, x.device)
    return implementation("sddmm", chosen)(x, dy, index, tile_ptr)


@sddmm.register_fake
def _(x, dy, index, tile_ptr, backend):
    return x.new_empty(index.shape, dtype=naive.accumulate_dtype(x, dy))


# The default on every device: one dense GEMM by row blocks (or the gather path at very low
# density and few tokens), see naive.sddmm.
@register("sddmm", "reference")
def _sddmm_reference(x, dy, index, tile_ptr):
    return naive.sddmm(x, dy, index)


# --- CUDA (csrc/sddmm.cu) ---------------------------------------------------------------------


# Not picked by "auto" until verified and measured on a GPU (see backends.register). Given
# tile_ptr (the index builds it from TILE_SDDMM_MIN_DENSITY up), fp16/bf16 inputs run the
# tensor-core variant, everything else the gather-dot variant.
@register("sddmm", "cuda", auto=False)
def _sddmm_cuda(x, dy, index, tile_ptr):
    return torch.ops.spft.cuda_sddmm(unit_feature_stride(x), unit_feature_stride(dy), index, tile_ptr)


# --- Triton -------------------------------------------------------------------------------------

# Partial sums per token split are at most this many values (64 MiB in fp32).
_MAX_PARTIALS = 1 << 24

if triton is not None:

    @triton.jit
    def _sddmm_gather_dot_kernel(
        x_ptr, dy_ptr, flat_ptr, partial_ptr,
        num_tokens, nnz, in_features, stride_x, stride_dy, tokens_per_split,
        ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # Low-density variant on CUDA cores (work ∝ nnz · T): program (entry block, token split)
        # writes its partial sums; pass two adds the splits in a fixed order, so the gradient is
        # bitwise reproducible without float atomics. Entries are sorted by row, so neighbouring
        # entries gather from the same rows of dy.
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        split = tl.program_id(1)
        entry_mask = entries < nnz
        positions = tl.load(flat_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        rows = positions // in_features
        cols = positions - rows * in_features
        first_token = split * tokens_per_split
        last_token = tl.minimum(first_token + tokens_per_split, num_tokens)
        acc = tl.zeros((BLOCK_E,), dtype=acc_dtype)
        for t0 in range(first_token, last_token, BLOCK_T):
            tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (tokens < last_token)[:, None] & entry_mask[None, :]
            dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + rows[None, :], mask=mask, other=0.0)
            x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(dy.to(acc_dtype) * x.to(acc_dtype), axis=0)
        tl.store(partial_ptr + split.to(tl.int64) * nnz + entries, acc, mask=entry_mask)

    @triton.jit
    def _sddmm_tile_kernel(
        x_ptr, dy_ptr, flat_ptr, tile_ptr_ptr, grad_ptr,
        num_tokens, out_features, in_features, stride_x, stride_dy, tile_ptr_stride,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, TILE: tl.constexpr,
    ):
        # High-density variant on tensor cores: the dense [BLOCK_N, BLOCK_K] tile of dyᵀx over all
        # tokens (one program per tile, tokens in order: deterministic without a second pass), then
        # a masked epilogue writes only the tile's entries. Row n's entries inside the tile are the
        # contiguous run tile_ptr[n, k0/TILE] .. tile_ptr[n, k1/TILE] of the canonical order, so an
        # element's position is its run's start plus the number of run entries left of it.
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        row_mask = rows < out_features
        first_tile = tl.program_id(1) * (BLOCK_K // TILE)
        last_tile = tl.minimum(first_tile + BLOCK_K // TILE, tile_ptr_stride - 1)
        starts = tl.load(tile_ptr_ptr + rows * tile_ptr_stride + first_tile, mask=row_mask, other=0).to(tl.int64)
        ends = tl.load(tile_ptr_ptr + rows * tile_ptr_stride + last_tile, mask=row_mask, other=0).to(tl.int64)
        longest = tl.max(ends - starts, axis=0)
        if longest > 0:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            col_mask = cols < in_features
            for t0 in range(0, num_tokens, BLOCK_T):
                tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                token_mask = tokens < num_tokens
                dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + rows[None, :],
                             mask=token_mask[:, None] & row_mask[None, :], other=0.0)
                x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :],
                            mask=token_mask[:, None] & col_mask[None, :], other=0.0)
                # ieee: fp32 inputs must not drop to tf32; bf16/fp16 run on tensor cores either way
                acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
            positions = starts[:, None] + tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int64)
            present = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int1)
            for j in range(0, longest):
                in_run = (starts + j) < ends
                entry_cols = tl.load(flat_ptr + starts + j, mask=in_run, other=0).to(tl.int64) - rows * in_features
                present = present | (in_run[:, None] & (entry_cols[:, None] == cols[None, :]))
                positions += (in_run[:, None] & (entry_cols[:, None] < cols[None, :])).to(tl.int64)
            tl.store(grad_ptr + positions, acc, mask=present)

    def _sddmm_tiles(x, dy, index, tile_ptr):
        grad = torch.empty(index.numel(), dtype=torch.float32, device=x.device)
        block_n, block_k = 64, 64
        grid = (triton.cdiv(dy.shape[1], block_n), triton.cdiv(x.shape[1], block_k))
        _sddmm_tile_kernel[grid](
            x, dy, index, tile_ptr, grad, x.shape[0], dy.shape[1], x.shape[1], x.stride(0), dy.stride(0),
            tile_ptr.shape[1], BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_T=32, TILE=TILE_K,
        )
        return grad

    @register("sddmm", "triton")
    def _sddmm_triton(x, dy, index, tile_ptr):
        acc = naive.accumulate_dtype(x, dy)
        nnz, num_tokens = index.numel(), x.shape[0]
        if nnz == 0 or num_tokens == 0:
            return torch.zeros(nnz, dtype=acc, device=x.device)
        x, dy = unit_feature_stride(x), unit_feature_stride(dy)
        if tile_ptr is not None and acc == torch.float32:
            return _sddmm_tiles(x, dy, index, tile_ptr)
        # The split count depends on the shapes only, never on the device: same inputs, same bits.
        splits = max(1, min(64, triton.cdiv(num_tokens, 512), _MAX_PARTIALS // nnz))
        tokens_per_split = triton.cdiv(num_tokens, splits)
        splits = triton.cdiv(num_tokens, tokens_per_split)
        partials = torch.empty(splits, nnz, dtype=acc, device=x.device)
        block_e = 64
        _sddmm_gather_dot_kernel[(triton.cdiv(nnz, block_e), splits)](
            x, dy, index, partials, num_tokens, nnz, x.shape[1], x.stride(0), dy.stride(0), tokens_per_split,
            ACC_FP64=acc == torch.float64, BLOCK_E=block_e, BLOCK_T=32,
        )
        return partials.sum(dim=0)
