"""SDDMM (the delta gradient) on every usable backend against the fp64 dense ``dyᵀx``."""

import pytest
import torch

import spft_kernels as spft
from conftest import default_device, kernel_dtypes, usable_backends
from helpers import ATOL, max_error
from spft_kernels.sddmm import sddmm

DEVICE = default_device()
# (tokens, out, in, density): 1 token, nnz = 0, nnz = out*in, odd sizes, several token splits.
SHAPES = [(1, 1, 1, 1.0), (37, 29, 41, 0.2), (5, 64, 48, 0.0), (3, 9, 11, 1.0), (1100, 13, 7, 0.3)]


def problem(tokens, out_features, in_features, density, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    dy = torch.randn(tokens, out_features, generator=generator).to(dtype)
    return index, x, dy


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", SHAPES)
def test_sddmm_matches_dense_gradient(backend, dtype, shape):
    index, x, dy = problem(*shape, dtype)
    got = sddmm(x.to(DEVICE), dy.to(DEVICE), index.to(DEVICE), backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    reference = (dy.double().t() @ x.double()).view(-1)[index.long()]
    plain = (dy.t() @ x).view(-1)[index.long()] if dtype != torch.float16 else (
        (dy.float().t() @ x.float()).to(dtype).view(-1)[index.long()])
    scale = max(reference.abs().max().item(), 1.0) if reference.numel() else 1.0
    assert max_error(got.cpu(), reference) <= 2 * max_error(plain, reference) + ATOL[dtype] * scale


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
def test_sddmm_is_bitwise_reproducible(backend):
    index, x, dy = problem(1100, 30, 20, 0.2, torch.float32, seed=2)
    x, dy, index = x.to(DEVICE), dy.to(DEVICE), index.to(DEVICE)
    runs = [sddmm(x, dy, index, backend) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
def test_sddmm_reads_strided_inputs(backend):
    index, x, dy = problem(40, 12, 10, 0.5, torch.float32, seed=3)
    wide_x = torch.randn(40, 25)
    wide_x[:, 3:13] = x
    got = sddmm(wide_x[:, 3:13].to(DEVICE), dy.to(DEVICE), index.to(DEVICE), backend)
    reference = (dy.double().t() @ x.double()).view(-1)[index.long()]
    assert max_error(got.cpu(), reference) < 1e-4
