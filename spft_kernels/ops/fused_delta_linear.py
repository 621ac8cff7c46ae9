"""The fused mode's forward ``y = x (W0 + Δ)ᵀ + b`` as one op, ``spft::fused_delta_linear``.

The cuda backend is one GEMM whose W0 tile gets the delta entries that fall in it added in
shared memory before the matrix instructions (csrc/fused_delta_linear.cu): W0 is never written,
and the weight the GEMM sees is bitwise the merged mode's ``W0 + Δ`` (fp32 sum, rounded once).
The reference computes the same product as the split mode, ``x W0ᵀ + b + x Δᵀ``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._linear_args import unit_feature_stride
from .backends import implementation, register, resolve_backend
from .spmm import spmm_add

Tensor = torch.Tensor


@torch.library.custom_op("spft::fused_delta_linear", mutates_args=())
def fused_delta_linear(
    x: Tensor, weight: Tensor, delta: Tensor, index: Tensor, row_ptr: Tensor, bias: Optional[Tensor], backend: str
) -> Tensor:
    """``x (W0 + Δ)ᵀ + b`` for 2-D ``x`` [T, in], ``weight`` [out, in]; ``index``/``row_ptr`` from a
    :class:`SparseIndex`."""
    chosen = resolve_backend("fused_delta_linear", backend, x.device)
    return implementation("fused_delta_linear", chosen)(x, weight, delta, index, row_ptr, bias)


@fused_delta_linear.register_fake
def _(x, weight, delta, index, row_ptr, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@register("fused_delta_linear", "reference")
def _fused_reference(x, weight, delta, index, row_ptr, bias):
    y = F.linear(x, weight, bias)
    return spmm_add(y, x, delta, index, row_ptr, "reference") if index.numel() else y


# Not picked by "auto" until measured on a GPU (see backends.register).
@register("fused_delta_linear", "cuda", auto=False)
def _fused_cuda(x, weight, delta, index, row_ptr, bias):
    if bias is not None:
        bias = bias.contiguous()  # O(out)
    # A non-contiguous weight is refused by the binding rather than copied (an out x in temporary).
    return torch.ops.spft.cuda_fused_delta_linear(unit_feature_stride(x), weight, delta, index, row_ptr, bias)
