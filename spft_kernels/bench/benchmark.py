"""``spft-bench``: one linear layer, forward / backward / forward+backward, against dense and LoRA.

Providers at the same number of trainable parameters (the names of ``docs/architecture.md``, "Benchmarks"):

- ``dense-frozen``: frozen ``F.linear`` (the floor for forward and dx);
- ``dense-full``: the weight trains (full fine-tuning of the layer);
- ``lora-peft`` / ``lora-peft-dropout``: peft's LoRA, dropout 0 and 0.1, rank
  ``round(nnz / (in + out))``; ``lora-torch`` (a minimal LoRA layer) when peft is missing;
- ``shira-peft``, ``supertuning-peft``: peft's own sparse adapters where the installed peft has
  them (they scatter into a weight copy and let autograd form a dense dW);
- ``naive-sparse``: that same approach written here (for versions of peft without them);
- ``torch-sparse``: ``x W0ᵀ + (Δ_coo xᵀ)ᵀ`` with ``torch.sparse``, where it supports the dtype;
- ``spft-<mode>-<backend>``: every SparseDeltaLinear mode × backend that runs on the device;
- ``spruft-<mode>-<backend>``: RowSparseLinear with ``round(nnz / in)`` random rows;
- ``block-<mode>-<backend>``: BlockSparseLinear with 64x64 random blocks at the same budget
  (``round(nnz / 4096)`` blocks);
- ``pst-<backend>``: PSTLinear at 50% sparsity with r1 = r2 = r / 2 (PST prunes as it trains).

With ``--quantize nf4|fp4|int8`` (and ``--shape``) W0 is a bitsandbytes layer quantized from the
same weight (4-bit: double quantization, computing in the case's dtype): ``dense-frozen`` is that
frozen layer, ``lora-peft`` is QLoRA (peft's LoRA on it), and ``spft-split``, ``spruft-split``
and ``block-split`` train over it (split is the only mode there).

Kernel ops on the same cases: ``sddmm`` (the delta gradient; ``spft-row-blocks-reference``, the
default on every device (row-block GEMMs, or the gather path where its cost model says so),
``spft-gather-dot-<backend>`` and, where a backend has it, ``spft-tensor-core-<backend>``, against
``dense-full``: the dense weight-gradient GEMM ``dyᵀx``) and ``spmm`` (``x Δᵀ`` added into y,
``spft-csr-<backend>``, and ``dy Δ``, ``spft-csc-<backend>``, against ``dense-frozen``: the GEMM
``x W0ᵀ``).

Times are medians over repeats, the providers of a case taking turns (CUDA events on a GPU);
peak memory comes from the CUDA allocator on a GPU and from
:class:`~spft_kernels.memory.TensorMemoryTracker` on the CPU, and counts the layer, the input and everything allocated during the call. ``ops_per_call`` is the
number of ops one call launches (:class:`~spft_kernels.bench.op_count.OpCounter`, counted once):
on a GPU each costs microseconds of host time, so a count that grows with the tokens shows here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import report as bench_report
from ..ops.backends import available_backends, implemented_backends
from ..ops.index import SparseIndex, random_index
from ..nn.block_sparse_linear import BlockSparseLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..ops.block_index import block_grid, random_block_ids
from ..nn.sparse_delta_linear import SparseDeltaLinear
from ..nn.pst_linear import PSTLinear
from .known_noise import known_noise
from .memory import TensorMemoryTracker
from .op_count import count_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("linear_fwd", "linear_bwd", "linear_fwd_bwd")
KERNEL_OPS = ("sddmm", "spmm")
BLOCK_SIZE = (64, 64)  # the block providers' blocks (the issue's and SMT-like sizes on a GPU are 64-256)
SKIP_ERRORS = (NotImplementedError, RuntimeError, ValueError, TypeError, ImportError)
MEMORY_METHODS = ("full", "lora", "sparta", "speft", "spruft", "pst", "block")  # memory_estimate.METHODS


class ProviderUnavailable(Exception):
    """A provider that cannot run here (missing package, unsupported dtype); the reason is shown."""


class LoraLinear(nn.Module):
    """Frozen base plus ``B A`` (rank r, ``B`` zero-initialised), as peft builds it with dropout 0."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **factory) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


class NaiveSparseDelta(nn.Module):
    """The straightforward sparse delta: scatter into a copy of W0 each forward, so autograd forms
    the dense out x in weight gradient and gathers the masked entries from it."""

    def __init__(self, base: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("index", index.long())
        self.delta = nn.Parameter(torch.zeros(index.numel(), device=base.weight.device))

    def forward(self, x):
        flat = self.base.weight.reshape(-1)
        weight = flat.index_put((self.index,), flat[self.index] + self.delta.to(flat.dtype)).view_as(self.base.weight)
        return F.linear(x, weight, self.base.bias)


class TorchSparseDelta(nn.Module):
    """``x W0ᵀ + b + (Δ xᵀ)ᵀ`` with Δ a ``torch.sparse`` COO tensor built from the trainable values."""

    def __init__(self, base: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.base = base
        in_features = base.in_features
        index = index.long()
        self.register_buffer("coordinates", torch.stack([index // in_features, index % in_features]))
        self.delta = nn.Parameter(torch.zeros(index.numel(), device=base.weight.device))

    def forward(self, x):
        x2d = x.reshape(-1, self.base.in_features)
        delta = torch.sparse_coo_tensor(
            self.coordinates, self.delta.to(x.dtype), self.base.weight.shape, is_coalesced=True
        )
        sparse_part = torch.sparse.mm(delta, x2d.t()).t()
        return (self.base(x2d) + sparse_part).reshape(*x.shape[:-1], self.base.out_features)


class _Wrapper(nn.Module):
    """peft adapts named submodules: give the layer a name."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.layer = linear

    def forward(self, x):
        return self.layer(x)


def _peft_provider(config_name: str, **config_kwargs) -> Callable[[nn.Linear], nn.Module]:
    def make(base: nn.Linear) -> nn.Module:
        try:
            import peft
        except ImportError as error:
            raise ProviderUnavailable("peft is not installed") from error
        config_cls = getattr(peft, config_name, None)
        if config_cls is None:
            raise ProviderUnavailable(f"peft {peft.__version__} has no {config_name}")
        with known_noise():
            model = peft.get_peft_model(_Wrapper(base), config_cls(target_modules=["layer"], **config_kwargs))
        if config_name != "LoraConfig":
            return model
        # (a quantized base's weight is packed integers: its adapters compute in the bias's dtype)
        dtype = base.weight.dtype if base.weight.is_floating_point() else base.bias.dtype
        return model.to(dtype)

    return make


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
    try:
        with known_noise():
            import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "peft": peft_version,
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor, kind: str, dtype: torch.dtype,
                     device: torch.device) -> nn.Linear:
    """A bitsandbytes layer holding ``weight`` quantized (4-bit with double quantization, computing in
    ``dtype``; or int8), the bias in ``dtype``, frozen."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ProviderUnavailable("bitsandbytes is not installed") from error
    out_features, in_features = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False, threshold=0.0)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=dtype, compress_statistics=True,
                                  quant_type=kind)
    layer.load_state_dict({"weight": weight.to(dtype), "bias": bias.to(dtype)})
    layer = layer.to(device)  # quantizes
    layer.bias.requires_grad_(False)
    return layer


def build_providers(case: dict, device: torch.device, seed: int = 0) -> dict[str, Callable[[], nn.Module]]:
    """Factories of the layers to compare; each call makes a fresh layer on its own copy of W0."""
    out_features, in_features, density = case["out_features"], case["in_features"], case["density"]
    dtype = DTYPES[case["dtype"]]
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    bias = torch.randn(out_features, generator=generator) * 0.01
    index = random_index(out_features, in_features, density, generator=generator)
    rank = max(1, round(index.numel() / (in_features + out_features)))

    def base_linear(trainable: bool = False) -> nn.Linear:
        linear = nn.Linear(in_features, out_features, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype, copy=True), requires_grad=trainable)
        linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype, copy=True), requires_grad=trainable)
        return linear

    def with_base(make_from_base: Callable[[nn.Linear], nn.Module]) -> Callable[[], nn.Module]:
        return lambda: make_from_base(base_linear())

    if case.get("quantize"):
        return _quantized_providers(case, weight, bias, index, rank, device, generator)
    providers: dict[str, Callable[[], nn.Module]] = {
        "dense-frozen": base_linear,
        "dense-full": lambda: base_linear(trainable=True),
    }
    try:
        import peft  # noqa: F401

        providers["lora-peft"] = with_base(_peft_provider("LoraConfig", r=rank, lora_alpha=2 * rank, lora_dropout=0.0))
        providers["lora-peft-dropout"] = with_base(
            _peft_provider("LoraConfig", r=rank, lora_alpha=2 * rank, lora_dropout=0.1)
        )
    except ImportError:
        providers["lora-torch"] = with_base(lambda base: LoraLinear(base, rank))
    providers["shira-peft"] = with_base(_peft_provider("ShiraConfig", r=rank, random_seed=seed))
    providers["supertuning-peft"] = with_base(_peft_provider("SupertuningConfig", sparsity=1.0 - density))
    providers["naive-sparse"] = with_base(lambda base: NaiveSparseDelta(base, index.to(device)))
    providers["torch-sparse"] = with_base(lambda base: TorchSparseDelta(base, index.to(device)))
    backends = ["reference"]
    if device.type == "cuda":
        backends += [b for b in ("triton", "cuda") if b in available_backends()]
    # PST at about the same budget ((in + out)(r1 + r2 + 1) with r1 = r2 = r / 2), pruning half the weight.
    pst_rank = max(1, rank // 2)
    for backend in ["reference"] + (["triton"] if device.type == "cuda" and "triton" in available_backends() else []):
        providers[f"pst-{backend}"] = with_base(
            lambda base, backend=backend: PSTLinear.from_linear(
                base, 0.5, r1=pst_rank, r2=pst_rank, backend=backend, generator=torch.Generator().manual_seed(seed)
            )
        )
    # SPruFT at the same budget: R = round(r (in + out) / in) whole rows.
    num_rows = min(out_features, max(1, round(index.numel() / in_features)))
    rows = torch.randperm(out_features, generator=generator)[:num_rows].sort().values
    for mode in ("merged", "split"):
        for backend in backends:
            def make_rows(mode=mode, backend=backend):
                layer = RowSparseLinear.from_linear(base_linear(), rows.to(device), mode=mode, backend=backend)
                with torch.no_grad():
                    layer.delta.normal_(0.0, 1e-3)
                return layer

            providers[f"spruft-{mode}-{backend}"] = make_rows
    providers.update(block_providers(base_linear, index.numel(), out_features, in_features, backends, generator))
    for mode in ("merged", "split", "fused"):
        # The reference "fused" forward is the split one; only a real fused GEMM is worth timing.
        for backend in [b for b in backends if mode != "fused" or b in implemented_backends("fused_delta_linear")
                        and b != "reference"]:
            def make(mode=mode, backend=backend):
                layer = SparseDeltaLinear.from_linear(base_linear(), index.to(device), mode=mode, backend=backend)
                with torch.no_grad():  # a trained-looking delta, so the merged mode re-syncs real values
                    layer.delta.normal_(0.0, 1e-3)
                return layer

            providers[f"spft-{mode}-{backend}"] = make
    return providers


def _quantized_providers(case, weight, bias, index, rank, device, generator) -> dict[str, Callable[[], nn.Module]]:
    """The providers over a quantized W0 (``quantized_linear``): its frozen forward, QLoRA and
    every position kind in split mode, at the case's budget."""
    dtype = DTYPES[case["dtype"]]
    out_features, in_features = weight.shape

    def base_linear(trainable: bool = False) -> nn.Linear:
        return quantized_linear(weight, bias, case["quantize"], dtype, device)

    def trained(layer):
        with torch.no_grad():
            layer.delta.normal_(0.0, 1e-3)
        return layer

    num_rows = min(out_features, max(1, round(index.numel() / in_features)))
    rows = torch.randperm(out_features, generator=generator)[:num_rows].sort().values
    providers = {
        "dense-frozen": base_linear,
        "lora-peft": lambda: _peft_provider("LoraConfig", r=rank, lora_alpha=2 * rank, lora_dropout=0.0)(base_linear()),
        "spft-split-reference": lambda: trained(SparseDeltaLinear.from_linear(base_linear(), index.to(device), mode="split")),
        "spruft-split-reference": lambda: trained(RowSparseLinear.from_linear(base_linear(), rows.to(device), mode="split")),
    }
    blocks = block_providers(base_linear, index.numel(), out_features, in_features, ["reference"], generator)
    providers["block-split-reference"] = blocks["block-split-reference"]
    return providers


def block_providers(base_linear, count: int, out_features: int, in_features: int, backends, generator,
                    block_size=BLOCK_SIZE) -> dict[str, Callable[[], nn.Module]]:
    """``block-<mode>-<backend>``: BlockSparseLinear with ``round(count / (bh * bw))`` random
    blocks (at least one), i.e. the case's trainable budget in whole blocks."""
    grid = block_grid(out_features, in_features, block_size)
    num_blocks = min(grid[0] * grid[1], max(1, round(count / (block_size[0] * block_size[1]))))
    blocks = random_block_ids(out_features, in_features, block_size, num_blocks, generator)
    providers = {}
    for mode in ("merged", "split"):
        for backend in [b for b in backends if b in implemented_backends("block_delta_linear")]:
            def make(mode=mode, backend=backend):
                base = base_linear()
                layer = BlockSparseLinear.from_linear(base, blocks.to(base.weight.device), block_size=block_size, mode=mode, backend=backend)
                with torch.no_grad():  # a trained-looking delta, so the merged mode re-syncs real values
                    layer.delta.normal_(0.0, 1e-3)
                return layer

            providers[f"block-{mode}-{backend}"] = make
    return providers


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _steps(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, op: str):
    """(untimed setup, timed call) for one repeat of ``op``."""
    params = _trainable(module)
    state = {}

    def clear_grads():
        for p in params:
            p.grad = None
        x.grad = None

    def forward():
        with torch.no_grad():
            module(x)

    def forward_for_backward():
        clear_grads()
        state["y"] = module(x)

    def backward():
        state.pop("y").backward(grad_out)

    def forward_backward():
        module(x).backward(grad_out)

    if op == "linear_fwd":
        return (lambda: None), forward
    if op == "linear_bwd":
        return forward_for_backward, backward
    return clear_grads, forward_backward


def _time_once_ms(fn: Callable, device: torch.device) -> tuple[float, float]:
    """(device ms, host ms) of one call. On a GPU the host time is what the call takes to return
    (launching its ops, Python included) before the device has finished: when it nears the
    device time, the step is bound by launches, not by the kernels. On a CPU both are the call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - begin) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host_ms
    begin = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - begin) * 1e3
    return elapsed, elapsed


def time_interleaved_with_host(
    calls: dict[str, tuple[Callable, Callable]], device: torch.device, repeats: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """(median device ms, median host ms) of each ``(setup, fn)``, the calls taking turns repeat
    by repeat, so that load that comes and goes (a shared CPU, a GPU's clocks) weighs on every
    provider alike and the ratios of one run hold."""
    for _ in range(warmup):
        for setup, fn in calls.values():
            setup()
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (setup, fn) in calls.items():
            setup()
            samples[name].append(_time_once_ms(fn, device))
    return {
        name: (statistics.median(d for d, _ in values), statistics.median(h for _, h in values))
        for name, values in samples.items()
    }


def time_interleaved(
    calls: dict[str, tuple[Callable, Callable]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median device ms of each ``(setup, fn)`` (see :func:`time_interleaved_with_host`)."""
    return {name: ms for name, (ms, _) in time_interleaved_with_host(calls, device, repeats, warmup).items()}


def peak_memory_bytes(setup: Callable, fn: Callable, module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes during one setup + call, counting the module's tensors and the input."""
    setup()
    fn()  # once first: lazy merges and allocations that happen once
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        setup()
        fn()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device)
    tensors = list(module.parameters()) + list(module.buffers()) + [x]
    with TensorMemoryTracker(baseline=tensors) as tracker:
        setup()
        fn()
    return tracker.peak_bytes


def _flops(op: str, provider: str, case: dict) -> float:
    gemm = 2.0 * case["tokens"] * case["in_features"] * case["out_features"]
    backward_gemms = 2 if provider == "dense-full" else 1  # dx, plus dW when the weight trains
    return {"linear_fwd": gemm, "linear_bwd": backward_gemms * gemm, "linear_fwd_bwd": (1 + backward_gemms) * gemm}[op]


def run_case(case: dict, device: torch.device, repeats: int, warmup: int, env: dict, progress=None) -> list[dict]:
    if not any(op in case["ops"] for op in OPS):
        return []
    dtype = DTYPES[case["dtype"]]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case["tokens"], case["in_features"], generator=generator)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(case["tokens"], case["out_features"], generator=generator).to(device=device, dtype=dtype)
    records, makers = [], {}
    for name, make in build_providers(case, device).items():
        if case.get("providers") and name not in case["providers"]:
            continue
        try:
            module = make()
            setup, fn = _steps(module, x, grad_out, "linear_fwd_bwd")
            setup()
            fn()  # a provider that cannot run this case is skipped, with the reason
        except (ProviderUnavailable,) + SKIP_ERRORS as error:
            if progress is not None:
                progress.write(f"  skip {name}: {str(error).splitlines()[0][:160]}")
            continue
        makers[name] = make
        trainable = sum(p.numel() for p in _trainable(module))
        for op in [op for op in case["ops"] if op in OPS]:
            setup, fn = _steps(module, x, grad_out, op)
            setup()
            ops_per_call = count_ops(fn)
            records.append(
                {
                    "op": op,
                    "provider": name,
                    "out_features": case["out_features"],
                    "in_features": case["in_features"],
                    "tokens": case["tokens"],
                    "density": case["density"],
                    "dtype": case["dtype"],
                    **({"quantize": case["quantize"]} if case.get("quantize") else {}),
                    "trainable_params": trainable,
                    "peak_mem_bytes": peak_memory_bytes(setup, fn, module, x),
                    "ops_per_call": ops_per_call,
                    "repeats": repeats,
                    **env,
                }
            )
        del module
        if progress is not None:
            progress.update(1)
    # Timing: every provider alive at once, taking turns (peak memory above was one at a time).
    modules = {name: make() for name, make in makers.items()}
    for op in [op for op in case["ops"] if op in OPS]:
        medians = time_interleaved_with_host(
            {n: _steps(m, x, grad_out, op) for n, m in modules.items()}, device, repeats, warmup
        )
        for record in records:
            if record["op"] == op:
                median, record["host_ms"] = medians[record["provider"]]
                record["median_ms"] = median
                record["tflops"] = _flops(op, record["provider"], case) / (median * 1e-3) / 1e12 if median > 0 else None
    bench_report.add_ratios(records)
    return records


def _kernel_providers(case: dict, device: torch.device) -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (op, call) for the kernel ops of ``case``."""
    from ..ops import library_sparse
    from ..ops.sddmm import sddmm
    from ..ops.spmm import spmm_add, spmm_t_add

    dtype = DTYPES[case["dtype"]]
    out_features, in_features, tokens = case["out_features"], case["in_features"], case["tokens"]
    generator = torch.Generator().manual_seed(2)
    index = random_index(out_features, in_features, case["density"], generator=generator).to(device)
    si, _ = SparseIndex.build(index, out_features, in_features, tile_metadata=True)
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
    dy = torch.randn(tokens, out_features, generator=generator).to(device, dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(device, dtype)
    delta = torch.randn(si.nnz, generator=generator).to(device)
    y, dx = F.linear(x, weight), dy @ weight
    providers = {}
    if "sddmm" in case["ops"]:
        providers["dense-full"] = ("sddmm", lambda: dy.t() @ x)
    if "spmm" in case["ops"]:
        providers["dense-frozen"] = ("spmm", lambda: F.linear(x, weight))
    backends = ["reference"] + ([b for b in ("triton", "cuda") if b in available_backends()] if device.type == "cuda" else [])
    for backend in backends:
        if "sddmm" in case["ops"] and backend in implemented_backends("sddmm"):
            variant = "row-blocks" if backend == "reference" else "gather-dot"
            providers[f"spft-{variant}-{backend}"] = ("sddmm", lambda b=backend: sddmm(x, dy, si.flat, None, b))
            if backend != "reference":  # the tensor-core variant; the reference ignores tile_ptr
                providers[f"spft-tensor-core-{backend}"] = ("sddmm", lambda b=backend: sddmm(x, dy, si.flat, si.tile_ptr, b))
        if backend == "reference":  # the default path: the library's sparse ops on the stored CSR
            csr = si.csr()
            if "sddmm" in case["ops"]:
                providers["spft-library-reference"] = ("sddmm", lambda: library_sparse.sddmm(x, dy, csr))
            if "spmm" in case["ops"]:
                providers["spft-library-csr-reference"] = ("spmm", lambda: library_sparse.x_delta_t(x, delta, csr))
                providers["spft-library-csc-reference"] = ("spmm", lambda: library_sparse.dy_delta(dy, delta, csr))
        if "spmm" in case["ops"]:
            if backend in implemented_backends("spmm_add"):
                providers[f"spft-csr-{backend}"] = ("spmm", lambda b=backend: spmm_add(y, x, delta, si.flat, si.row_ptr, b))
            if backend in implemented_backends("spmm_t_add"):
                providers[f"spft-csc-{backend}"] = (
                    "spmm", lambda b=backend: spmm_t_add(dx, dy, delta, si.flat, si.col_ptr, si.csc_perm, b)
                )
    return providers


def run_kernel_case(case: dict, device: torch.device, repeats: int, warmup: int, env: dict, progress=None) -> list[dict]:
    """The sddmm and spmm ops of ``case`` (see the module docstring)."""
    if not any(op in case["ops"] for op in KERNEL_OPS):
        return []
    records, calls = [], {}
    nnz = round(case["density"] * case["out_features"] * case["in_features"])
    for name, (op, call) in _kernel_providers(case, device).items():
        if case.get("providers") and name not in case["providers"]:
            continue
        try:
            call()
        except SKIP_ERRORS as error:
            if progress is not None:
                progress.write(f"  skip {op} {name}: {str(error).splitlines()[0][:160]}")
            continue
        calls[name] = (lambda: None, call)
        # Kernel ops record the bytes allocated during the call (operands excluded), on any device.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with TensorMemoryTracker() as tracker:
                call()
            peak = tracker.peak_bytes
        records.append(
            {
                "op": op, "provider": name, "out_features": case["out_features"], "in_features": case["in_features"],
                "tokens": case["tokens"], "density": case["density"], "dtype": case["dtype"],
                "trainable_params": nnz, "peak_mem_bytes": peak, "ops_per_call": count_ops(call), "repeats": repeats, **env,
            }
        )
    medians = time_interleaved_with_host(calls, device, repeats, warmup)
    for record in records:
        median, record["host_ms"] = medians[record["provider"]]
        record["median_ms"] = median
        gemm_flops = 2.0 * case["tokens"] * case["in_features"] * case["out_features"]
        record["tflops"] = gemm_flops / (median * 1e-3) / 1e12 if median > 0 and record["provider"].startswith("dense") else None
    bench_report.add_ratios(records)
    return records


def append_jsonl(records: list[dict], path: str) -> None:
    """One JSON line per record, flushed at once (the GPU session keeps what a timeout cut short)."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def load_records(path: str) -> list[dict]:
    """Records of a results.json (a JSON list) or of an ``--append-jsonl`` file (JSON lines)."""
    with open(path) as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# A tiny layer, where a step's time is all per-op overhead (host time per launched op on a GPU):
# every --quick run shows it, so a method whose ops per step grow shows in every CI run.
HOST_OVERHEAD_CASE = dict(out_features=64, in_features=64, tokens=16, density=0.05, dtype="float32",
                          ops=["linear_fwd_bwd"], label="host overhead")


def format_host_overhead(records: list[dict]) -> str:
    """The host-overhead case in a few lines: each method's ops per step and time vs LoRA."""
    case = HOST_OVERHEAD_CASE
    rows = [r for r in records if r["op"] == "linear_fwd_bwd" and r["tokens"] == case["tokens"]
            and (r["out_features"], r["in_features"]) == (case["out_features"], case["in_features"])]
    if not rows:
        return ""
    lora = next((r for r in rows if r["provider"] in ("lora-peft", "lora-torch")), None)
    lines = [f"host overhead ({case['out_features']}x{case['in_features']}, {case['tokens']} tokens, fwd+bwd: "
             f"per-op overhead on a GPU):"]
    for r in sorted(rows, key=lambda r: r["median_ms"]):
        ratio = f"{r['median_ms'] / lora['median_ms']:.2f}x {lora['provider']}" if lora and lora["median_ms"] else ""
        lines.append(f"  {r['provider']:<24} {r.get('ops_per_call', '-'):>5} ops  {r['median_ms']:8.3f} ms  {ratio}")
    return "\n".join(lines)


def default_cases(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [dict(out_features=1024, in_features=1024, tokens=256, density=0.01, dtype="float32",
                     ops=list(OPS + KERNEL_OPS)), dict(HOST_OVERHEAD_CASE)]
    if device.type == "cuda":
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
        return [
            dict(out_features=o, in_features=i, tokens=t, density=d, dtype="bfloat16", ops=list(OPS + KERNEL_OPS))
            for (o, i) in shapes
            for t in (4096, 16384)
            for d in (0.001, 0.005, 0.01, 0.05)
        ]
    return [
        dict(out_features=o, in_features=i, tokens=512, density=d, dtype="float32", ops=list(OPS + KERNEL_OPS))
        for (o, i) in [(1024, 1024), (2048, 1024)]
        for d in (0.001, 0.01, 0.05)
    ]


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="providers", unit="provider", file=sys.stderr, disable=None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="spft-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case (under a minute on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("OUT", "IN"), help="a single layer shape")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per step, one case each (with --shape)")
    parser.add_argument("--density", type=float, nargs="+", help="delta densities, one case each (with --shape)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype (with --shape)")
    parser.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers (with --shape)")
    parser.add_argument("--ops", nargs="+", choices=OPS + KERNEL_OPS, help="only these ops (with --shape)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--output", help="directory for results.json, summary.md and plots "
                        "(default for a full run: bench/results/<device>-<date>; --quick, --shape and --memory "
                        "write nothing without it)")
    parser.add_argument("--append-jsonl", metavar="FILE", help="append each case's records to FILE as JSON lines "
                        "as soon as the case is done (a run killed midway keeps the finished cases)")
    parser.add_argument("--e2e", action="store_true", help="also train a Llama-style model a few steps per "
                        "method (full, peft LoRA, spft) at matched trainable parameters")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end training comparison")
    parser.add_argument("--compare", metavar="FILE", help="an earlier results.json to compare against")
    parser.add_argument("--report", metavar="FILE", help="only regenerate summary.md and plots from a results.json")
    memory = parser.add_argument_group("--memory: will it fit? (peak of one training step per method, fake tensors)")
    memory.add_argument("--memory", action="store_true", help="estimate the training step's peak memory per method "
                        "on the CPU, without a GPU or weights (memory_estimate.py)")
    memory.add_argument("--model-config", metavar="PATH.json", help="a transformers config as JSON (with model_type), "
                        "e.g. bench/configs/llama-2-7b.json")
    memory.add_argument("--methods", default=",".join(MEMORY_METHODS), help="comma-separated, from "
                        + ",".join(MEMORY_METHODS))
    memory.add_argument("--rank", type=int, default=16, help="LoRA rank; the other methods match its parameter count")
    memory.add_argument("--batch", type=int, default=1, help="sequences per step")
    memory.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    memory.add_argument("--mode", choices=("merged", "split"), default="merged", help="mode of the sparse layers")
    memory.add_argument("--optimizer", choices=("fused", "foreach", "loop"), default="fused",
                        help="AdamW implementation (fused: the Trainer's default)")
    memory.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                        help="the target linears (with --memory) or the layer (with --shape) in bitsandbytes 4-bit "
                        "(with --double-quant: QLoRA's recipe) or 8-bit, computing in --dtype; lora is then QLoRA "
                        "and the sparse layers run split")
    memory.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit: quantize the block scales too (default: on, as QLoRA)")
    args = parser.parse_args(argv)

    if args.memory:
        from . import memory_estimate

        if not args.model_config:
            parser.error("--memory needs --model-config PATH.json")
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.dtype = DTYPES[args.dtype or "bfloat16"]
        return memory_estimate.main(args, environment(torch.device("cpu")))

    if args.report:
        records = load_records(args.report)
        bench_report.write_report(records, os.path.dirname(os.path.abspath(args.report)))
        print(bench_report.format_table(records))
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shape:
        cases = [
            dict(
                out_features=args.shape[0],
                in_features=args.shape[1],
                tokens=tokens,
                density=density,
                dtype=args.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
                ops=list(args.ops or (OPS if args.quantize else OPS + KERNEL_OPS)),
                providers=args.providers,
                quantize=args.quantize,
            )
            for tokens in (args.tokens or [512])
            for density in (args.density or [0.01])
        ]
    else:
        cases = default_cases(args.quick, device)
    repeats = args.repeats or (50 if device.type == "cuda" else (5 if args.quick else 10))
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    env = environment(device)
    print(f"spft-bench on {env['device']}, torch {env['torch']}, peft {env['peft']}, backends {available_backends()}",
          flush=True)
    records = []
    if args.e2e_only:
        cases = []
    progress = _progress(total=len(cases) * len(build_providers(cases[0], device))) if cases else None
    for number, case in enumerate(cases, 1):
        if progress is not None:
            progress.set_postfix_str(
                f"case {number}/{len(cases)}: {case['out_features']}x{case['in_features']} T={case['tokens']} "
                f"d={case['density']}"
            )
        with known_noise():  # the baselines' warnings (known_noise.py); filters cost nothing until one fires
            for run in (run_case, run_kernel_case):
                case_records = run(case, device, repeats, warmup, env, progress)
                records += case_records
                if args.append_jsonl:
                    append_jsonl(case_records, args.append_jsonl)
    if progress is not None:
        progress.close()
    if records:
        print(bench_report.format_table(records))
        overhead = format_host_overhead(records)
        if overhead:
            print(overhead)
    if args.e2e or args.e2e_only:
        from .e2e import format_e2e, run_e2e

        e2e = run_e2e(device, torch.bfloat16 if device.type == "cuda" else torch.float32, env=env)
        print(format_e2e(e2e))
        records += e2e
    if args.compare:
        print(bench_report.format_comparison(records, load_records(args.compare)))
    output = args.output
    if output is None and not args.quick and not args.shape:
        slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
        output = os.path.join("bench", "results", f"{slug}-{env['date']}")
    if output:
        paths = bench_report.write_report(records, output)
        print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
