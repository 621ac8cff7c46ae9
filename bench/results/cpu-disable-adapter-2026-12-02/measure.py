"""The cost of disable_adapter() per layer: one layer's forward (no_grad) as a plain nn.Linear, as an
active spft layer (merged / split) and inside disable_adapter() (merged: with the temporary W0 of
that layer; split: the weight as it is). Medians of REPEATS calls, providers in turn."""

import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.disabled_adapter import layers_disabled

REPEATS = 30
torch.manual_seed(0)


def median_ms(fn, x):
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


rows = []
for size, tokens in [(1024, 256), (1024, 2048), (4096, 256)]:
    linear = nn.Linear(size, size)
    x = torch.randn(tokens, size)
    index = spft.random_index(size, size, density=0.01, generator=torch.Generator().manual_seed(0))
    for mode in ("merged", "split"):
        layer = spft.SparseDeltaLinear.from_linear(nn.Linear(size, size), index, mode=mode)
        layer.prepare_for_training()
        with torch.no_grad():
            layer.delta.normal_()
        container = nn.Sequential(layer)
        plain = median_ms(linear, x)
        active = median_ms(container, x)
        with layers_disabled(container):
            disabled = median_ms(container, x)
        rows.append(dict(size=size, tokens=tokens, mode=mode, plain_ms=plain, active_ms=active, disabled_ms=disabled,
                         disabled_over_plain=disabled / plain))
        print(json.dumps(rows[-1]))
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump(dict(device="cpu (x86_64, 2 cores), one thread", torch=torch.__version__, commit=commit, repeats=REPEATS,
               rows=rows), open(sys.argv[1], "w"), indent=1)
