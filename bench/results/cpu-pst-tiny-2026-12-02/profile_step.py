# A 64x64 PST layer (r1 = r2 = 1, 50% sparsity, as spft-bench builds it), 16 tokens: fwd+bwd a step.
# OMP_NUM_THREADS=1 PYTHONPATH=<tree> python profile_step.py [prof] [tprof]: µs a step (best of 3 x 2,000),
# then cProfile over 2,000 steps (prof) or torch.profiler over 20 (tprof).
import cProfile, pstats, sys, time, torch, torch.nn as nn
from spft_kernels.nn.pst_linear import PSTLinear
torch.manual_seed(0)
base = nn.Linear(64, 64); base.weight.requires_grad_(False); base.bias.requires_grad_(False)
layer = PSTLinear.from_linear(base, 0.5, r1=1, r2=1, generator=torch.Generator().manual_seed(0))
x = torch.randn(16, 64, requires_grad=True); g = torch.randn(16, 64)
params = [p for p in layer.parameters() if p.requires_grad]
def step():
    for p in params: p.grad = None
    x.grad = None
    layer(x).backward(g)
for _ in range(200): step()
def timeit(n=2000):
    t = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - t) / n * 1e6
print("us/step", min(timeit() for _ in range(3)))
if "prof" in sys.argv:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000): step()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
if "tprof" in sys.argv:
    from torch.profiler import profile
    with profile() as p:
        for _ in range(20): step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
