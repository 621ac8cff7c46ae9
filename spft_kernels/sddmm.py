"""SDDMM for the delta gradient: ``grad[k] = Σ_t dy[t, row_k] · x[t, col_k]`` over only the
masked entries (never the dense ``dyᵀx``), reading ``x`` and ``dy`` in their native row-major
layout, accumulating in fp32 (fp64 for fp64 inputs), deterministically.
"""

from __future__ import annotations

import torch

from . import naive
from ._triton import tl, triton
from .backends import implementation, register, resolve_backend

Tensor = torch.Tensor


# --- sddmm: d delta --------------------------------------------------------------------------


@torch.library.custom_op("spft::sddmm", mutates_args=())
def sddmm(x: Tensor, dy: Tensor, index: Tensor, backend: str) -> Tensor:
    """``grad[k] = Σ_t dy[t, row_k] x[t, col_k]`` for 2-D ``x`` [T, in], ``dy`` [T, out]; fp32
    result (fp64 for fp64 inputs)."""
    chosen = resolve_backend("sddmm", backend, x.device)
    return implementation("sddmm", chosen)(x, dy, index)


@sddmm.register_fake
def _(x, dy, index, backend):
    return x.new_empty(index.shape, dtype=naive.accumulate_dtype(x, dy))


@register("sddmm", "reference")
def _sddmm_reference(x, dy, index):
    rows = torch.div(index, x.shape[1], rounding_mode="floor")
    return naive.sddmm(x, dy, rows, index - rows * x.shape[1])


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

    @register("sddmm", "triton")
    def _sddmm_triton(x, dy, index):
        acc = naive.accumulate_dtype(x, dy)
        nnz, num_tokens = index.numel(), x.shape[0]
        if nnz == 0 or num_tokens == 0:
            return torch.zeros(nnz, dtype=acc, device=x.device)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
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
