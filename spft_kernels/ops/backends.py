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

# (op, backend) pairs that "auto" never picks: implementations that have not been run and
# measured on a GPU yet. They run when asked for by name.
_NOT_AUTO: set[tuple[str, str]] = set()

# Preference of "auto" per device type. The Triton kernels are correct (interpreter tests) but
# not yet measured on a GPU, so "auto" keeps the reference path for those ops until
# measurements say otherwise; they run when asked for by name.
_AUTO_ORDER = {"cuda": ("cuda", "reference"), "cpu": ("reference",)}


def register(op: str, backend: str, *, auto: bool = True) -> Callable[[Callable], Callable]:
    """Register ``backend``'s implementation of ``op``; ``auto=False`` keeps "auto" from picking
    it (for kernels not yet verified and measured on a GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _IMPLEMENTATIONS.setdefault(op, {})[backend] = fn
        if not auto:
            _NOT_AUTO.add((op, backend))
        return fn

    return decorator


def auto_candidates(op: str, device_type: str) -> list[str]:
    """The backends "auto" may pick for ``op`` on ``device_type``, in order of preference."""
    implemented = _IMPLEMENTATIONS.get(op, {})
    return [
        backend
        for backend in _AUTO_ORDER.get(device_type, ("reference",))
        if backend in implemented and (op, backend) not in _NOT_AUTO
    ]


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
    implemented = _IMPLEMENTATIONS.get(op, {})
    if "reference" in implemented and (
        requested == "reference"
        or (requested == AUTO and _AUTO_ORDER.get(device.type) == ("reference",) and (op, "reference") not in _NOT_AUTO)
    ):
        # The usual call (a layer's step resolves 2-4 ops): the reference backend is always
        # available, so none of the checks below can say otherwise (~3 µs a call saved).
        return "reference"
    check_backend_name(requested)
    if requested == AUTO:
        candidates = auto_candidates(op, device.type)
        if device.type == "cuda" and "cuda" in candidates:
            _warn_once_if_cuda_missing(op)
        for backend in candidates:
            if _unavailable_reason(backend) is None:
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


def implemented_backends(op: str) -> list[str]:
    """The backends that have an implementation of ``op`` (installed or not)."""
    return [backend for backend in BACKENDS if backend in _IMPLEMENTATIONS.get(op, {})]


def implementation(op: str, backend: str) -> Callable:
    return _IMPLEMENTATIONS[op][backend]
