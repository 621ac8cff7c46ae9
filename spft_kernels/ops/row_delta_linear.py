"""SPruFT's row delta: ``y = x W0ᵀ + b``, then ``y[..., rows] += x Wfᵀ`` with a trainable
``Wf = delta_rows`` [R, in]: the op, its autograd and the functional entry point.

Backward (``docs/architecture.md``, "The math"): ``g = dy[..., rows]`` (row gather), ``dWf = gᵀ x`` accumulated
in fp32 (fp64 for fp64 inputs), ``dx = dy W0 + g Wf`` (``dy W`` alone in merged mode, where the
weight already holds ``W0 + Wf`` at the rows), ``db = Σ dy``. Only ``x`` is saved (W, delta and
the rows are the layer's own tensors); ``x Wfᵀ`` is recomputed nowhere and cached nowhere, which
is SPruFT's memory advantage over LoRA (which keeps ``x A`` and its dropout mask alive).
``dW = dyᵀ x`` is computed only if the weight itself requires grad.
"""

from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn.functional as F

from . import naive
from ._linear_args import check_x_and_weight, prepare_operands, weight_for_dx
from ._eager import eager_autograd, runs_eagerly
from ._guards import as_int
from .backends import check_backend_name, implementation, resolve_backend
from .index import canonical_rows
from .row_gather import row_gather
from .row_scatter_add import _row_scatter_add_op

Tensor = torch.Tensor

@torch.library.custom_op("spft::row_delta_linear", mutates_args=())
def _row_delta_linear_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    delta: Tensor,
    rows: Tensor,
    *,
    out_features: int,
    merged: bool,
    backend: str,
) -> Tensor:
    return _linear_impl(x, weight, bias, delta, rows, out_features=out_features, merged=merged, backend=backend)


def _linear_impl(x, weight, bias, delta, rows, *, out_features, merged, backend):
    if weight is not None:
        y = F.linear(x, weight, bias)
    else:  # the base term is computed elsewhere: x Wfᵀ scattered into zeros (+ b)
        y = x.new_zeros((*x.shape[:-1], out_features)) if bias is None else bias.expand(*x.shape[:-1], out_features).clone()
    if merged or rows.numel() == 0:
        return y
    in_features = x.shape[-1]
    if not y.is_contiguous():  # the scatter writes through a 2-D view of y
        y = y.contiguous()
    num_tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) fails for a zero-width layer
    y2d = y.view(num_tokens, out_features)
    x2d = x.reshape(num_tokens, in_features)
    # x Wfᵀ in one GEMM accumulated in fp32/fp64 (naive.mm_acc: tensor cores for half inputs on CUDA)
    z = naive.mm_acc(x2d, delta.t(), naive.accumulate_dtype(x, delta))
    if runs_eagerly(y2d, z, rows):  # the body without the custom op's wrapper (ops/_eager.py)
        implementation("row_scatter_add", resolve_backend("row_scatter_add", backend, y2d.device))(y2d, z, rows)
    else:
        _row_scatter_add_op(y2d, z, rows, backend)
    return y


@_row_delta_linear_op.register_fake
def _(x, weight, bias, delta, rows, *, out_features, merged, backend):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, weight, bias, delta, rows = inputs
    ctx.save_for_backward(x, None if weight is None else weight_for_dx(ctx, weight), delta, rows)
    ctx.options = keyword_only_inputs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, delta, rows = ctx.saved_tensors
    need_x, need_weight, need_bias, need_delta = ctx.needs_input_grad[:4]  # x, weight, bias, delta
    merged, backend = ctx.options["merged"], ctx.options["backend"]
    out_features, in_features = ctx.options["out_features"], x.shape[-1]
    num_tokens = math.prod(x.shape[:-1])
    dy2d = dy.reshape(num_tokens, out_features)
    x2d = x.reshape(num_tokens, in_features)
    dx = dweight = ddelta = dbias = None
    use_rows = rows.numel() > 0 and (need_delta or (need_x and not merged))
    g = row_gather(dy2d, rows, backend, validate=False) if use_rows else None
    if need_x:
        dx2d = dy2d.mm(weight) if weight is not None else x2d.new_zeros(x2d.shape)
        if not merged and g is not None:
            dx2d = torch.addmm(dx2d, g, delta.to(dx2d.dtype))
        dx = dx2d.reshape(x.shape)
    if need_weight:
        dweight = dy2d.t().mm(x2d)
    if need_delta:
        acc = naive.accumulate_dtype(x2d, dy2d, delta)
        if g is None:
            ddelta = torch.zeros_like(delta)
        else:
            ddelta = naive.mm_tn_acc(g, x2d, acc).to(delta.dtype)
    if need_bias:
        dbias = dy2d.sum(dim=0, dtype=naive.accumulate_dtype(dy2d)).to(ctx.bias_dtype)
    return dx, dweight, dbias, ddelta, None


_row_delta_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Plain tensors in eager mode skip the custom op's wrapper (ops/_eager.py).
_EagerRowDeltaLinear = eager_autograd(_linear_impl, _setup_context, _backward, keyword_setup=True)


# --- functional entry point ------------------------------------------------------------------

_SPLIT_OPS = ("row_scatter_add", "row_gather")
_MERGED_OPS = ("row_gather",)


def row_delta_linear(
    x: Tensor,
    weight: Optional[Tensor],
    delta_rows: Tensor,
    rows: Tensor,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    merged: bool = False,
    validate: bool = True,
    out_features: Optional[int] = None,
) -> Tensor:
    """SPruFT: ``y = x W0ᵀ + b``, then ``y[..., rows] += x delta_rowsᵀ``.

    ``x``: [..., in]; ``weight``: [out, in] (frozen W0); ``delta_rows``: [R, in] (``Wf``, fp32
    master); ``rows``: 1-D integer [R], the output rows that ``delta_rows`` adds to. With
    ``validate=True`` the rows are checked (in range, unique: one host sync) and unsorted rows are
    sorted together with ``delta_rows`` (differentiably); layers hold canonical rows (sorted
    unique int64 on the weight's device, see :func:`spft_kernels.ops.index.canonical_rows`) and pass
    ``validate=False``. ``merged=True`` declares that ``weight`` already holds ``W0 + Wf`` at the
    rows: the forward is then a plain GEMM and only ``dWf`` involves the rows. ``weight=None``: the
    base term is computed elsewhere (a quantized base's own matmul): the result is ``x Wfᵀ``
    scattered into the rows of zeros (+ b), which needs ``out_features``; ``merged`` is refused.
    """
    check_backend_name(backend)
    if weight is None:
        if merged:
            raise ValueError("row_delta_linear: merged=True needs the weight that holds W0 + Wf, got weight=None")
        if as_int(out_features) is None or out_features < 0:
            raise ValueError(f"row_delta_linear: with weight=None give out_features (an int >= 0), got {out_features!r}")
        shape_only = torch.empty(int(out_features), x.shape[-1] if isinstance(x, Tensor) and x.dim() else 0, device="meta")
        out_features, in_features = check_x_and_weight("row_delta_linear", x, shape_only, delta_rows, "delta_rows")
    else:
        out_features, in_features = check_x_and_weight("row_delta_linear", x, weight, delta_rows, "delta_rows")
    if validate:
        rows, order = canonical_rows(
            rows, out_features, device=(x if weight is None else weight).device, name="row_delta_linear"
        )
        if order is not None:
            if delta_rows.dim() == 0 or delta_rows.shape[0] != order.numel():
                raise ValueError(
                    f"row_delta_linear: delta_rows must have shape ({order.numel()}, {in_features}), got "
                    f"{tuple(delta_rows.shape)}"
                )
            delta_rows = delta_rows[order.to(delta_rows.device)]
    elif not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("row_delta_linear: rows must be a 1-D int32 or int64 tensor")
    if delta_rows.shape != (rows.numel(), in_features):
        raise ValueError(
            f"row_delta_linear: delta_rows must have shape ({rows.numel()}, {in_features}) (one row of "
            f"in_features per selected row), got {tuple(delta_rows.shape)}"
        )
    if not delta_rows.is_floating_point():
        raise ValueError(f"row_delta_linear: delta_rows must be floating point, got {delta_rows.dtype}")
    x, weight, bias = prepare_operands(
        "row_delta_linear", x, weight, bias, (delta_rows, rows), _MERGED_OPS if merged else _SPLIT_OPS, backend,
        out_features=out_features,
    )
    options = dict(out_features=out_features, merged=merged, backend=backend)
    if runs_eagerly(x, weight, bias, delta_rows, rows):
        return _EagerRowDeltaLinear.apply(x, weight, bias, delta_rows, rows, options)
    return _row_delta_linear_op(x, weight, bias, delta_rows, rows, **options)
