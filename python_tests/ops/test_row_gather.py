"""Row gather dy[..., rows] and row scatter-add y[..., rows] += z on every usable backend (Triton
in its interpreter on a CPU; the cuda kernels in test_gpu_kernels / test_row_delta_linear)."""

import pytest
import torch

import spft_kernels as spft
from conftest import default_device, kernel_dtypes, usable_backends

DEVICE = default_device()
# (leading dims, features, R): 1 token, R = 0, R = features, 3-D, more rows than a block
SHAPES = [((1,), 1, 1), ((3, 5), 77, 13), ((40,), 130, 130), ((4,), 9, 0), ((2, 2, 3), 300, 70)]


def pick_rows(features, count, generator):
    return torch.randperm(features, generator=generator)[:count].sort().values


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("lead, features, count", SHAPES)
def test_row_gather(backend, dtype, lead, features, count):
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(*lead, features, generator=generator).to(DEVICE, dtype)
    rows = pick_rows(features, count, generator).to(DEVICE)
    assert torch.equal(spft.row_gather(src, rows, backend=backend), src[..., rows])


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("lead, features, count", SHAPES)
def test_row_scatter_add_matches_reference_bitwise(backend, dtype, lead, features, count):
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(*lead, features, generator=generator).to(dtype)
    z = torch.randn(*lead, count, generator=generator).to(torch.float32 if dtype != torch.float64 else dtype)
    rows = pick_rows(features, count, generator)
    expected = spft.row_scatter_add_(y.clone(), z, rows, backend="reference")
    got = spft.row_scatter_add_(y.to(DEVICE), z.to(DEVICE), rows.to(DEVICE), backend=backend)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
def test_strided_and_non_contiguous_operands(backend):
    wide = torch.randn(50, 96, device=DEVICE)
    src = wide[:, 10:70]  # row stride 96
    rows = torch.tensor([0, 59, 31], device=DEVICE)
    assert torch.equal(spft.row_gather(src, rows, backend=backend), src[:, [0, 59, 31]])
    transposed = torch.randn(60, 50, device=DEVICE).t()
    assert torch.equal(spft.row_gather(transposed, rows, backend=backend), transposed[:, [0, 59, 31]])
    y = torch.randn(60, 50, device=DEVICE).t()  # non-contiguous y is written back in place
    z = torch.randn(50, 3, device=DEVICE)
    expected = spft.row_scatter_add_(y.clone(), z, rows, backend="reference")
    spft.row_scatter_add_(y, z, rows, backend=backend)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", usable_backends(DEVICE))
@pytest.mark.parametrize("merged", [False, True])
def test_row_delta_linear_step_on_each_backend(backend, merged):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 33, generator=generator)
    delta = (torch.randn(7, 33, generator=generator) * 0.1).requires_grad_(True)
    rows = pick_rows(40, 7, generator)
    x = torch.randn(3, 5, 33, generator=generator).requires_grad_(True)
    dy = torch.randn(3, 5, 40, generator=generator)
    if merged:  # the weight then already holds W0 + Wf at the rows
        weight = weight.index_add(0, rows, delta.detach())
    grads = {}
    for name in ("reference", backend):
        xx, dd = x.detach().to(DEVICE).requires_grad_(True), delta.detach().to(DEVICE).requires_grad_(True)
        y = spft.row_delta_linear(xx, weight.to(DEVICE), dd, rows.to(DEVICE), backend=name, merged=merged)
        y.backward(dy.to(DEVICE))
        grads[name] = (y.detach().cpu(), xx.grad.cpu(), dd.grad.cpu())
    for ours, reference in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
