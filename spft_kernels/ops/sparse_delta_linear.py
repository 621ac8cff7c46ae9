"""``y = x (W0 + Δ)ᵀ + b`` with a trainable sparse ``Δ``: the ops, their autograd and the
functional entry point.

The op ``spft::sparse_delta_linear`` (with a fake implementation, so torch.compile traces
through it) is built from ``spmm_add`` / ``spmm_t_add`` (spmm.py), ``sddmm`` (sddmm.py) and, in
the fused mode, ``fused_delta_linear`` (fused_delta_linear.py). Its ``mode`` is the layer's:
``split`` (GEMM + SpMM), ``merged`` (the weight already holds W0 + Δ: a plain GEMM) or ``fused``
(one GEMM adding Δ into the weight tiles).

Backward: ``dx = dy W + dy Δ`` (``dy W`` alone in merged mode, where W already holds W0 + Δ),
``d delta = SDDMM(x, dy)``, ``db = Σ dy``; only ``x`` is saved (W, delta and the index are the
layer's own tensors). ``dW = dyᵀ x`` is computed only if the weight itself requires grad.
A layer's index arrives compact (``index`` = its low bytes, ``index_block_ends`` given,
compact_index.py) and is expanded inside the op, in the forward only where the forward reads it
(not in merged mode) and again in backward: what stays saved between them is the 2-byte form.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import naive
from ._linear_args import check_x_and_weight, prepare_operands, weight_for_dx
from .backends import check_backend_name, resolve_backend
from .fused_delta_linear import fused_delta_linear
from .compact_index import expand_index
from .index import DERIVED, SparseIndex, index_dtype_for
from .sddmm import sddmm
from .spmm import spmm_add, spmm_t_add

Tensor = torch.Tensor


# --- the layer op ------------------------------------------------------------------------------


def _or_empty(metadata: Optional[Tensor], index: Tensor) -> Tensor:
    # Derived index metadata is passed only to backends that read it (see _metadata_for); the
    # reference implementations take an empty placeholder.
    return index[:0] if metadata is None else metadata


def _canonical(index: Tensor, block_ends: Optional[Tensor], weight_shape) -> Tensor:
    """The flat index an op reads: ``index`` itself, or expanded from its compact form."""
    return index if block_ends is None else expand_index(index, block_ends, index_dtype_for(*weight_shape))


@torch.library.custom_op("spft::sparse_delta_linear", mutates_args=())
def _sparse_delta_linear_op(
    x: Tensor,
    weight: Tensor,
    delta: Tensor,
    index: Tensor,
    index_block_ends: Optional[Tensor],
    row_ptr: Optional[Tensor],
    col_ptr: Optional[Tensor],
    csc_perm: Optional[Tensor],
    tile_ptr: Optional[Tensor],
    bias: Optional[Tensor],
    mode: str,
    backend: str,
) -> Tensor:
    out_features, in_features = weight.shape
    if mode != "merged" and index.numel() > 0:
        index = _canonical(index, index_block_ends, weight.shape)
    if mode == "fused" and index.numel() > 0:
        y2d = fused_delta_linear(x.reshape(-1, in_features), weight, delta, index, _or_empty(row_ptr, index), bias, backend)  # nnz > 0: in > 0
        return y2d.reshape(*x.shape[:-1], out_features)
    y = F.linear(x, weight, bias)
    if mode == "merged" or index.numel() == 0:
        return y
    y2d = spmm_add(y.reshape(-1, out_features), x.reshape(-1, in_features), delta, index, _or_empty(row_ptr, index), backend)
    return y2d.reshape(y.shape)


@_sparse_delta_linear_op.register_fake
def _(x, weight, delta, index, index_block_ends, row_ptr, col_ptr, csc_perm, tile_ptr, bias, mode, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, delta, index, index_block_ends, row_ptr, col_ptr, csc_perm, tile_ptr, bias, mode, backend = inputs
    ctx.save_for_backward(x, weight_for_dx(ctx, weight), delta, index, index_block_ends, col_ptr, csc_perm, tile_ptr)
    ctx.weight_shape = weight.shape
    ctx.merged = mode == "merged"
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, delta, index, index_block_ends, col_ptr, csc_perm, tile_ptr = ctx.saved_tensors
    out_features, in_features = ctx.weight_shape
    reads_index = ctx.needs_input_grad[2] or (ctx.needs_input_grad[0] and not ctx.merged)
    if reads_index and index.numel() > 0:
        index = _canonical(index, index_block_ends, ctx.weight_shape)
    # Explicit token counts: reshape(-1, 0) cannot infer them for a zero-width layer.
    num_tokens = math.prod(x.shape[:-1])
    dy2d = dy.reshape(num_tokens, out_features)
    x2d = x.reshape(num_tokens, in_features)
    dx = dweight = ddelta = dbias = None
    if ctx.needs_input_grad[0]:
        dx2d = dy2d.mm(weight)
        if not ctx.merged and index.numel() > 0:
            dx2d = spmm_t_add(
                dx2d, dy2d, delta, index, _or_empty(col_ptr, index), _or_empty(csc_perm, index), ctx.backend
            )
        dx = dx2d.reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dweight = dy2d.t().mm(x2d)
    if ctx.needs_input_grad[2]:
        ddelta = sddmm(x2d, dy2d, index, tile_ptr, ctx.backend).to(delta.dtype)
    if ctx.needs_input_grad[9]:
        dbias = dy2d.sum(dim=0, dtype=naive.accumulate_dtype(dy2d)).to(ctx.bias_dtype)
    return dx, dweight, ddelta, None, None, None, None, None, None, dbias, None, None


_sparse_delta_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --- functional entry point ------------------------------------------------------------------

_KERNEL_OPS = {
    "split": ("spmm_add", "spmm_t_add", "sddmm"),
    "merged": ("sddmm",),
    "fused": ("fused_delta_linear", "spmm_t_add", "sddmm"),
}

# The derived index forms each op's kernels read (``SparseIndex``); the reference
# implementations read none. The forward's op is the first of the mode's kernel ops.
_METADATA = {
    "spmm_add": ("row_ptr",),
    "fused_delta_linear": ("row_ptr",),
    "spmm_t_add": ("col_ptr", "csc_perm"),
    "sddmm": ("tile_ptr",),
}


def _metadata_for(sparse_index: SparseIndex, mode: str, backend: str, device: torch.device) -> dict:
    """``{name: tensor or None}`` for the four derived forms: built (lazily, cached by the index's
    owner) only where the backend that will run an op of this mode reads it."""
    needed = set()
    for op in _KERNEL_OPS[mode]:
        if resolve_backend(op, backend, device) != "reference":
            needed.update(_METADATA[op])
    return {name: getattr(sparse_index, name) if name in needed else None for name in DERIVED}


def sparse_delta_linear(
    x: Tensor,
    weight: Tensor,
    delta: Tensor,
    index: Union[Tensor, SparseIndex],
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    merged: bool = False,
    fused: bool = False,
) -> Tensor:
    """``y = x (W0 + Δ)ᵀ + b`` where ``Δ`` holds ``delta[k]`` at flat position ``index[k]``.

    ``x``: [..., in]; ``weight``: [out, in] (frozen W0); ``delta``: [nnz] (fp32 master);
    ``index``: a :class:`SparseIndex`, or a 1-D integer tensor of flat positions, which is then
    validated and its metadata built on every call (a host sync: layers cache a SparseIndex).
    An unsorted index tensor is sorted and ``delta`` permuted with it (differentiably).
    ``merged=True`` declares that ``weight`` already holds ``W0 + Δ``: the forward is then a plain
    GEMM and only the delta gradient is sparse (the layer's merged mode). ``fused=True`` computes
    the forward as one GEMM that adds Δ into the weight tiles (the layer's fused mode; the cuda
    backend has the kernel, the reference computes the split form).
    """
    check_backend_name(backend)
    if merged and fused:
        raise ValueError("sparse_delta_linear: merged and fused are exclusive (a merged weight already holds Δ)")
    mode = "merged" if merged else "fused" if fused else "split"
    out_features, in_features = check_x_and_weight("sparse_delta_linear", x, weight, delta, "delta")
    if isinstance(index, SparseIndex):
        sparse_index = index
        if sparse_index.shape != (out_features, in_features):
            raise ValueError(
                f"sparse_delta_linear: index was built for shape {sparse_index.shape}, weight is "
                f"{(out_features, in_features)}"
            )
    else:
        sparse_index, order = SparseIndex.build(
            index, out_features, in_features, device=weight.device, name="sparse_delta_linear"
        )
        if order is not None:
            if delta.shape != order.shape:
                raise ValueError(
                    f"sparse_delta_linear: delta has shape {tuple(delta.shape)}, expected ({order.numel()},)"
                )
            delta = delta[order.to(delta.device)]
    if delta.dim() != 1 or delta.numel() != sparse_index.nnz:
        raise ValueError(
            f"sparse_delta_linear: delta must be 1-D with one value per index entry ({sparse_index.nnz}), "
            f"got shape {tuple(delta.shape)}"
        )
    if not delta.is_floating_point():
        raise ValueError(f"sparse_delta_linear: delta must be floating point, got {delta.dtype}")
    index_tensor, index_block_ends = sparse_index.stored()
    x, weight, bias = prepare_operands(
        "sparse_delta_linear", x, weight, bias, (delta, index_tensor), _KERNEL_OPS[mode], backend
    )
    metadata = _metadata_for(sparse_index, mode, backend, weight.device) if sparse_index.nnz else dict.fromkeys(DERIVED)
    return _sparse_delta_linear_op(
        x,
        weight,
        delta,
        index_tensor,
        index_block_ends,
        metadata["row_ptr"],
        metadata["col_ptr"],
        metadata["csc_perm"],
        metadata["tile_ptr"],
        bias,
        mode,
        backend,
    )
