"""``y[..., rows] += z``: the SPruFT row scatter that adds ``x Wfᵀ`` into the frozen layer's output.

The sum is formed in fp32 (fp64 when an operand is fp64) and rounded once to y's dtype, so every
backend writes bitwise the same y; ``z`` may be wider than ``y`` (an fp32 ``x Wfᵀ`` into a bf16
output costs one rounding instead of two).
"""

from __future__ import annotations

import torch

from . import naive
from .backends import implementation, register, resolve_backend

Tensor = torch.Tensor


@torch.library.custom_op("spft::row_scatter_add_", mutates_args=("y",))
def _row_scatter_add_op(y: Tensor, z: Tensor, rows: Tensor, backend: str) -> None:
    chosen = resolve_backend("row_scatter_add", backend, y.device)
    implementation("row_scatter_add", chosen)(y, z, rows)


@_row_scatter_add_op.register_fake
def _(y, z, rows, backend):
    return None


@register("row_scatter_add", "reference")
def _row_scatter_add_reference(y, z, rows):
    naive.row_scatter_add_(y, z, rows)


@register("row_scatter_add", "cuda")
def _row_scatter_add_cuda(y, z, rows):
    features = y.shape[-1]
    try:
        y2d = y.view(-1, features)
    except RuntimeError:  # leading dims that cannot be flattened without a copy
        y2d = None
    if y2d is None or (y2d.stride(1) != 1 and features > 1):
        work = y.contiguous().view(-1, features)
        _row_scatter_add_cuda(work, z, rows)
        y.copy_(work.view(y.shape))
        return
    z2d = z.reshape(-1, rows.numel())
    if z2d.stride(1) != 1 and rows.numel() > 1:
        z2d = z2d.contiguous()
    torch.ops.spft.cuda_row_scatter_add_(y2d, z2d, rows)


def row_scatter_add_(y: Tensor, z: Tensor, rows: Tensor, backend: str = "auto", *, validate: bool = True) -> Tensor:
    """In place ``y[..., rows[r]] += z[..., r]`` for ``y`` [..., features], ``z`` [..., R] and 1-D
    integer ``rows`` [R]; returns ``y``. ``y`` and ``z`` must not overlap.

    ``validate=True`` checks that the rows are in range and unique (one host sync); callers that
    hold canonical rows (validated once, see :func:`spft_kernels.index.canonical_rows`) pass
    ``validate=False``.
    """
    if not isinstance(y, Tensor) or not isinstance(z, Tensor):
        raise ValueError("row_scatter_add_: y and z must be tensors")
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("row_scatter_add_: rows must be a 1-D int32 or int64 tensor")
    if y.dim() == 0:
        raise ValueError("row_scatter_add_: y must have at least one dimension")
    if z.shape != (*y.shape[:-1], rows.numel()):
        raise ValueError(
            f"row_scatter_add_: z must have shape {(*y.shape[:-1], rows.numel())} (y's leading dims, one "
            f"column per row), got {tuple(z.shape)}"
        )
    if not y.is_floating_point() or not z.is_floating_point():
        raise ValueError(f"row_scatter_add_: y and z must be floating point, got {y.dtype} and {z.dtype}")
    if len({y.device, z.device, rows.device}) > 1:
        raise ValueError(f"row_scatter_add_: y, z and rows must be on one device, got {y.device}, {z.device}, {rows.device}")
    if validate and rows.numel():
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= y.shape[-1]:
            raise ValueError(f"row_scatter_add_: row {low if low < 0 else high} is out of range [0, {y.shape[-1]})")
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("row_scatter_add_: rows has duplicates; each row may appear once")
    if y.numel() and rows.numel():
        _row_scatter_add_op(y, z, rows, backend)
    return y
