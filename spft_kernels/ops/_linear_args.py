"""Argument checks shared by the functional layer ops (``sparse_delta_linear``,
``row_delta_linear``): the same rules and messages, prefixed with the op's name."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import resolve_backend

Tensor = torch.Tensor


def unit_feature_stride(t: Tensor) -> Tensor:
    """``t`` with stride 1 along its last (feature) dimension, as the kernels index rows; a copy
    only when it is strided there (a width of 0 or 1 has no stride to speak of)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def check_x_and_weight(op: str, x, weight, delta, delta_name: str) -> tuple[int, int]:
    """Types, a 2-D weight and ``x`` [..., in]; returns ``(out_features, in_features)``."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or not isinstance(delta, Tensor):
        raise ValueError(f"{op}: x, weight and {delta_name} must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: x must have shape [..., {in_features}] to match weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    return out_features, in_features


def prepare_operands(
    op: str,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    others: Sequence[Tensor],
    ops: Sequence[str],
    backend: str,
    *,
    out_features: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Bias shape, one device for everything, autocast, one dtype for the GEMM operands, and every
    kernel op of the step resolved now (so that a missing kernel fails here, not in backward).
    Returns ``(x, weight, bias)`` in the dtype the GEMMs run in. ``weight=None`` (the base term
    is computed elsewhere) needs ``out_features``."""
    if weight is not None:
        out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    present = [t for t in (x, weight, bias) if t is not None]
    devices = {t.device for t in (*present, *others)}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if torch.is_autocast_enabled(x.device.type):
        # Mirror F.linear under autocast: the matmul operands run in the autocast dtype.
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(autocast_dtype)
        weight = None if weight is None else weight.to(autocast_dtype)
        bias = None if bias is None else bias.to(autocast_dtype)
    if (weight is not None and x.dtype != weight.dtype) or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"{op}: x, weight and bias must share a dtype, got x {x.dtype}"
            + ("" if weight is None else f", weight {weight.dtype}")
            + ("" if bias is None else f", bias {bias.dtype}")
        )
    for kernel_op in ops:
        resolve_backend(kernel_op, backend, x.device)
    return x, weight, bias


def weight_for_dx(ctx, weight: Tensor) -> Optional[Tensor]:
    """W0 to save for backward, only when dx is needed (as ``F.linear`` does): a frozen weight
    that is an inference tensor (a model built under ``torch.inference_mode``) can then still
    train its delta, and nothing is kept alive that backward does not read."""
    return weight if ctx.needs_input_grad[0] else None
