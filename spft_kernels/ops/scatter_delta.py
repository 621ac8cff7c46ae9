"""``W.flat[idx] = (W0[idx] or W.flat[idx]) + alpha * delta``: merge, unmerge, to_linear and the
merged mode's re-sync, all O(nnz). Arithmetic in fp32 (fp64 if an operand is fp64), rounded
once to the weight's dtype, so every backend writes bitwise the same weight."""

from __future__ import annotations

from typing import Optional

import torch

from . import naive
from ._eager import runs_eagerly
from .backends import register, resolve_backend, implementation

Tensor = torch.Tensor


@torch.library.custom_op("spft::scatter_delta_", mutates_args=("weight",))
def _scatter_delta_op(
    weight: Tensor, index: Tensor, base: Optional[Tensor], delta: Optional[Tensor], alpha: float, backend: str
) -> None:
    chosen = resolve_backend("scatter_delta", backend, weight.device)
    implementation("scatter_delta", chosen)(weight, index, base, delta, alpha)


@_scatter_delta_op.register_fake
def _(weight, index, base, delta, alpha, backend):
    return None


@register("scatter_delta", "reference")
def _scatter_delta_reference(weight, index, base, delta, alpha):
    flat = weight.view(-1)
    values = _as(base if base is not None else flat.index_select(0, index), naive.accumulate_dtype(weight, delta))
    if delta is not None:
        values = torch.add(values, _as(delta, values.dtype), alpha=alpha)  # one op (a merged step's re-sync)
    # index_put_ takes the int32 index as it is (index_copy_ wants int64: one more op a step);
    # positions are unique, so the write is deterministic.
    flat.index_put_((index,), _as(values, weight.dtype))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A cast to the same dtype returns t itself; the call alone costs ~1 µs (3 a re-sync).
    return t if t.dtype == dtype else t.to(dtype)


@register("scatter_delta", "cuda")
def _scatter_delta_cuda(weight, index, base, delta, alpha):
    torch.ops.spft.cuda_scatter_delta_(weight, index, base, delta, alpha)


def scatter_delta_(
    weight: Tensor,
    index: Tensor,
    *,
    base: Optional[Tensor] = None,
    delta: Optional[Tensor] = None,
    alpha: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """In place: ``weight.flat[index[k]] = b_k + alpha * delta[k]`` with ``b_k = base[k]`` if given,
    else the current ``weight.flat[index[k]]``. ``index`` must be a validated canonical index
    (unique, in range) on the weight's device; ``base`` has the weight's dtype. Returns ``weight``."""
    if not weight.is_contiguous():
        raise ValueError("scatter_delta_: weight must be contiguous (its flat positions are indexed)")
    nnz = index.numel()
    for name, tensor in (("base", base), ("delta", delta)):
        if tensor is None:
            continue
        if tensor.shape != (nnz,):
            raise ValueError(f"scatter_delta_: {name} must have shape ({nnz},), got {tuple(tensor.shape)}")
        if tensor.device != weight.device:
            raise ValueError(f"scatter_delta_: {name} is on {tensor.device}, weight on {weight.device}")
    if base is not None and base.dtype != weight.dtype:
        raise ValueError(f"scatter_delta_: base must have the weight's dtype {weight.dtype}, got {base.dtype}")
    if index.device != weight.device:
        raise ValueError(f"scatter_delta_: index is on {index.device}, weight on {weight.device}")
    if nnz and (base is not None or delta is not None):
        if runs_eagerly(weight, index, base, delta):  # the body without the custom op's wrapper (_eager.py)
            implementation("scatter_delta", resolve_backend("scatter_delta", backend, weight.device))(
                weight, index, base, delta, float(alpha)
            )
        else:
            _scatter_delta_op(weight, index, base, delta, float(alpha), backend)
    return weight
