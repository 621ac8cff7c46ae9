"""ops/delta_term.py: x (W0 + Δ)ᵀ + b over a base that dequantizes on request gives the dense-base
op's output, dx and delta gradient; the masked gradient's CPU path (sampled_addmm) equals sddmm."""

import pytest
import torch

from spft_kernels.ops.delta_term import DequantizedDelta, masked_gradient, on_dequantized
from spft_kernels.ops.index import SparseIndex
from spft_kernels.ops.scatter_delta import scatter_delta_
from spft_kernels.ops.sddmm import sddmm
from spft_kernels.ops.sparse_delta_linear import sparse_delta_linear

OUT, IN = 37, 29


@pytest.mark.parametrize("x_shape", [(1, IN), (2, 3, IN)])
@pytest.mark.parametrize("count", [0, 5, 600])
def test_on_dequantized_equals_the_dense_op(x_shape, count):
    torch.manual_seed(0)
    index = SparseIndex.build(torch.randperm(OUT * IN)[:count], OUT, IN)[0]
    w, b = torch.randn(OUT, IN), torch.randn(OUT)
    delta = torch.randn(count, requires_grad=True)
    x = torch.randn(x_shape, requires_grad=True)
    dy = torch.randn(*x_shape[:-1], OUT)
    made = []

    def dequantize():
        made.append(1)
        return w.clone()

    ops = DequantizedDelta(dequantize, lambda weight, d: scatter_delta_(weight, index.flat, delta=d),
                           lambda x2d, dy2d: masked_gradient(x2d, dy2d, index.flat, index.shape, None, "auto"))
    y = on_dequantized(x, delta, b, ops)
    dx, ddelta = torch.autograd.grad(y, [x, delta], dy)
    assert len(made) == 2  # one dense W0 a pass, none kept
    x_ref, delta_ref = x.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
    y_ref = sparse_delta_linear(x_ref, w, delta_ref, index, b)
    dx_ref, ddelta_ref = torch.autograd.grad(y_ref, [x_ref, delta_ref], dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(ddelta, ddelta_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masked_gradient_equals_sddmm(dtype):
    torch.manual_seed(1)
    index = SparseIndex.build(torch.randperm(OUT * IN)[:300], OUT, IN)[0]
    x, dy = torch.randn(50, IN, dtype=dtype), torch.randn(50, OUT, dtype=dtype)
    expected = sddmm(x, dy, index.flat, None, "auto")
    got = masked_gradient(x, dy, index.flat, index.shape, None, "auto")
    torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-5 if dtype != torch.bfloat16 else 0, atol=1e-5)
