import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft
from conftest import backends, synchronized


def test_dense_frozen_forward_baseline(benchmark, problem):
    p = problem
    benchmark(synchronized(lambda: F.linear(p["x"], p["weight"])))


@pytest.mark.parametrize("backend", backends())
def test_fused_forward(benchmark, problem, backend):
    p = problem
    si = p["sparse_index"]
    step = lambda: spft.sparse_delta_linear(p["x"], p["weight"], p["delta"], si, backend=backend, fused=True)  # noqa: E731
    try:
        step()
    except NotImplementedError as error:
        pytest.skip(str(error))
    benchmark(synchronized(step))


@pytest.mark.parametrize("mode", ["split", "merged", "fused"])
@pytest.mark.parametrize("backend", backends())
def test_sparse_delta_linear_forward_backward(benchmark, problem, backend, mode):
    p = problem
    x = p["x"].clone().requires_grad_(True)
    delta = p["delta"].clone().requires_grad_(True)

    def step():
        x.grad = delta.grad = None
        y = spft.sparse_delta_linear(
            x, p["weight"], delta, p["sparse_index"], backend=backend, merged=mode == "merged", fused=mode == "fused"
        )
        y.backward(p["dy"])

    try:
        step()
    except NotImplementedError as error:
        pytest.skip(str(error))
    benchmark(synchronized(step))
