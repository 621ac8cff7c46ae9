# The 2048x2048 PST layer alone (r1 = r2 = 10, 50% sparsity), 1,024 tokens: medians of 9 steps after 2.
# OMP_NUM_THREADS=1 PYTHONPATH=<tree> python ab_2048.py <label>, the trees alternating.
import time, statistics, torch, torch.nn as nn, sys
from spft_kernels.nn.pst_linear import PSTLinear
torch.manual_seed(0)
base = nn.Linear(2048, 2048); base.weight.requires_grad_(False); base.bias.requires_grad_(False)
layer = PSTLinear.from_linear(base, 0.5, r1=10, r2=10, generator=torch.Generator().manual_seed(0))
x = torch.randn(1024, 2048, requires_grad=True); g = torch.randn(1024, 2048)
params = [p for p in layer.parameters() if p.requires_grad]
f, b, s = [], [], []
for i in range(11):
    for p in params: p.grad = None
    x.grad = None
    t0 = time.perf_counter(); y = layer(x); t1 = time.perf_counter(); y.backward(g); t2 = time.perf_counter()
    if i >= 2: f.append(t1 - t0); b.append(t2 - t1); s.append(t2 - t0)
print(sys.argv[1], f"step {statistics.median(s)*1e3:.1f} ms, fwd {statistics.median(f)*1e3:.1f} bwd {statistics.median(b)*1e3:.1f}")
