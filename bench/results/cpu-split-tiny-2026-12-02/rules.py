"""The measurements behind the small-weight rules (ops/library_sparse.py): forward + dx of one layer
through the CSR products against a private W0 + Δ, and the masked gradient by sampled_addmm against
the dense dyᵀx GEMM and a gather; fp32, one thread, medians, interleaved.
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/results/cpu-split-tiny-2026-12-02/rules.py
"""
import sys, time, statistics, warnings
import torch
warnings.filterwarnings("ignore")
import spft_kernels as spft
from spft_kernels.ops.csr_index import CsrIndex
from spft_kernels.ops import library_sparse

# "lib": the CSR products, as before the rule (linear_with_delta / dx_with_delta take the
# private sum below the bound now).
library_sparse.PRIVATE_SUM_MAX_ENTRIES = 0


def private_sum_case(out, inn, T, dens, reps):
    g = torch.Generator().manual_seed(0)
    idx = spft.random_index(out, inn, dens, generator=g)
    csr = CsrIndex.from_flat(idx, out, inn)
    delta = torch.randn(idx.numel(), generator=g)*1e-2
    W = torch.randn(out, inn, generator=g); b = torch.randn(out, generator=g)
    x = torch.randn(T, inn, generator=g); dy = torch.randn(T, out, generator=g)
    def lib():
        cols = csr.columns()
        y = library_sparse.linear_with_delta(x, W, b, delta, csr, cols)
        dx = library_sparse.dx_with_delta(dy, W, delta, csr, cols)
    def tmp():
        cols = csr.columns()
        A = csr.tensor(delta, cols)
        y = torch.addmm(b, x, torch.add(W, A).t())
        dx = dy.mm(torch.add(W, csr.tensor(delta, cols)))
    fns = dict(lib=lib, tmp=tmp)
    s = {n: [] for n in fns}
    for _ in range(3):
        for f in fns.values(): f()
    for _ in range(reps):
        for n, f in fns.items():
            t = time.perf_counter(); f(); s[n].append(time.perf_counter() - t)
    m = {n: statistics.median(v) * 1e6 for n, v in s.items()}
    print(f"private sum {out}x{inn} T={T} d={dens} nnz={idx.numel()}: lib {m['lib']:.1f} us tmp {m['tmp']:.1f} us  tmp/lib {m['tmp']/m['lib']:.2f}", flush=True)
def gradient_case(n, T, d):
    o = i = n
    g = torch.Generator().manual_seed(0)
    idx = spft.random_index(o, i, d, generator=g)
    csr = CsrIndex.from_flat(idx, o, i)
    x = torch.randn(T, i, generator=g); dy = torch.randn(T, o, generator=g)
    fs = dict(lib=lambda: library_sparse.sddmm(x, dy, csr),
              dense=lambda: torch.mm(dy.t(), x).view(-1).index_select(0, idx))
    s = {k: [] for k in fs}
    for _ in range(10):
        for f in fs.values(): f()
    for _ in range(max(30, min(2000, 2000 * 64 * 64 * 16 // (o * i * T)))):
        for k, f in fs.items():
            t = time.perf_counter(); f(); s[k].append(time.perf_counter() - t)
    m = {k: statistics.median(v) * 1e6 for k, v in s.items()}
    print(f"gradient {n}x{n} T={T:4d} d={d}: out*in*T=2^{(o*i*T).bit_length()-1} sampled {m['lib']:.1f} us "
          f"dense {m['dense']:.1f} us  dense/sampled {m['dense']/m['lib']:.2f}", flush=True)


for T in (16, 256):
    for n in (64, 128, 256, 512, 1024):
        for d in (0.01, 0.05):
            private_sum_case(n, n, T, d, max(20, int(4000 / (n / 64) ** 2)))
for n in (64, 128, 256, 512):
    for T in (1, 16, 64, 256):
        for d in (0.01, 0.05):
            gradient_case(n, T, d)
