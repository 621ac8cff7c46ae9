"""Library sparse ops vs the row-block reference and the dense GEMM (CPU, fp32).

Run: OMP_NUM_THREADS=N python measure.py  (from the worktree root, PYTHONPATH=$PWD)
Interleaved providers, median of R repeats."""
import os, sys, time, statistics, json
import torch
from spft_kernels.ops import naive
from spft_kernels.ops.index import random_index
from spft_kernels.bench.op_count import count_ops

torch.manual_seed(0)
R = int(os.environ.get("REPEATS", "15"))
CASES = [(2048, 2048, 1024, 0.001), (2048, 2048, 1024, 0.01), (2048, 2048, 1024, 0.05), (32768, 4096, 256, 0.01)]
if len(sys.argv) > 1:
    CASES = CASES[: int(sys.argv[1])]

def csr_of(flat, values, out, inn):
    flat = flat.long()
    rows = flat // inn
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
    return torch.sparse_csr_tensor(crow, flat - rows * inn, values, (out, inn))

def timeit(fns):
    times = {k: [] for k in fns}
    for _ in range(R):
        for k, f in fns.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}

rows_out = []
for out, inn, T, d in CASES:
    flat = random_index(out, inn, d)
    nnz = flat.numel()
    x = torch.randn(T, inn); dy = torch.randn(T, out); delta = torch.randn(nnz)
    mask = csr_of(flat, torch.zeros(nnz), out, inn)
    dcsr = csr_of(flat, delta, out, inn)
    dcsc = dcsr.t()  # CSC layout view of Δᵀ? (transposed CSR)
    dyt = dy.t().contiguous()
    fns = {
        "dense dyT x": lambda: dy.t().mm(x),
        "reference sddmm": lambda: naive.sddmm(x, dy, flat),
        "sampled_addmm (dy.t() view)": lambda: torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0),
        "sampled_addmm (dyT contig)": lambda: torch.sparse.sampled_addmm(mask, dyt, x, beta=0.0),
        "sampled_addmm (dy.t().contiguous() incl copy)": lambda: torch.sparse.sampled_addmm(mask, dy.t().contiguous(), x, beta=0.0),
        "reference spmm x D^T": lambda: naive.spmm_add(torch.zeros(T, out), x, delta, flat),
        "csr mm (D @ x^T)^T": lambda: torch.mm(dcsr, x.t()).t(),
        "csr mm x @ D^T (addmm dense@csc)": lambda: torch.mm(x, dcsr.t()),
        "reference spmm_t dy D": lambda: naive.spmm_t_add(torch.zeros(T, inn), dy, delta, flat),
        "csr mm (D^T @ dy^T)^T via csc": lambda: torch.mm(dcsr.t(), dy.t()).t(),
        "dense dy @ csr": lambda: torch.mm(dy, dcsr),
    }
    W = torch.randn(out, inn)
    fns["dense x W^T"] = lambda: torch.mm(x, W.t())
    res = timeit(fns)
    # correctness / repeatability
    ref = naive.sddmm(x.double(), dy.double(), flat)
    sa = torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0)
    sa2 = torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0)
    info = dict(shape=(out, inn), tokens=T, density=d, nnz=nnz, threads=torch.get_num_threads(),
                ms=res,
                sddmm_err=float((sa.values().double() - ref).abs().max()),
                sddmm_bitwise=bool(torch.equal(sa.values(), sa2.values())),
                spmm_bitwise=bool(torch.equal(torch.mm(dcsr, x.t()), torch.mm(dcsr, x.t()))),
                ops=dict(
                    sampled_addmm=count_ops(lambda: torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0)),
                    csr_mm=count_ops(lambda: torch.mm(dcsr, x.t())),
                    csc_mm=count_ops(lambda: torch.mm(dcsr.t(), dy.t())),
                    reference_sddmm=count_ops(lambda: naive.sddmm(x, dy, flat)),
                ))
    print(json.dumps(info), flush=True)
