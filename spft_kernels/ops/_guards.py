"""Small guards shared by every folder: building state outside ``torch.inference_mode`` and
accepting integer-like sizes (numpy integers included).

Why the inference-mode guard exists: a tensor created under ``torch.inference_mode`` is an
*inference tensor*. It has no version counter (reading ``_version`` raises), cannot be saved for
backward and cannot be written in place outside inference mode. A layer built, merged or loaded
inside an evaluation loop would keep such tensors (its delta, its index metadata, the W0 values
kept aside) and fail at the next training step. Long-lived state is therefore always made
outside inference mode, wherever the call comes from; the grad mode is left as the caller had it.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Optional

import torch


@contextlib.contextmanager
def outside_inference_mode():
    """Run the block with inference mode off (tensors made inside are normal tensors) and the
    caller's grad mode (``inference_mode(False)`` alone would turn grad mode on)."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def builds_state(function):
    """Decorator: ``function`` makes or rewrites long-lived state, so it runs ``outside_inference_mode``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():  # the usual case, without a context manager (~2 µs a call)
            return function(*args, **kwargs)
        with outside_inference_mode():
            return function(*args, **kwargs)

    return wrapper


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type``, or a no-op one when it is off already:
    entering ``torch.autocast(enabled=False)`` costs ~4 µs a call, a tenth of a 64x64 layer's
    step, for nothing when autocast was not on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def is_inference(tensor: Optional[torch.Tensor]) -> bool:
    """Whether ``tensor`` is an inference tensor (made under ``torch.inference_mode``)."""
    return isinstance(tensor, torch.Tensor) and tensor.is_inference()


def as_int(value) -> Optional[int]:
    """``value`` as a Python int when it is an integer (numpy integers and 0-d integer tensors
    included, bools excluded), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        if value.device.type == "meta":
            return None
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    return None


def as_float(value) -> Optional[float]:
    """``value`` as a Python float when it is a real number (numpy scalars included, bools
    excluded), else None. Non-finite values are returned as they are; callers check the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def describe(value) -> str:
    """``value`` with its type, for messages (``3.0 (float)``), so that a refused value is never
    shown as if it were a valid one."""
    return f"{value!r} ({type(value).__name__})"
