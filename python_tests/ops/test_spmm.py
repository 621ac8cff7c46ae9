"""spmm_add (base + x Δᵀ) and spmm_t_add (base + dy Δ) on every usable backend (Triton runs in
its interpreter on a CPU) against the fp64 dense definition."""

import pytest
import torch

import spft_kernels as spft
from conftest import default_device, kernel_dtypes, usable_backends
from helpers import ATOL, dense_weight, max_error
from spft_kernels.ops.spmm import spmm_add, spmm_t_add

DEVICE = default_device()
# (tokens, out, in, density): 1 token, nnz = 0, nnz = out*in, odd sizes, rows longer than a block.
SHAPES = [(1, 1, 1, 1.0), (37, 29, 41, 0.2), (5, 64, 48, 0.0), (3, 9, 11, 1.0), (130, 70, 33, 0.05), (6, 4, 300, 0.6)]


def problem(tokens, out_features, in_features, density, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    sparse_index, _ = spft.SparseIndex.build(index, out_features, in_features)
    delta = torch.randn(index.numel(), generator=generator)
    if dtype == torch.float64:
        delta = delta.double()
    make = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    tensors = dict(
        x=make(tokens, in_features), dy=make(tokens, out_features),
        base_out=make(tokens, out_features), base_in=make(tokens, in_features),
    )
    dense = dense_weight(torch.zeros(out_features, in_features), delta, index)
    return sparse_index.to(DEVICE), delta.to(DEVICE), dense, {k: v.to(DEVICE) for k, v in tensors.items()}


def check(result, reference_fp64, plain, dtype):
    scale = max(reference_fp64.abs().max().item(), 1.0) if reference_fp64.numel() else 1.0
    bound = 2 * max_error(plain, reference_fp64) + ATOL[dtype] * scale
    assert result.dtype == dtype and result.shape == reference_fp64.shape
    assert max_error(result.cpu(), reference_fp64) <= bound


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("spmm_add", "spmm_t_add")))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", SHAPES)
def test_spmm_add(backend, dtype, shape):
    si, delta, dense, t = problem(*shape, dtype)
    got = spmm_add(t["base_out"], t["x"], delta, si.flat, si.row_ptr, backend)
    x64, base64 = t["x"].cpu().double(), t["base_out"].cpu().double()
    plain = (t["base_out"].cpu() + t["x"].cpu() @ dense.to(dtype).t()) if dtype != torch.float16 else (
        t["base_out"].cpu().float() + t["x"].cpu().float() @ dense.float().t()).to(dtype)
    check(got, base64 + x64 @ dense.t(), plain, dtype)


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("spmm_add", "spmm_t_add")))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", SHAPES)
def test_spmm_t_add(backend, dtype, shape):
    si, delta, dense, t = problem(*shape, dtype)
    got = spmm_t_add(t["base_in"], t["dy"], delta, si.flat, si.col_ptr, si.csc_perm, backend)
    dy64, base64 = t["dy"].cpu().double(), t["base_in"].cpu().double()
    plain = (t["base_in"].cpu().float() + t["dy"].cpu().float() @ dense.float()).to(dtype)
    check(got, base64 + dy64 @ dense, plain, dtype)


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("spmm_add", "spmm_t_add")))
def test_strided_source_rows(backend):
    si, delta, dense, t = problem(9, 20, 30, 0.3, torch.float32)
    wide = torch.randn(9, 50, device=DEVICE)
    x = wide[:, 5:35]  # row stride 50
    got = spmm_add(t["base_out"], x, delta, si.flat, si.row_ptr, backend)
    expected = t["base_out"].cpu().double() + x.cpu().double() @ dense.t()
    assert max_error(got.cpu(), expected) < 1e-4


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("spmm_add", "spmm_t_add")))
def test_spmm_is_bitwise_reproducible(backend):
    si, delta, _, t = problem(70, 40, 50, 0.3, torch.float32, seed=4)
    runs = [spmm_t_add(t["base_in"], t["dy"], delta, si.flat, si.col_ptr, si.csc_perm, backend) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("spmm_add", "spmm_t_add")))
@pytest.mark.parametrize("transposed_op", [False, True])
def test_base_of_any_strides(backend, transposed_op):
    """``base`` transposed ([features, T] storage) or sliced: both of its strides are honoured
    (the Triton kernel once read it as contiguous: errors of about 4 under the interpreter)."""
    si, delta, dense, t = problem(37, 29, 41, 0.2, torch.float32, seed=5)
    features = dense.shape[1] if transposed_op else dense.shape[0]
    base = torch.randn(features, 37, device=DEVICE).t()  # strides (1, 37)
    sliced = torch.randn(37, 2 * features, device=DEVICE)[:, ::2]  # strides (2 features, 2)
    for b in (base, sliced):
        if transposed_op:
            got = spmm_t_add(b, t["dy"], delta, si.flat, si.col_ptr, si.csc_perm, backend)
            expected = b.cpu().double() + t["dy"].cpu().double() @ dense
        else:
            got = spmm_add(b, t["x"], delta, si.flat, si.row_ptr, backend)
            expected = b.cpu().double() + t["x"].cpu().double() @ dense.t()
        assert got.is_contiguous() and max_error(got.cpu(), expected) < 1e-4, max_error(got.cpu(), expected)
