"""The reference math by row blocks of Δ (naive.sddmm, naive.spmm_add, naive.spmm_t_add): exact
in fp64 on every path at every density, bitwise reproducible, one block of temporary, and a
number of launched ops that does not grow with the number of tokens."""

import math

import pytest
import torch

import spft_kernels as spft
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.bench.op_count import count_ops
from spft_kernels.ops import naive

# Every way the reference can compute a product with Δ: the gather path, row blocks with
# host-side entry bounds (the CPU's way), and row blocks selecting entries by mask (the sync-free
# way of other devices).
PATHS = {
    "gather": dict(gather=True),
    "row-blocks": dict(gather=False, sync_free=False),
    "row-blocks-sync-free": dict(gather=False, sync_free=True),
    "auto": dict(),
}
# (tokens, out, in, density): odd sizes, 1 token, empty and full masks; 0.1% and 1% leave some
# blocks empty and let blocks narrow to the columns they use.
SHAPES = [
    (1, 67, 131, 0.001), (37, 67, 131, 0.01), (5, 67, 131, 0.3), (3, 67, 131, 1.0),
    (1, 1, 1, 1.0), (9, 29, 3, 0.3), (4, 3, 29, 1.0), (6, 20, 30, 0.0), (200, 130, 257, 0.001),
]


def problem(tokens, out_features, in_features, density, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(tokens, out_features, generator=generator, dtype=torch.float64).to(dtype)
    delta = torch.randn(index.numel(), generator=generator, dtype=torch.float64).to(dtype)
    return index, x, dy, delta


def dense_delta(delta, index, out_features, in_features):
    dense = torch.zeros(out_features * in_features, dtype=torch.float64)
    dense[index.long()] = delta.double()
    return dense.view(out_features, in_features)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp64_products_match_the_dense_definition(shape, path):
    index, x, dy, delta = problem(*shape)
    out_features, in_features = shape[1:3]
    dense = dense_delta(delta, index, out_features, in_features)
    y0, dx0 = torch.randn(shape[0], out_features, dtype=torch.float64), torch.randn(shape[0], in_features, dtype=torch.float64)
    grad = naive.sddmm(x, dy, index, **PATHS[path])
    torch.testing.assert_close(grad, (dy.t() @ x).view(-1)[index.long()], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(naive.spmm_add(y0, x, delta, index, **PATHS[path]), y0 + x @ dense.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(naive.spmm_t_add(dx0, dy, delta, index, **PATHS[path]), dx0 + dy @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["merged", "split"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
def test_fp64_layer_step_on_3d_inputs(density, mode):
    out_features, in_features = 45, 71
    index, _, _, delta = problem(1, out_features, in_features, density, seed=1)
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.float64)
    layer = spft.SparseDeltaLinear.from_linear(linear, index, mode=mode)
    with torch.no_grad():
        layer.delta.copy_(delta)
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    w0 = linear.weight.detach().clone() if mode == "split" else layer.merged_weight().detach().double() - dense_delta(
        delta, index, out_features, in_features)
    w = (w0 + dense_delta(delta, index, out_features, in_features)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, linear.bias.detach())
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad.double(), w.grad.view(-1)[index.long()], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["gather", "row-blocks", "row-blocks-sync-free"])
def test_fp32_delta_gradient_is_bitwise_reproducible(path):
    index, x, dy, delta = problem(300, 90, 70, 0.05, dtype=torch.float32, seed=2)
    runs = [naive.sddmm(x, dy, index, **PATHS[path]) for _ in range(3)]
    runs += [naive.spmm_t_add(x, dy, delta, index, **PATHS[path]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert torch.equal(runs[3], runs[4])


def test_row_blocks_hold_one_block_of_temporary():
    out_features, in_features, tokens = 256, 192, 96  # x (and dy) hold fewer values than 1/2 of W
    index, x, dy, delta = problem(tokens, out_features, in_features, 0.05, dtype=torch.float32)
    weight_numel = out_features * in_features
    assert not naive.uses_gather(tokens, index.numel(), out_features, in_features, torch.float32, "cpu")
    with TensorMemoryTracker() as tracker:
        naive.sddmm(x, dy, index)
    # one block of dyᵀx (1/8 of W), or x's columns one block needs (at most 1/8 of W)
    assert tracker.largest_numel <= weight_numel // 8, (tracker.largest_shape, tracker.largest_op)
    for fn in (naive.spmm_add, naive.spmm_t_add):
        base = torch.zeros(tokens, out_features if fn is naive.spmm_add else in_features)
        src = x if fn is naive.spmm_add else dy
        with TensorMemoryTracker() as tracker:
            fn(base, src, delta, index)
        assert tracker.largest_numel <= max(weight_numel // 16, base.numel()), (tracker.largest_shape, tracker.largest_op)


def test_gather_path_only_in_one_pass_within_the_budget():
    # 4096 x 4096 at 0.1%: the gather path fits one pass for a few tokens, never for thousands.
    nnz = 4096 * 4096 // 1000
    assert naive.uses_gather(8, nnz, 4096, 4096, torch.float32, "cpu")
    assert not naive.uses_gather(1024, nnz, 4096, 4096, torch.float32, "cpu")
    # On a GPU a dense GEMM is ~10^4 times the gather path's rate per entry: row blocks at 1%.
    assert not naive.uses_gather(8, 100 * nnz // 10, 4096, 4096, torch.bfloat16, "cuda")


def _backward_ops(layer, tokens, in_features, dtype):
    x = torch.randn(2, tokens // 2, in_features, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    return count_ops(lambda: y.backward(dy))


@pytest.mark.parametrize("layer_kind", ["merged", "split", "rows-bf16"])
def test_backward_op_count_does_not_grow_with_tokens(layer_kind, monkeypatch):
    # A small temporary budget (64 rows of x), so that any chunking over tokens would show.
    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 64 * 80)
    out_features, in_features = 96, 80
    dtype = torch.bfloat16 if layer_kind == "rows-bf16" else torch.float32
    linear = torch.nn.Linear(in_features, out_features, dtype=dtype)
    if layer_kind == "rows-bf16":
        layer = spft.RowSparseLinear.from_linear(linear, torch.arange(0, out_features, 7), mode="split")
    else:
        layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(out_features, in_features, 0.01), mode=layer_kind)
    # (From 128 tokens: at 64, 96 x 80 x 64 <= 2^19 and entries take the small step's dense gradient,
    # 2 ops fewer: ops/library_sparse.py, DENSE_GRADIENT_MAX_WORK.)
    counts = [_backward_ops(layer, tokens, in_features, dtype) for tokens in (128, 512, 4096)]
    # Fewer tokens may let blocks narrow to their columns (a few more ops per block), and ATen
    # may split a bf16 addmm into mm + add_ from some size on; more tokens add nothing else.
    assert counts[1] == counts[2] and counts[2] <= counts[0] + 1, counts
    # The row-block path: a handful of ops per block of Δ's rows, nothing per token.
    blocks = math.ceil(out_features / naive.block_rows(out_features, in_features))
    assert counts[0] <= 24 * blocks + 40, counts


def test_auto_runs_the_reference_products_on_cpu_and_cuda_tensors():
    # The cuda and triton SDDMM/SpMM kernels stay opt-in until a GPU run has measured them.
    from spft_kernels.ops.backends import auto_candidates

    for op in ("sddmm", "spmm_add", "spmm_t_add"):
        for device_type in ("cpu", "cuda"):
            assert auto_candidates(op, device_type) == ["reference"], (op, device_type)
