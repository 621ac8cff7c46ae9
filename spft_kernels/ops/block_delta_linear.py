"""Block-sparse delta: ``y = x (W0 + Δ)ᵀ + b`` where Δ is ``nb`` dense blocks ``delta[k]`` of
``bh x bw`` at block ids ``blocks[k]`` (``block_index.py``): the op, its autograd, the functional
entry point and the merge writes. "Select sparsely, compute densely": every product is a dense
GEMM or one batched GEMM over the selected blocks, so no custom kernel is needed on any device.

- merged (the weight holds W0 + Δ): forward ``x Wᵀ + b`` and ``dx = dy W`` are plain GEMMs;
- split: ``x W0ᵀ + b`` plus, per block, ``x[:, cols_k] Δ_kᵀ`` added into ``y[:, rows_k]`` (one
  batched GEMM, then the slot-wise adds of ``block_index.py``), and ``dx = dy W0`` plus
  ``dy[:, rows_k] Δ_k`` added into ``dx[:, cols_k]`` the same way;
- the delta gradient, both modes: ``d Δ_k = dy[:, rows_k]ᵀ x[:, cols_k]`` as ONE batched GEMM
  over the gathered block columns of dy and x (temporaries [T, nb, bh] and [T, nb, bw]; never an
  out x in gradient), accumulated in fp32 (fp64 for fp64 inputs); density x the cost of the dense
  weight gradient. Deterministic: each block's sum is one GEMM, no atomics.

Only ``x`` is saved (W, delta and the blocks are the layer's own tensors). The number of ops per
call is fixed by the mask (split mode: one add per slot), never by the number of tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import naive
from ._eager import TensorList, eager_autograd, runs_eagerly
from ._linear_args import check_x_and_weight, prepare_operands, weight_for_dx
from .backends import check_backend_name, implementation, register, resolve_backend
from .block_index import BlockIndex, block_grid

Tensor = torch.Tensor

_HALF = (torch.float16, torch.bfloat16)


# --- block geometry ------------------------------------------------------------------------------


def _spans(ids: Tensor, block: int, size: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """For blocks at block positions ``ids`` along an axis of ``size``: the axis indices each
    block covers ``[n, block]``, clamped into the axis, with ``(valid [n, block], local [n, block])``
    when the axis has a clipped last block (``local``: the clamped offset inside the block), else
    ``(None, None)``."""
    offsets = torch.arange(block, device=ids.device)
    indices = ids.unsqueeze(1) * block + offsets
    if size % block == 0:
        return indices, None, None
    valid = indices < size
    local = torch.minimum(offsets.expand_as(indices), (size - 1 - ids * block).unsqueeze(1))
    return ids.unsqueeze(1) * block + local, valid, local


def _gather(t2d: Tensor, ids: Tensor, block: int) -> Tensor:
    """``t2d[:, the columns of each block]`` as [T, n, block]; columns past a clipped edge are 0."""
    tokens, size = t2d.shape
    if size % block == 0:
        return t2d.reshape(tokens, size // block, block).index_select(1, ids)
    indices, valid, _ = _spans(ids, block, size)
    gathered = t2d.index_select(1, indices.reshape(-1)).view(tokens, ids.numel(), block)
    return gathered.masked_fill_(~valid, 0)


def _bmm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` batched, accumulated and returned in ``acc``: on CUDA one cuBLAS batched GEMM with
    half inputs and fp32 output (b rounded to a's dtype for the tensor cores), elsewhere in ``acc``."""
    if a.dtype == acc and b.dtype == acc:
        return torch.bmm(a, b)
    if a.is_cuda and a.dtype in _HALF and acc == torch.float32:
        return torch.bmm(a, b.to(a.dtype), out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def _add_blocks(out2d: Tensor, z: Tensor, targets: Tensor, target_of: Tensor, order: Tensor, slot_ptr, block: int) -> None:
    """In place ``out2d[:, columns of block row/col t] += Σ_{k: target k = t} z[k]`` for ``z``
    [nb, T, block]: slot by slot, so that no call adds twice into one element (deterministic on
    every device), the sum in z's dtype, rounded once to out2d's."""
    tokens, size = out2d.shape
    slots = [(slot_ptr[s], slot_ptr[s + 1]) for s in range(len(slot_ptr) - 1)]

    def add_slots(into: Tensor, positions: Tensor) -> None:  # into: [T, *, block]
        for start, stop in slots:
            if stop - start == z.shape[0]:  # one slot holds every block: no selection needed
                into.index_add_(1, positions, z.permute(1, 0, 2))
            else:
                chosen = order[start:stop]
                into.index_add_(1, positions.index_select(0, chosen), z.index_select(0, chosen).permute(1, 0, 2))

    if z.dtype == out2d.dtype and size % block == 0 and out2d.is_contiguous():
        add_slots(out2d.view(tokens, size // block, block), targets.index_select(0, target_of))
        return
    # The touched column blocks, summed in z's dtype and written back once (a clipped edge's
    # clamped duplicates get the value of the column they repeat, so the write is unambiguous).
    indices, _, local = _spans(targets, block, size)
    flat = indices.reshape(-1)
    values = out2d.index_select(1, flat).view(tokens, targets.numel(), block).to(z.dtype)
    add_slots(values, target_of)
    values = values.view(tokens, -1)
    if local is not None:
        repeat = (torch.arange(targets.numel(), device=local.device).unsqueeze(1) * block + local).reshape(-1)
        values = values.index_select(1, repeat)
    out2d.index_copy_(1, flat, values.to(out2d.dtype))


def _live_delta(delta: Tensor, rows: Tensor, cols: Tensor, shape: tuple, block_size: tuple) -> Tensor:
    """``delta`` with the dead entries of clipped edge blocks zeroed (the ops never use them)."""
    out_features, in_features = shape
    bh, bw = block_size
    if out_features % bh == 0 and in_features % bw == 0:
        return delta
    _, row_valid, _ = _spans(rows, bh, out_features)
    _, col_valid, _ = _spans(cols, bw, in_features)
    live = torch.ones(rows.numel(), bh, bw, dtype=torch.bool, device=delta.device)
    if row_valid is not None:
        live &= row_valid.unsqueeze(2)
    if col_valid is not None:
        live &= col_valid.unsqueeze(1)
    return delta.masked_fill(~live, 0)


# --- the layer op --------------------------------------------------------------------------------

# The index form the op reads, by name (``index_form``): each block's block row and column, and
# the slot groups of both axes (split mode's deterministic adds, block_index.py).
_INDEX_FORM = ("block_rows", "block_cols", "row_order", "row_targets", "row_target_of",
               "col_order", "col_targets", "col_target_of")


def index_form_for(block_index: BlockIndex) -> tuple[list, str, list, list]:
    """``(tensors, names, row_slots, col_slots)``: what the op reads of ``block_index``."""
    rows, cols = block_index.rows_and_cols()
    by_row, by_col = block_index.by_row, block_index.by_col
    tensors = [rows, cols, by_row.order, by_row.targets, by_row.target_of, by_col.order, by_col.targets,
               by_col.target_of]
    return tensors, ",".join(_INDEX_FORM), list(by_row.slot_ptr), list(by_col.slot_ptr)


def _named(index: list, index_form: str) -> dict:
    return dict(zip(index_form.split(","), index))


@torch.library.custom_op("spft::block_delta_linear", mutates_args=())
def _block_delta_linear_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    delta: Tensor,
    index: list[Tensor],
    *,
    index_form: str,
    row_slots: list[int],
    col_slots: list[int],
    out_features: int,
    merged: bool,
    backend: str,
) -> Tensor:
    return _linear_impl(x, weight, bias, delta, index, index_form=index_form, row_slots=row_slots,
                        col_slots=col_slots, out_features=out_features, merged=merged, backend=backend)


def _linear_impl(x, weight, bias, delta, index, *, index_form, row_slots, col_slots, out_features, merged, backend):
    chosen = resolve_backend("block_delta_linear", backend, x.device)
    named = _named(index, index_form)
    row_groups = (named["row_order"], named["row_targets"], named["row_target_of"], row_slots)
    return implementation("block_delta_linear", chosen)(
        x, weight, bias, delta, named["block_rows"], named["block_cols"], row_groups, out_features, merged
    )


@register("block_delta_linear", "reference")
def _forward_reference(x, weight, bias, delta, block_rows, block_cols, row_groups, out_features, merged):
    in_features = x.shape[-1]
    tokens = math.prod(x.shape[:-1])
    if weight is not None:
        y = F.linear(x, weight, bias)
    else:
        y = x.new_zeros((*x.shape[:-1], out_features))
        if bias is not None:
            y.add_(bias)
    if merged or block_rows.numel() == 0:
        return y
    shape = (out_features, in_features)
    bh, bw = delta.shape[1:]
    if not y.is_contiguous():
        y = y.contiguous()
    gx = _gather(x.reshape(tokens, in_features), block_cols, bw)
    live = _live_delta(delta, block_rows, block_cols, shape, (bh, bw))
    z = _bmm_acc(gx.permute(1, 0, 2), live.transpose(1, 2), naive.accumulate_dtype(x, delta))  # [nb, T, bh]
    order, targets, target_of, slots = row_groups
    _add_blocks(y.view(tokens, out_features), z, targets, target_of, order, slots, bh)
    return y


@_block_delta_linear_op.register_fake
def _(x, weight, bias, delta, index, *, index_form, row_slots, col_slots, out_features, merged, backend):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, weight, bias, delta, index = inputs
    ctx.save_for_backward(x, None if weight is None else weight_for_dx(ctx, weight), delta, *index)
    ctx.options = keyword_only_inputs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, delta, *index = ctx.saved_tensors
    need_x, need_weight, need_bias, need_delta = ctx.needs_input_grad[:4]  # x, weight, bias, delta
    options = ctx.options
    named = _named(index, options["index_form"])
    rows, cols = named["block_rows"], named["block_cols"]
    shape = (options["out_features"], x.shape[-1])
    merged = options["merged"]
    bh, bw = delta.shape[1:]
    num_tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) fails for a zero-width layer
    dy2d = dy.reshape(num_tokens, shape[0])
    x2d = x.reshape(num_tokens, shape[1])
    use_blocks = rows.numel() > 0 and (need_delta or (need_x and not merged))
    gdy = _gather(dy2d, rows, bh) if use_blocks else None  # [T, nb, bh]
    acc = naive.accumulate_dtype(x2d, dy2d, delta)
    dx = dweight = ddelta = dbias = None
    if need_delta:
        if gdy is None:
            ddelta = torch.zeros_like(delta)
        else:
            # Computed before dx, so that the gathered x is freed before dx is allocated.
            ddelta = _block_gradient(gdy, x2d, cols, bw, acc).to(delta.dtype)
    if need_x:
        dx2d = dy2d.mm(weight) if weight is not None else x2d.new_zeros(x2d.shape)
        if not merged and gdy is not None:
            live = _live_delta(delta, rows, cols, shape, (bh, bw))
            z = _bmm_acc(gdy.permute(1, 0, 2), live, acc)  # [nb, T, bw]
            col_order, col_targets, col_target_of = named["col_order"], named["col_targets"], named["col_target_of"]
            _add_blocks(dx2d, z, col_targets, col_target_of, col_order, options["col_slots"], bw)
        dx = dx2d.reshape(x.shape)
    if need_weight:
        dweight = dy2d.t().mm(x2d)
    if need_bias:
        dbias = dy2d.sum(dim=0, dtype=naive.accumulate_dtype(dy2d)).to(ctx.bias_dtype)
    return dx, dweight, dbias, ddelta, [None] * len(index)


_block_delta_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Plain tensors in eager mode skip the custom op's wrapper (ops/_eager.py).
_EagerBlockDeltaLinear = eager_autograd(_linear_impl, _setup_context, _backward, keyword_setup=True)


def _block_gradient(gdy: Tensor, x2d: Tensor, cols: Tensor, bw: int, acc: torch.dtype) -> Tensor:
    """The one batched GEMM ``d Δ_k = dy[:, rows_k]ᵀ x[:, cols_k]``: [nb, bh, T] x [nb, T, bw], from
    the gathered dy [T, nb, bh]."""
    return _bmm_acc(gdy.permute(1, 2, 0), _gather(x2d, cols, bw).permute(1, 0, 2), acc)


def block_gradient(x2d: Tensor, dy2d: Tensor, block_index: BlockIndex) -> Tensor:
    """The delta gradient of dense blocks from 2-D x [T, in] and dy [T, out], [nb, bh, bw] in the
    accumulate dtype (fp32; fp64 for fp64 inputs)."""
    bh, bw = block_index.block_size
    acc = naive.accumulate_dtype(x2d, dy2d)
    if block_index.num_blocks == 0:
        return torch.zeros(0, bh, bw, dtype=acc, device=x2d.device)
    rows, cols = block_index.rows_and_cols()
    return _block_gradient(_gather(dy2d, rows, bh), x2d, cols, bw, acc)


# --- merge writes --------------------------------------------------------------------------------


def _entry_indices(block_index: BlockIndex) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Weight rows [nb, bh] and columns [nb, bw] of every block entry, clamped into the weight
    (with the clamped local offsets when an axis is clipped)."""
    rows, cols = block_index.rows_and_cols()
    bh, bw = block_index.block_size
    row_indices, _, row_local = _spans(rows, bh, block_index.out_features)
    col_indices, _, col_local = _spans(cols, bw, block_index.in_features)
    return row_indices, col_indices, row_local, col_local


def _grid_view(weight: Tensor, block_index: BlockIndex) -> Optional[Tensor]:
    """The weight as [block rows, bh, block cols, bw] (a view), where the blocks tile it exactly:
    block k is then ``view[rows[k], :, cols[k], :]``, one gather or one write for all blocks
    (the merged mode's re-sync: 2 ops instead of 10 building per-entry indices)."""
    bh, bw = block_index.block_size
    if block_index.clipped or not weight.is_contiguous():
        return None
    grid_rows, grid_cols = block_index.grid
    return weight.view(grid_rows, bh, grid_cols, bw)


def gather_blocks(weight: Tensor, block_index: BlockIndex) -> Tensor:
    """``weight`` at every block entry, [nb, bh, bw] in the weight's dtype (any layout; a clipped
    block's dead entries repeat the edge values). O(nnz)."""
    if block_index.num_blocks == 0:  # as in write_blocks_: nothing of the block's bh + bw indices
        return weight.new_empty((0, *block_index.block_size))
    grid = _grid_view(weight, block_index)
    if grid is not None:
        rows, cols = block_index.rows_and_cols()
        return grid[rows, :, cols, :]
    row_indices, col_indices, _, _ = _entry_indices(block_index)
    return weight[row_indices.unsqueeze(2), col_indices.unsqueeze(1)]


def write_blocks_(
    weight: Tensor,
    block_index: BlockIndex,
    base: Optional[Tensor] = None,
    delta: Optional[Tensor] = None,
) -> Tensor:
    """In place ``weight[block k] = (base[k] or weight[block k]) + delta[k]`` for every block: the
    sum in fp32 (fp64 if an operand is fp64), rounded once to the weight's dtype; the dead entries
    of clipped blocks are never written. Merge, unmerge and the merged mode's re-sync; O(nnz), any
    weight layout. Returns ``weight``."""
    if (base is None and delta is None) or block_index.num_blocks == 0:
        return weight
    grid = _grid_view(weight, block_index)
    if grid is not None:
        rows, cols = block_index.rows_and_cols()
        values = base if base is not None else grid[rows, :, cols, :]
        if delta is not None:
            acc = naive.accumulate_dtype(weight, delta)
            values = torch.add(values.to(acc), delta.to(acc))
        grid[rows, :, cols, :] = values.to(weight.dtype)
        return weight
    row_indices, col_indices, row_local, col_local = _entry_indices(block_index)
    where = (row_indices.unsqueeze(2), col_indices.unsqueeze(1))
    values = base if base is not None else weight[where]
    if delta is not None:
        acc = naive.accumulate_dtype(weight, delta)
        values = values.to(acc) + delta.to(acc)
    if row_local is not None or col_local is not None:
        # A dead entry's clamped position is a live entry of the same block: give it that entry's
        # value, so that the two writes agree (index_put_ keeps one of them, unspecified which).
        nb, bh, bw = values.shape
        row_local = row_local if row_local is not None else torch.arange(bh, device=values.device).expand(nb, bh)
        col_local = col_local if col_local is not None else torch.arange(bw, device=values.device).expand(nb, bw)
        block_ids = torch.arange(nb, device=values.device).view(nb, 1, 1)
        values = values[block_ids, row_local.unsqueeze(2), col_local.unsqueeze(1)]
    weight[where] = values.to(weight.dtype)
    return weight


# --- functional entry point ----------------------------------------------------------------------


def block_delta_linear(
    x: Tensor,
    weight: Optional[Tensor],
    delta: Tensor,
    blocks: Union[Tensor, BlockIndex],
    block_size=None,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    merged: bool = False,
) -> Tensor:
    """``y = x (W0 + Δ)ᵀ + b`` where Δ holds the block ``delta[k]`` [bh, bw] at block id
    ``blocks[k]`` (``block_row * ceil(in / bw) + block_col``).

    ``x``: [..., in]; ``weight``: [out, in] (frozen W0); ``delta``: [nb, bh, bw] (fp32 master);
    ``blocks``: a :class:`BlockIndex` (what layers pass: validated once), or a 1-D integer tensor
    of block ids with ``block_size`` = (bh, bw) (validated on every call, a host sync; unsorted
    ids are sorted together with ``delta``, differentiably). ``merged=True`` declares that
    ``weight`` already holds W0 + Δ: the forward is then a plain GEMM and only the delta gradient
    involves the blocks. ``weight=None``: the base term is computed elsewhere (a quantized base's
    own matmul): the result is ``x Δᵀ + b`` alone (``blocks`` must then be a :class:`BlockIndex`,
    which gives the weight's shape; ``merged`` is refused).
    """
    check_backend_name(backend)
    if weight is None:
        if merged:
            raise ValueError("block_delta_linear: merged=True needs the weight that holds W0 + Δ, got weight=None")
        if not isinstance(blocks, BlockIndex):
            raise ValueError("block_delta_linear: with weight=None give blocks as a BlockIndex (it carries the shape)")
        shape_only = torch.empty(blocks.out_features, blocks.in_features, device="meta")
        out_features, in_features = check_x_and_weight("block_delta_linear", x, shape_only, delta, "delta")
    else:
        out_features, in_features = check_x_and_weight("block_delta_linear", x, weight, delta, "delta")
    if isinstance(blocks, BlockIndex):
        block_index = blocks
        if (block_index.out_features, block_index.in_features) != (out_features, in_features):
            raise ValueError(
                f"block_delta_linear: blocks were built for shape {(block_index.out_features, block_index.in_features)}, "
                f"weight is {(out_features, in_features)}"
            )
        if block_size is not None and tuple(block_size) != block_index.block_size:
            raise ValueError(f"block_delta_linear: block_size {block_size} differs from the index's {block_index.block_size}")
    else:
        if block_size is None:
            raise ValueError("block_delta_linear: give block_size=(bh, bw) with a tensor of block ids")
        block_index, order = BlockIndex.build(
            blocks, out_features, in_features, block_size, device=weight.device, name="block_delta_linear"
        )
        if order is not None and delta.dim() > 0 and delta.shape[0] == order.numel():
            delta = delta[order.to(delta.device)]  # (a delta of another shape fails the check below)
    expected = (block_index.num_blocks, *block_index.block_size)
    if tuple(delta.shape) != expected:
        raise ValueError(
            f"block_delta_linear: delta must have shape {expected} (one bh x bw block per block id), got "
            f"{tuple(delta.shape)}"
        )
    if not delta.is_floating_point():
        raise ValueError(f"block_delta_linear: delta must be floating point, got {delta.dtype}")
    x, weight, bias = prepare_operands(
        "block_delta_linear", x, weight, bias, (delta, block_index.blocks), ("block_delta_linear",), backend,
        out_features=out_features,
    )
    tensors, form, row_slots, col_slots = index_form_for(block_index)
    options = dict(index_form=form, row_slots=row_slots, col_slots=col_slots, out_features=out_features,
                   merged=merged, backend=backend)
    if runs_eagerly(x, weight, bias, delta, *tensors):
        return _EagerBlockDeltaLinear.apply(x, weight, bias, delta, TensorList(tensors), options)
    return _block_delta_linear_op(x, weight, bias, delta, tensors, **options)
