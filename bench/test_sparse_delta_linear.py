import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft
from conftest import backends, synchronized


def test_dense_frozen_forward_baseline(benchmark, problem):
    p = problem
    benchmark(synchronized(lambda: F.linear(p["x"], p["weight"])))


@pytest.mark.parametrize("merged", [False, True], ids=["split", "merged"])
@pytest.mark.parametrize("backend", backends())
def test_sparse_delta_linear_forward_backward(benchmark, problem, backend, merged):
    p = problem
    x = p["x"].clone().requires_grad_(True)
    delta = p["delta"].clone().requires_grad_(True)

    def step():
        x.grad = delta.grad = None
        y = spft.sparse_delta_linear(x, p["weight"], delta, p["sparse_index"], backend=backend, merged=merged)
        y.backward(p["dy"])

    try:
        step()
    except NotImplementedError as error:
        pytest.skip(str(error))
    benchmark(synchronized(step))
