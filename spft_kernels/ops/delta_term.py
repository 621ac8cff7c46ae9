"""A delta layer over a base that stores W0 in another form (a quantized base: bitsandbytes 4-bit
or 8-bit) and makes a dense W0 only on request: ``y = x (W0 + Δ)ᵀ + b`` computed as

- forward: ``W = dequantize()`` (the dense W0 in the compute dtype that bitsandbytes itself makes
  for its GEMM: on the CPU in both passes, on CUDA in the backward), the kind's Δ added into it at
  its positions (O(positions), fp32 sum rounded once), one GEMM, ``W`` freed;
- backward: ``W`` made again for ``dx = dy (W0 + Δ)``, and the kind's delta gradient from x and dy
  (the masked ``dyᵀ x``: entries, rows or blocks), never a dense weight gradient.

One out x in temporary of one layer at a time, never kept across the step; only x is saved
(besides the layer's own delta and positions, which the kind's callables read when called, so
that a compact index stays compact between forward and backward). Adding Δ into W costs
O(positions) where a split delta term costs more than the GEMM it rides on for scattered
entries on the CPU (an SpMM pair: 222 ms each against a 175 ms GEMM at 2048 x 2048, 1,024
tokens, 6.25%), and it makes dx free for every kind.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .sddmm import sddmm

Tensor = torch.Tensor

# Whether the masked gradient may take torch.sparse's CPU path (``masked_gradient``); the memory
# estimate turns it off to follow the path a GPU takes (bench/memory_estimate.py).
CPU_SAMPLED_ADDMM = True


class DequantizedDelta(NamedTuple):
    """What a layer gives: ``dequantize()`` -> a new dense W0 (compute dtype); ``add_delta(weight,
    delta)`` -> ``weight`` with Δ added in place at the kind's positions; ``delta_gradient(x2d,
    dy2d)`` -> the delta's gradient (its shape, fp32 / fp64)."""

    dequantize: Callable[[], Tensor]
    add_delta: Callable[[Tensor, Tensor], Tensor]
    delta_gradient: Callable[[Tensor, Tensor], Tensor]


class _OnDequantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, bias, ops: DequantizedDelta):
        weight = ops.add_delta(ops.dequantize(), delta.detach())
        y = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)
        ctx.save_for_backward(x, delta)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, dy):
        x, delta = ctx.saved_tensors
        tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) fails for a zero-width layer
        dy2d, x2d = dy.reshape(tokens, dy.shape[-1]), x.reshape(tokens, x.shape[-1])
        dx = ddelta = None
        if ctx.needs_input_grad[0]:
            weight = ctx.ops.add_delta(ctx.ops.dequantize(), delta.detach())
            dx = dy2d.to(weight.dtype).mm(weight).to(x.dtype).view(x.shape)
            del weight
        if ctx.needs_input_grad[1]:
            ddelta = ctx.ops.delta_gradient(x2d, dy2d).to(delta.dtype)
        return dx, ddelta, None, None


def on_dequantized(x: Tensor, delta: Tensor, bias: Optional[Tensor], ops: DequantizedDelta) -> Tensor:
    """``x (W0 + Δ)ᵀ + b`` over a base that dequantizes on request (module docstring); the
    result and dx in x's dtype, the GEMMs in W0's compute dtype."""
    return _OnDequantized.apply(x, delta, bias, ops)


def masked_gradient(x2d: Tensor, dy2d: Tensor, flat: Tensor, shape: tuple, tile_ptr: Optional[Tensor],
                    backend: str) -> Tensor:
    """``(dyᵀ x)[flat]`` for a canonical flat index. On the CPU in fp32/fp64, torch.sparse's
    ``sampled_addmm`` (MKL): at 2048 x 2048, 1,024 tokens it took 17 ms at 1.6% and 63 ms at 6.25%
    density, where the row-block GEMMs of the reference sddmm took 216 and 236 ms (a GEMM: 175
    ms), which decides whether entries keep up with QLoRA there. Elsewhere the sddmm op."""
    if CPU_SAMPLED_ADDMM and x2d.device.type == "cpu" and x2d.dtype in (torch.float32, torch.float64) \
            and dy2d.dtype == x2d.dtype and flat.numel():
        out_features, in_features = shape
        flat = flat.long()
        rows = torch.div(flat, in_features, rounding_mode="floor")
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        with warnings.catch_warnings():  # (torch's notice that sparse CSR support is in beta)
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            mask = torch.sparse_csr_tensor(row_ptr, flat - rows * in_features, torch.zeros(flat.numel(), dtype=x2d.dtype),
                                           (out_features, in_features), check_invariants=False)  # canonical: valid
            return torch.sparse.sampled_addmm(mask, dy2d.t().contiguous(), x2d.contiguous(), beta=0.0).values()
    return sddmm(x2d, dy2d, flat, tile_ptr, backend)

