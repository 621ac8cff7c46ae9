import pytest
import torch

from conftest import backends, synchronized
from spft_kernels.ops.spmm import spmm_add, spmm_t_add


@pytest.mark.parametrize("backend", backends())
def test_spmm_add(benchmark, problem, backend):
    p, si = problem, problem["sparse_index"]
    base = torch.zeros_like(p["dy"])
    benchmark(synchronized(lambda: spmm_add(base, p["x"], p["delta"], si.flat, si.row_ptr, backend)))


@pytest.mark.parametrize("backend", backends())
def test_spmm_t_add(benchmark, problem, backend):
    p, si = problem, problem["sparse_index"]
    base = torch.zeros_like(p["x"])
    benchmark(synchronized(lambda: spmm_t_add(base, p["dy"], p["delta"], si.flat, si.col_ptr, si.csc_perm, backend)))
