"""The two ceilings of the current device, measured once per GPU session (METHOD.md): a large
device-to-device copy (bytes read + bytes written per second) and a large bf16 GEMM through
cuBLAS (TFLOP/s), both on random data (zeros run faster than real data: 13% for a bf16 GEMM
on an H200 here). The floors in bench/TUNING.md are redone with these numbers.

    python bench/ceilings.py [--output ceilings.json]

On a CPU it runs small sizes in fp32, which only checks that the script works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess

import torch

from spft_kernels.bench.benchmark import time_interleaved


def median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """CUDA events on a GPU, the host clock on a CPU (spft-bench's timer)."""
    return time_interleaved({"call": (lambda: None, fn)}, device, repeats, warmup)["call"]


def measure(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    # 2 GiB read + 2 GiB written: far beyond the 60 MB L2, so the copy measures HBM.
    copy_bytes = (2 << 30) if cuda else (64 << 20)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, repeats=20, warmup=3)
    del src, dst
    # 8192^3 bf16: the size KINDS.md measured 788 TFLOP/s at on random data.
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms = median_ms(lambda: a @ b, device, repeats=20, warmup=3)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "copy_bytes": 2 * copy_bytes,
        "copy_ms": copy_ms,
        "copy_tb_s": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
        "gemm_shape": [n, n, n],
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "gemm_ms": gemm_ms,
        "gemm_tflops": 2 * n**3 / (gemm_ms * 1e-3) / 1e12,
        "repeats": 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the record to this JSON file")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = measure(device)
    text = json.dumps(record, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
