"""What split mode would cost at 2048x2048, 1,024 tokens, 1% if the private W0 + Δ were allowed
there (it is not: PRIVATE_SUM_MAX_ENTRIES = 2^18; this raises the bound for one provider's calls
only). Interleaved with peft LoRA and entries merged / split, median of the repeats.
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/results/cpu-split-tiny-2026-12-02/private_sum_at_2048.py 15
"""
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
from spft_kernels.bench.benchmark import _steps, build_providers  # noqa: E402
from spft_kernels.ops import library_sparse  # noqa: E402

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 15
case = dict(out_features=2048, in_features=2048, density=0.01, dtype="float32", tokens=1024)
providers = build_providers(case, torch.device("cpu"))
generator = torch.Generator().manual_seed(1)
x = torch.randn(1024, 2048, generator=generator).requires_grad_(True)
dy = torch.randn(1024, 2048, generator=generator)
names = {"lora-peft": "lora-peft", "spft-merged-reference": "spft-merged-reference",
         "spft-split-reference": "spft-split-reference", "split, private sum": "spft-split-reference"}
calls = {label: _steps(providers[name](), x, dy, "linear_fwd_bwd") for label, name in names.items()}
bound = library_sparse.PRIVATE_SUM_MAX_ENTRIES
samples = {label: [] for label in calls}
for step in range(repeats + 2):
    for label, (setup, fn) in calls.items():
        library_sparse.PRIVATE_SUM_MAX_ENTRIES = 2048 * 2048 if label == "split, private sum" else bound
        setup()
        begin = time.perf_counter()
        fn()
        if step >= 2:
            samples[label].append(time.perf_counter() - begin)
library_sparse.PRIVATE_SUM_MAX_ENTRIES = bound
lora = statistics.median(samples["lora-peft"])
for label, values in samples.items():
    median = statistics.median(values)
    print(f"{label:24s} {median * 1e3:8.1f} ms  {median / lora:.2f}x lora-peft")
