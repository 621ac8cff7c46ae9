"""SDDMM (the delta gradient) on every usable backend against the fp64 dense ``dyᵀx``."""

import pytest
import torch

import spft_kernels as spft
from conftest import default_device, kernel_dtypes, usable_backends
from helpers import ATOL, max_error
from spft_kernels.ops.sddmm import sddmm

DEVICE = default_device()
# (tokens, out, in, density): 1 token, nnz = 0, nnz = out*in, odd sizes, several token splits,
# several 64x64 tiles with partial edges, and tiles without entries.
SHAPES = [
    (1, 1, 1, 1.0), (37, 29, 41, 0.2), (5, 64, 48, 0.0), (3, 9, 11, 1.0), (1100, 13, 7, 0.3),
    (40, 150, 200, 0.1), (20, 130, 140, 0.004),
]


def problem(tokens, out_features, in_features, density, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    dy = torch.randn(tokens, out_features, generator=generator).to(dtype)
    return index, x, dy


@pytest.mark.parametrize("variant", ["gather-dot", "tensor-core"])
@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("sddmm",)))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", SHAPES)
def test_sddmm_matches_dense_gradient(backend, dtype, shape, variant):
    """Both Triton variants: the gather-dot kernel, and (given tile_ptr) the tensor-core tile
    kernel with its masked epilogue; the reference ignores tile_ptr."""
    index, x, dy = problem(*shape, dtype)
    si, _ = spft.SparseIndex.build(index.to(DEVICE), *shape[1:3], tile_metadata=variant == "tensor-core")
    got = sddmm(x.to(DEVICE), dy.to(DEVICE), si.flat, si.tile_ptr, backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    reference = (dy.double().t() @ x.double()).view(-1)[index.long()]
    plain = (dy.t() @ x).view(-1)[index.long()] if dtype != torch.float16 else (
        (dy.float().t() @ x.float()).to(dtype).view(-1)[index.long()])
    scale = max(reference.abs().max().item(), 1.0) if reference.numel() else 1.0
    assert max_error(got.cpu(), reference) <= 2 * max_error(plain, reference) + ATOL[dtype] * scale


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("sddmm",)))
def test_sddmm_is_bitwise_reproducible(backend):
    index, x, dy = problem(1100, 30, 20, 0.2, torch.float32, seed=2)
    x, dy, index = x.to(DEVICE), dy.to(DEVICE), index.to(DEVICE)
    si, _ = spft.SparseIndex.build(index, 30, 20, tile_metadata=True)
    runs = [sddmm(x, dy, index, None, backend) for _ in range(3)]
    runs += [sddmm(x, dy, index, si.tile_ptr, backend) for _ in range(2)]
    assert torch.equal(runs[3], runs[4])
    runs = runs[:3]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", usable_backends(DEVICE, ("sddmm",)))
def test_sddmm_reads_strided_inputs(backend):
    index, x, dy = problem(40, 12, 10, 0.5, torch.float32, seed=3)
    wide_x = torch.randn(40, 25)
    wide_x[:, 3:13] = x
    si, _ = spft.SparseIndex.build(index.to(DEVICE), 12, 10)  # density 0.5: tile metadata
    got = sddmm(wide_x[:, 3:13].to(DEVICE), dy.to(DEVICE), si.flat, si.tile_ptr, backend)
    reference = (dy.double().t() @ x.double()).view(-1)[index.long()]
    assert max_error(got.cpu(), reference) < 1e-4
