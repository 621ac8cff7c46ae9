"""The delta term of a layer whose base computes its own product (a quantized base: bitsandbytes
computes ``y0 = x dequant(Wq)ᵀ + b`` and the gradient of x through it).

Rows and blocks: ``y = y0 + x Δᵀ`` with

- forward: ``x Δᵀ`` added into a copy of ``y0`` (rows: ``y[..., rows] += x Wfᵀ``; blocks: one
  batched GEMM over the selected blocks, added slot by slot);
- backward: ``dy0 = dy``, ``dx = dy Δ`` (added by autograd to the base's own ``dy dequant(Wq)``),
  and the same delta gradient as over a dense base (SDDMM / ``gᵀ x`` / batched GEMM): it needs
  only x and dy, never W0.

Scattered entries instead add Δ into the dequantized weight the base makes for its GEMM anyway
(``entries_on_dequantized``): a split SpMM pair costs more than that GEMM on the CPU (222 ms each
against 175 at 2048 x 2048, 1,024 tokens, 6.25%).

Only x is saved (and the layer's own delta and positions; scattered entries keep their 2-byte
compact index saved and expand it in backward, as the dense op does). The same reference math as
the dense-base ops (``naive.py``, ``row_delta_linear.py``, ``block_delta_linear.py``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import naive
from .block_delta_linear import _add_blocks, _bmm_acc, _gather, _live_delta, _rows_cols
from .block_index import BlockIndex
from .index import SparseIndex
from .row_gather import row_gather
from .row_scatter_add import _row_scatter_add_op
from .scatter_delta import scatter_delta_
from .sddmm import sddmm
from .sparse_delta_linear import _canonical, _metadata_for

Tensor = torch.Tensor


def _flatten(y0: Tensor, x: Tensor) -> tuple[Tensor, Tensor, int]:
    tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) fails for a zero-width layer
    return y0.reshape(tokens, y0.shape[-1]), x.reshape(tokens, x.shape[-1]), tokens


def _copy(y0: Tensor) -> Tensor:
    # The sum goes into a copy: the base's output may be a view made inside bitsandbytes'
    # autograd Function, which autograd forbids writing in place (y0 itself is freed right after,
    # as nothing saves it).
    return y0.clone(memory_format=torch.contiguous_format)


class _EntriesOnDequantized(torch.autograd.Function):
    """``y = x (W0 + Δ)ᵀ + b`` with ``W0 = dequantize()`` made for the call: the dequantized
    weight bitsandbytes itself makes for its GEMM (on the CPU in both passes, on CUDA in the
    backward), with the nnz entries of Δ added into it (O(nnz), fp32 sum rounded once), one GEMM,
    and freed; the backward makes it again for ``dx = dy (W0 + Δ)``. The delta gradient is the
    masked ``dyᵀ x``. One out x in temporary of one layer at a time, never kept."""

    @staticmethod
    def forward(ctx, x, delta, dequantize, bias, stored, block_ends, metadata, shape, backend):
        weight = _merged_weight(dequantize, delta, stored, block_ends, shape, backend)
        y = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)
        ctx.save_for_backward(x, delta, stored, block_ends)
        ctx.dequantize, ctx.index_metadata, ctx.shape, ctx.backend = dequantize, metadata, shape, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, delta, stored, block_ends = ctx.saved_tensors
        dy2d, x2d, _ = _flatten(dy, x)
        dx = ddelta = None
        if ctx.needs_input_grad[0]:
            weight = _merged_weight(ctx.dequantize, delta, stored, block_ends, ctx.shape, ctx.backend)
            dx = dy2d.to(weight.dtype).mm(weight).to(x.dtype).view(x.shape)
            del weight
        if ctx.needs_input_grad[1]:
            flat = _canonical(stored, block_ends, ctx.shape)
            ddelta = _masked_gradient(x2d, dy2d, flat, ctx.index_metadata, ctx.shape, ctx.backend).to(delta.dtype)
        return dx, ddelta, None, None, None, None, None, None, None


def _merged_weight(dequantize, delta, stored, block_ends, shape, backend) -> Tensor:
    weight = dequantize()
    return scatter_delta_(weight, _canonical(stored, block_ends, shape), delta=delta.detach(), backend=backend)


def _masked_gradient(x2d: Tensor, dy2d: Tensor, flat: Tensor, metadata: dict, shape, backend: str) -> Tensor:
    """``(dyᵀ x)[flat]``. On the CPU in fp32/fp64, torch.sparse's ``sampled_addmm`` (MKL): at
    2048 x 2048, 1,024 tokens it took 17 ms at 1.6% and 63 ms at 6.25% density, where the
    row-block GEMMs of the reference sddmm took 216 and 236 ms (a GEMM: 175 ms), which decides
    whether entries keep up with QLoRA there. Elsewhere (and on fake tensors: a GPU's path) the
    sddmm op."""
    if x2d.device.type == "cpu" and x2d.dtype in (torch.float32, torch.float64) and dy2d.dtype == x2d.dtype \
            and not _is_fake(x2d) and flat.numel():
        out_features, in_features = shape
        rows = torch.div(flat, in_features, rounding_mode="floor")
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        with warnings.catch_warnings():  # (torch's notice that sparse CSR support is in beta)
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            mask = torch.sparse_csr_tensor(row_ptr, (flat - rows * in_features).long(),
                                           torch.zeros(flat.numel(), dtype=x2d.dtype), (out_features, in_features),
                                           check_invariants=False)  # (a canonical index: valid by construction)
            return torch.sparse.sampled_addmm(mask, dy2d.t().contiguous(), x2d.contiguous(), beta=0.0).values()
    return sddmm(x2d, dy2d, flat, metadata["tile_ptr"], backend)


def _is_fake(tensor: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def entries_on_dequantized(x: Tensor, delta: Tensor, sparse_index: SparseIndex, dequantize, bias: Optional[Tensor],
                           backend: str = "auto") -> Tensor:
    """``x (W0 + Δ)ᵀ + b`` for scattered entries over a base that dequantizes its weight on
    request (``dequantize()``: a new dense W0 in the compute dtype), see ``_EntriesOnDequantized``."""
    stored, block_ends = sparse_index.stored()
    metadata = _metadata_for(sparse_index, "split", backend, x.device)
    return _EntriesOnDequantized.apply(x, delta, dequantize, bias, stored, block_ends, metadata, sparse_index.shape,
                                       backend)


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

