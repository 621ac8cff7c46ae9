"""The delta-only term of a layer whose base is computed elsewhere (a quantized base: bitsandbytes
computes ``y0 = x dequant(Wq)ᵀ + b`` and the gradient of x through it): ``y = y0 + x Δᵀ`` with

- forward: ``x Δᵀ`` added into ``y0`` (entries: the SpMM; rows: ``y0[..., rows] += x Wfᵀ``;
  blocks: one batched GEMM over the selected blocks, added slot by slot);
- backward: ``dy0 = dy``, ``dx = dy Δ`` (added by autograd to the base's own ``dy dequant(Wq)``),
  and the same delta gradient as over a dense base (SDDMM / ``gᵀ x`` / batched GEMM): it needs
  only x and dy, never W0.

Only x is saved (and the layer's own delta and positions; scattered entries keep their 2-byte
compact index saved and expand it in backward, as the dense op does). The same reference math as
the dense-base ops (``naive.py``, ``row_delta_linear.py``, ``block_delta_linear.py``), without
the ``W0`` products.
"""

from __future__ import annotations

import math
import torch

from . import naive
from .block_delta_linear import _add_blocks, _bmm_acc, _gather, _live_delta, _rows_cols
from .block_index import BlockIndex
from .index import SparseIndex
from .row_gather import row_gather
from .row_scatter_add import _row_scatter_add_op
from .sddmm import sddmm
from .sparse_delta_linear import _canonical, _metadata_for, _or_empty
from .spmm import spmm_add, spmm_t_add

Tensor = torch.Tensor


def _flatten(y0: Tensor, x: Tensor) -> tuple[Tensor, Tensor, int]:
    tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) fails for a zero-width layer
    return y0.reshape(tokens, y0.shape[-1]), x.reshape(tokens, x.shape[-1]), tokens


def _copy(y0: Tensor) -> Tensor:
    # The sum goes into a copy: the base's output may be a view made inside bitsandbytes'
    # autograd Function, which autograd forbids writing in place (y0 itself is freed right after,
    # as nothing saves it).
    return y0.clone(memory_format=torch.contiguous_format)


class _EntriesTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, delta, stored, block_ends, metadata, shape, backend):
        y2d, x2d, _ = _flatten(y0, x)
        flat = _canonical(stored, block_ends, shape)
        y = spmm_add(y2d, x2d, delta, flat, _or_empty(metadata["row_ptr"], flat), backend)
        ctx.save_for_backward(x, delta, stored, block_ends)
        ctx.index_metadata, ctx.shape, ctx.backend = metadata, shape, backend
        return y.view(y0.shape)

    @staticmethod
    def backward(ctx, dy):
        x, delta, stored, block_ends = ctx.saved_tensors
        flat = _canonical(stored, block_ends, ctx.shape)
        dy2d, x2d, tokens = _flatten(dy, x)
        dx = ddelta = None
        if ctx.needs_input_grad[1]:
            zero = x2d.new_zeros(tokens, ctx.shape[1])
            dx = spmm_t_add(zero, dy2d, delta, flat, _or_empty(ctx.index_metadata["col_ptr"], flat),
                            _or_empty(ctx.index_metadata["csc_perm"], flat), ctx.backend).view(x.shape)
        if ctx.needs_input_grad[2]:
            ddelta = sddmm(x2d, dy2d, flat, ctx.index_metadata["tile_ptr"], ctx.backend).to(delta.dtype)
        return dy, dx, ddelta, None, None, None, None, None


def entries_term(y0: Tensor, x: Tensor, delta: Tensor, sparse_index: SparseIndex, backend: str = "auto") -> Tensor:
    """``y0 + x Δᵀ`` for scattered entries (``delta`` [nnz] at ``sparse_index``)."""
    if sparse_index.nnz == 0:
        return y0 + delta.sum().to(y0.dtype) * 0  # keeps delta in the graph: its gradient is an empty zero
    stored, block_ends = sparse_index.stored()
    metadata = _metadata_for(sparse_index, "split", backend, x.device)
    return _EntriesTerm.apply(y0, x, delta, stored, block_ends, metadata, sparse_index.shape, backend)


class _RowsTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, delta, rows, backend):
        y2d, x2d, _ = _flatten(_copy(y0), x)
        z = naive.mm_acc(x2d, delta.t(), naive.accumulate_dtype(x, delta))
        _row_scatter_add_op(y2d, z, rows, backend)
        ctx.save_for_backward(x, delta, rows)
        ctx.backend = backend
        return y2d.view(y0.shape)

    @staticmethod
    def backward(ctx, dy):
        x, delta, rows = ctx.saved_tensors
        dy2d, x2d, _ = _flatten(dy, x)
        g = row_gather(dy2d, rows, ctx.backend, validate=False)
        acc = naive.accumulate_dtype(x2d, dy2d, delta)
        dx = naive.mm_acc(g, delta, acc).to(x.dtype).view(x.shape) if ctx.needs_input_grad[1] else None
        ddelta = naive.mm_tn_acc(g, x2d, acc).to(delta.dtype) if ctx.needs_input_grad[2] else None
        return dy, dx, ddelta, None, None


def rows_term(y0: Tensor, x: Tensor, delta: Tensor, rows: Tensor, backend: str = "auto") -> Tensor:
    """``y0`` with ``x Wfᵀ`` added into the output ``rows`` (canonical rows; ``delta`` [R, in])."""
    if rows.numel() == 0:
        return y0 + delta.sum().to(y0.dtype) * 0
    return _RowsTerm.apply(y0, x, delta, rows, backend)


class _BlocksTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, delta, block_index: BlockIndex):
        y2d, x2d, _ = _flatten(_copy(y0), x)
        shape = (block_index.out_features, block_index.in_features)
        bh, bw = block_index.block_size
        _, cols = _rows_cols(block_index.blocks, shape, (bh, bw))
        live = _live_delta(delta, block_index.blocks, shape, (bh, bw))
        z = _bmm_acc(_gather(x2d, cols, bw).permute(1, 0, 2), live.transpose(1, 2), naive.accumulate_dtype(x, delta))
        by_row = block_index.by_row
        _add_blocks(y2d, z, by_row.targets, by_row.target_of, by_row.order, by_row.slot_ptr, bh)
        ctx.save_for_backward(x, delta)
        ctx.block_index = block_index
        return y2d.view(y0.shape)

    @staticmethod
    def backward(ctx, dy):
        x, delta = ctx.saved_tensors
        block_index = ctx.block_index
        shape = (block_index.out_features, block_index.in_features)
        bh, bw = block_index.block_size
        dy2d, x2d, tokens = _flatten(dy, x)
        rows, cols = _rows_cols(block_index.blocks, shape, (bh, bw))
        gdy = _gather(dy2d, rows, bh)  # [T, nb, bh]
        acc = naive.accumulate_dtype(x2d, dy2d, delta)
        dx = ddelta = None
        if ctx.needs_input_grad[2]:
            ddelta = _bmm_acc(gdy.permute(1, 2, 0), _gather(x2d, cols, bw).permute(1, 0, 2), acc).to(delta.dtype)
        if ctx.needs_input_grad[1]:
            dx2d = x2d.new_zeros(tokens, shape[1])
            z = _bmm_acc(gdy.permute(1, 0, 2), _live_delta(delta, block_index.blocks, shape, (bh, bw)), acc)
            by_col = block_index.by_col
            _add_blocks(dx2d, z, by_col.targets, by_col.target_of, by_col.order, by_col.slot_ptr, bw)
            dx = dx2d.view(x.shape)
        return dy, dx, ddelta, None


def blocks_term(y0: Tensor, x: Tensor, delta: Tensor, block_index: BlockIndex) -> Tensor:
    """``y0 + x Δᵀ`` for dense blocks (``delta`` [nb, bh, bw] at ``block_index``)."""
    if block_index.num_blocks == 0:
        return y0 + delta.sum().to(y0.dtype) * 0
    return _BlocksTerm.apply(y0, x, delta, block_index)

