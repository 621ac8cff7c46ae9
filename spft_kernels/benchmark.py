"""``spft-bench``: one linear layer, forward and forward+backward, against dense and LoRA baselines.

Providers at the same number of trainable parameters (DESIGN.md names):
``dense-frozen`` (frozen ``F.linear``: the floor for forward and dx), ``dense-full`` (the weight
trains), ``lora-torch`` (a minimal LoRA layer, rank ``round(nnz / (in + out))``; the benchmark
issue adds peft's own) and ``spft-<mode>-<backend>`` for every layer mode and backend that runs
on the device. Times are medians over repeats (CUDA events on a GPU); peak memory comes from the
CUDA allocator on a GPU and from :class:`~spft_kernels.memory.TensorMemoryTracker` on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from .backends import available_backends
from .index import random_index
from .layers import SparseDeltaLinear
from .memory import TensorMemoryTracker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoraLinear(nn.Module):
    """Frozen base plus ``B A`` (rank r, ``B`` zero-initialised), as peft builds it with dropout 0."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **factory) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        import platform

        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def build_providers(out_features, in_features, density, dtype, device, seed=0) -> dict[str, Callable[[], nn.Module]]:
    """Factories of the layers to compare; each call makes a fresh layer with the same W0."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    bias = torch.randn(out_features, generator=generator) * 0.01
    index = random_index(out_features, in_features, density, generator=generator)
    nnz = index.numel()
    rank = max(1, round(nnz / (in_features + out_features)))

    def base_linear(trainable: bool) -> nn.Linear:
        linear = nn.Linear(in_features, out_features, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype, copy=True), requires_grad=trainable)
        linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype, copy=True), requires_grad=trainable)
        return linear

    providers = {
        "dense-frozen": lambda: base_linear(False),
        "dense-full": lambda: base_linear(True),
        "lora-torch": lambda: LoraLinear(base_linear(False), rank),
    }
    backends = ["reference"] + (["cuda"] if device.type == "cuda" and "cuda" in available_backends() else [])
    for mode in ("merged", "split"):
        for backend in backends:
            def make(mode=mode, backend=backend):
                layer = SparseDeltaLinear.from_linear(
                    base_linear(False), index.to(device), mode=mode, backend=backend
                )
                with torch.no_grad():  # a trained-looking delta, so merged mode re-syncs real values
                    layer.delta.normal_(0.0, 1e-3)
                return layer

            providers[f"spft-{mode}-{backend}"] = make
    return providers


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _step_fn(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, op: str) -> Callable[[], None]:
    params = _trainable(module)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad_out)

    return forward if op == "linear_fwd" else forward_backward


def time_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn: Callable[[], None], module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes during one call, counting the module's tensors and the input."""
    fn()  # first call: lazy merges and allocations that happen once
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        fn()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device)
    tensors = list(module.parameters()) + list(module.buffers()) + [x]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    with TensorMemoryTracker(baseline=tensors) as tracker:
        fn()
    return tracker.peak_bytes


def run_case(case: dict, device: torch.device, repeats: int, warmup: int, env: dict) -> list[dict]:
    dtype = DTYPES[case["dtype"]]
    out_features, in_features, tokens = case["out_features"], case["in_features"], case["tokens"]
    flops_forward = 2.0 * tokens * in_features * out_features
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_features, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, generator=generator).to(device=device, dtype=dtype)
    records = []
    providers = build_providers(out_features, in_features, case["density"], dtype, device)
    for name, make in providers.items():
        module = make()
        trainable = sum(p.numel() for p in _trainable(module))
        for op in case["ops"]:
            fn = _step_fn(module, x, grad_out, op)
            median = time_ms(fn, device, repeats, warmup)
            # dense-full's backward does two GEMMs, the others one GEMM plus their sparse work.
            flops = flops_forward * (1 if op == "linear_fwd" else (3 if name == "dense-full" else 2))
            records.append(
                {
                    "op": op,
                    "provider": name,
                    "out_features": out_features,
                    "in_features": in_features,
                    "tokens": tokens,
                    "density": case["density"],
                    "dtype": case["dtype"],
                    "trainable_params": trainable,
                    "median_ms": median,
                    "tflops": flops / (median * 1e-3) / 1e12 if median > 0 else None,
                    "peak_mem_bytes": peak_memory_bytes(fn, module, x),
                    "repeats": repeats,
                    **env,
                }
            )
    _add_ratios(records)
    return records


def _add_ratios(records: list[dict]) -> None:
    baselines = {(r["op"], r["provider"]): r["median_ms"] for r in records}
    for record in records:
        for baseline in ("dense-frozen", "dense-full", "lora-torch"):
            reference = baselines.get((record["op"], baseline))
            if reference:
                record[f"ratio_vs_{baseline}"] = record["median_ms"] / reference


def default_cases(quick: bool, device: torch.device) -> list[dict]:
    ops = ["linear_fwd", "linear_fwd_bwd"]
    if quick:
        return [dict(out_features=1024, in_features=1024, tokens=256, density=0.01, dtype="float32", ops=ops)]
    if device.type == "cuda":
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
        return [
            dict(out_features=o, in_features=i, tokens=t, density=d, dtype="bfloat16", ops=ops)
            for (o, i) in shapes
            for t in (4096, 16384)
            for d in (0.001, 0.005, 0.01, 0.05)
        ]
    return [
        dict(out_features=o, in_features=i, tokens=512, density=d, dtype="float32", ops=ops)
        for (o, i) in [(1024, 1024), (2048, 1024)]
        for d in (0.001, 0.01, 0.05)
    ]


def format_table(records: list[dict]) -> str:
    header = f"{'op':<15}{'shape':>12}{'tokens':>8}{'density':>9}{'provider':>24}{'trainable':>11}{'median ms':>11}{'x dense-frozen':>16}{'peak MiB':>10}"
    lines = [header, "-" * len(header)]
    for r in records:
        shape = f"{r['out_features']}x{r['in_features']}"
        ratio = r.get("ratio_vs_dense-frozen")
        lines.append(
            f"{r['op']:<15}{shape:>12}{r['tokens']:>8}{r['density']:>9.4g}{r['provider']:>24}{r['trainable_params']:>11}"
            f"{r['median_ms']:>11.3f}{(f'{ratio:.2f}x' if ratio else '-'):>16}{r['peak_mem_bytes'] / 2**20:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="spft-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case (under a minute on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("OUT", "IN"), help="a single layer shape")
    parser.add_argument("--tokens", type=int, help="tokens per step (with --shape)")
    parser.add_argument("--density", type=float, help="delta density (with --shape)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype (with --shape)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--output", help="write the JSON records to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shape:
        cases = [
            dict(
                out_features=args.shape[0],
                in_features=args.shape[1],
                tokens=args.tokens or 512,
                density=0.01 if args.density is None else args.density,
                dtype=args.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
                ops=["linear_fwd", "linear_fwd_bwd"],
            )
        ]
    else:
        cases = default_cases(args.quick, device)
    repeats = args.repeats or (50 if device.type == "cuda" else (5 if args.quick else 10))
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    env = environment(device)
    print(f"spft-bench on {env['device']}, torch {env['torch']}, backends {available_backends()}", flush=True)
    records = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case['out_features']}x{case['in_features']} tokens={case['tokens']} "
              f"density={case['density']} {case['dtype']}", file=sys.stderr, flush=True)
        records += run_case(case, device, repeats, warmup, env)
    print(format_table(records))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(records, handle, indent=1)
        print(f"wrote {len(records)} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
