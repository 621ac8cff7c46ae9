"""pytest-benchmark microbenchmarks of the ops on whatever device is present. Not part of the
test run (pytest's testpaths is python_tests); run them with

    .venv/bin/python -m pytest bench --benchmark-only

Cases are small on a CPU and sized as the GPU shapes of docs/architecture.md on a GPU. On a GPU each timed call ends with a
synchronize, so the numbers are wall time of the whole op.
"""

import pytest
import torch

import spft_kernels as spft

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# (out, in, tokens, density)
CASES = (
    [(4096, 4096, 8192, 0.01), (11008, 4096, 8192, 0.01), (4096, 4096, 8192, 0.001)]
    if DEVICE.type == "cuda"
    else [(512, 512, 256, 0.01), (1024, 512, 128, 0.05)]
)


def backends():
    usable = ["reference"]
    if DEVICE.type == "cuda":
        usable += [b for b in ("triton", "cuda") if b in spft.available_backends()]
    return usable


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}x{c[1]}-t{c[2]}-d{c[3]}")
def problem(request):
    out_features, in_features, tokens, density = request.param
    generator = torch.Generator().manual_seed(0)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    sparse_index, _ = spft.SparseIndex.build(index.to(DEVICE), out_features, in_features)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE, DTYPE)  # noqa: E731
    return dict(
        sparse_index=sparse_index,
        delta=torch.randn(index.numel(), generator=generator).to(DEVICE),
        weight=make(out_features, in_features),
        x=make(tokens, in_features),
        dy=make(tokens, out_features),
    )


def synchronized(fn):
    def run():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    return run
