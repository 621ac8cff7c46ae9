import pytest

from conftest import backends, synchronized
from spft_kernels.ops.sddmm import sddmm


@pytest.mark.parametrize("backend", backends())
def test_sddmm(benchmark, problem, backend):
    p = problem
    si = p["sparse_index"]
    benchmark(synchronized(lambda: sddmm(p["x"], p["dy"], si.flat, si.tile_ptr, backend)))


def test_dense_weight_gradient_baseline(benchmark, problem):
    p = problem
    benchmark(synchronized(lambda: p["dy"].t() @ p["x"]))
