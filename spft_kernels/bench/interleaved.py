"""Side-by-side timing of a few ``spft-bench`` providers on one case, interleaved: every repeat
runs each provider once, in turn, so that a noisy (shared) machine slows them alike and the
ratios stay meaningful. Records have the ``spft-bench`` format (``results.json``,
``summary.md``).

    python -m spft_kernels.bench.interleaved --shape 2048 2048 --tokens 1024 --density 0.015625 \\
        --providers lora-peft dense-full block-merged-reference --output bench/results/NAME

(``--density 0.015625`` at 2048x2048 is LoRA rank 16's parameter count, 16 blocks of 64x64.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional

import torch

from . import report as bench_report
from .benchmark import DTYPES, OPS, _flops, _steps, _trainable, build_providers, environment, peak_memory_bytes

DEFAULT_PROVIDERS = ("dense-full", "lora-peft", "block-merged-reference", "block-split-reference")


def run_interleaved(case: dict, providers: list[str], device: torch.device, repeats: int, warmup: int,
                    env: dict, ops=("linear_fwd_bwd",)) -> list[dict]:
    dtype = DTYPES[case["dtype"]]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case["tokens"], case["in_features"], generator=generator).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(case["tokens"], case["out_features"], generator=generator).to(device, dtype)
    factories = build_providers(case, device)
    unknown = sorted(set(providers) - set(factories))
    if unknown:
        raise ValueError(f"unknown providers {unknown}; available: {sorted(factories)}")
    modules = {name: factories[name]() for name in providers}
    records = []
    for op in ops:
        steps = {name: _steps(module, x, grad_out, op) for name, module in modules.items()}
        samples: dict[str, list] = {name: [] for name in providers}
        for repeat in range(warmup + repeats):
            for name, (setup, fn) in steps.items():
                setup()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                begin = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if repeat >= warmup:
                    samples[name].append((time.perf_counter() - begin) * 1e3)
        for name, module in modules.items():
            setup, fn = steps[name]
            median = statistics.median(samples[name])
            records.append({
                "op": op, "provider": name, "out_features": case["out_features"],
                "in_features": case["in_features"], "tokens": case["tokens"], "density": case["density"],
                "dtype": case["dtype"], "trainable_params": sum(p.numel() for p in _trainable(module)),
                "median_ms": median, "tflops": _flops(op, name, case) / (median * 1e-3) / 1e12,
                "peak_mem_bytes": peak_memory_bytes(setup, fn, module, x), "repeats": repeats,
                "interleaved": True, **env,
            })
    bench_report.add_ratios(records)
    return records


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spft_kernels.bench.interleaved", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, metavar=("OUT", "IN"), default=(2048, 2048))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--density", type=float, default=0.015625)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=["linear_fwd_bwd"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", help="directory for results.json and summary.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    case = dict(out_features=args.shape[0], in_features=args.shape[1], tokens=args.tokens, density=args.density,
                dtype=dtype, ops=list(args.ops))
    env = environment(device)
    records = run_interleaved(case, args.providers, device, args.repeats, args.warmup, env, tuple(args.ops))
    print(bench_report.format_table(records))
    if args.output:
        print("wrote " + ", ".join(bench_report.write_report(records, args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
