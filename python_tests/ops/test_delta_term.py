"""ops/delta_term.py: the delta term over a base that computes its own product (rows, blocks: added
to y0; entries: merged into the dequantized weight) gives the dense-base ops' output, dx and delta
gradient (odd sizes, 1 token, 3-D input, empty positions)."""

import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft
from spft_kernels.ops.block_index import BlockIndex
from spft_kernels.ops.delta_term import blocks_term, entries_on_dequantized, rows_term
from spft_kernels.ops.index import SparseIndex, canonical_rows
from spft_kernels.ops.block_delta_linear import block_delta_linear
from spft_kernels.ops.row_delta_linear import row_delta_linear
from spft_kernels.ops.sparse_delta_linear import sparse_delta_linear

OUT, IN = 37, 29


def _positions(kind, count):
    g = torch.Generator().manual_seed(3)
    if kind == "entries":
        flat = torch.randperm(OUT * IN, generator=g)[:count]
        return SparseIndex.build(flat, OUT, IN)[0], (count,)
    if kind == "rows":
        rows = torch.randperm(OUT, generator=g)[: min(count, OUT)]
        return canonical_rows(rows, OUT)[0], (min(count, OUT), IN)
    ids = torch.randperm(5 * 4, generator=g)[: min(count, 20)]
    return BlockIndex.build(ids, OUT, IN, (8, 8))[0], (min(count, 20), 8, 8)


def _dense_op(kind, x, w, delta, positions, b):
    if kind == "entries":
        return sparse_delta_linear(x, w, delta, positions, b)
    if kind == "rows":
        return row_delta_linear(x, w, delta, positions, b, validate=False)
    return block_delta_linear(x, w, delta, positions, None, b)


def _term(kind, w, b, x, delta, positions):
    if kind == "entries":
        return entries_on_dequantized(x, delta, positions, lambda: w.clone(), b)
    return {"rows": rows_term, "blocks": blocks_term}[kind](F.linear(x, w, b), x, delta, positions)


@pytest.mark.parametrize("kind", ["entries", "rows", "blocks"])
@pytest.mark.parametrize("x_shape", [(1, IN), (2, 3, IN)])
@pytest.mark.parametrize("count", [0, 5, 120])
def test_delta_term_on_a_computed_base_equals_the_dense_op(kind, x_shape, count):
    torch.manual_seed(0)
    positions, delta_shape = _positions(kind, count)
    w, b = torch.randn(OUT, IN), torch.randn(OUT)
    delta = torch.randn(delta_shape, requires_grad=True)
    x = torch.randn(x_shape, requires_grad=True)
    dy = torch.randn(*x_shape[:-1], OUT)
    y = _term(kind, w, b, x, delta, positions)
    dx, ddelta = torch.autograd.grad(y, [x, delta], dy)
    x_ref, delta_ref = x.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
    y_ref = _dense_op(kind, x_ref, w, delta_ref, positions, b)
    dx_ref, ddelta_ref = torch.autograd.grad(y_ref, [x_ref, delta_ref], dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(ddelta, ddelta_ref)
