"""Backend registry and dispatch.

Every op has implementations per backend (``reference``, ``triton``, ``cuda``) registered with
:func:`register`; :func:`resolve_backend` turns a requested backend ("auto" or a name) into the
one that runs, or raises a clear error. Nothing here initialises CUDA.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from ._extension import SpftExtensionWarning, cuda_extension_error, load_cuda_extension
from ._triton import interpreter_enabled, triton

BACKENDS = ("reference", "triton", "cuda")
AUTO = "auto"

# op name -> backend -> implementation
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}

# Preference of "auto" per device type. The Triton SpMM/SDDMM kernels are correct (interpreter
# tests) but not yet measured on a GPU, so "auto" keeps the reference path for those ops until
# measurements say otherwise; they run when asked for by name.
_AUTO_ORDER = {"cuda": ("cuda", "reference"), "cpu": ("reference",)}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _IMPLEMENTATIONS.setdefault(op, {})[backend] = fn
        return fn

    return decorator


def _triton_unavailable_reason() -> Optional[str]:
    return "triton is not installed (pip install triton)" if triton is None else None


def _unavailable_reason(backend: str) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cuda":
        return None if load_cuda_extension() is not None else cuda_extension_error()
    if backend == "triton":
        reason = _triton_unavailable_reason()
        if reason is None and not any("triton" in impls for impls in _IMPLEMENTATIONS.values()):
            reason = "this version ships no Triton kernels yet"
        return reason
    return f"unknown backend {backend!r}"


def available_backends() -> list[str]:
    """Backends that are installed and implement at least one op, e.g. ["reference", "cuda"].

    "cuda" means the extension is built and loads; its ops still need CUDA tensors.
    Never initialises CUDA.
    """
    return [backend for backend in BACKENDS if _unavailable_reason(backend) is None]


def check_backend_name(backend: str) -> str:
    if backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {(AUTO,) + BACKENDS}")
    return backend


def resolve_backend(op: str, requested: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` for the ``requested`` name."""
    check_backend_name(requested)
    implemented = _IMPLEMENTATIONS.get(op, {})
    if requested == AUTO:
        if device.type == "cuda" and "cuda" in implemented:
            _warn_once_if_cuda_missing(op)
        for backend in _AUTO_ORDER.get(device.type, ("reference",)):
            if backend in implemented and _unavailable_reason(backend) is None:
                return backend
        raise RuntimeError(f"{op}: no backend implements it on {device.type}")
    reason = _unavailable_reason(requested)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} is not available: {reason}")
    if requested not in implemented:
        raise NotImplementedError(
            f"{op}: backend {requested!r} has no implementation of this op yet; "
            f"implemented: {sorted(implemented)}"
        )
    if requested == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if requested == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), "
            f"got tensors on {device}"
        )
    return requested


_warned_cuda_missing = False


def _warn_once_if_cuda_missing(op: str) -> None:
    """One warning per process when CUDA tensors meet an install without the CUDA extension."""
    global _warned_cuda_missing
    reason = _unavailable_reason("cuda")
    if reason is not None and not _warned_cuda_missing:
        _warned_cuda_missing = True
        warnings.warn(
            f"{reason}; {op} and the other spft ops on CUDA tensors fall back to slower backends",
            SpftExtensionWarning,
            stacklevel=4,
        )


def implementation(op: str, backend: str) -> Callable:
    return _IMPLEMENTATIONS[op][backend]
