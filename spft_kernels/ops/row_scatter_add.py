"""``y[..., rows] += z``: the SPruFT row scatter that adds ``x Wfᵀ`` into the frozen layer's output.

The sum is formed in fp32 (fp64 when an operand is fp64) and rounded once to y's dtype, so every
backend writes bitwise the same y; ``z`` may be wider than ``y`` (an fp32 ``x Wfᵀ`` into a bf16
output costs one rounding instead of two).
"""

from __future__ import annotations

import torch

from . import naive
from ._triton import tl, triton
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


def _scatter_2d(y, z, rows, kernel):
    """Calls ``kernel(y2d, z2d, rows)`` on [tokens, features] views whose rows are contiguous,
    working on a contiguous copy of y (written back) when its leading dims cannot be viewed so."""
    features = y.shape[-1]
    try:
        y2d = y.view(-1, features)
    except RuntimeError:  # leading dims that cannot be flattened without a copy
        y2d = None
    if y2d is None or (y2d.stride(1) != 1 and features > 1):
        work = y.contiguous().view(-1, features)
        _scatter_2d(work, z, rows, kernel)
        y.copy_(work.view(y.shape))
        return
    z2d = z.reshape(-1, rows.numel())
    if z2d.stride(1) != 1 and rows.numel() > 1:
        z2d = z2d.contiguous()
    kernel(y2d, z2d, rows)


@register("row_scatter_add", "cuda")
def _row_scatter_add_cuda(y, z, rows):
    _scatter_2d(y, z, rows, torch.ops.spft.cuda_row_scatter_add_)


if triton is not None:

    @triton.jit
    def _row_scatter_add_kernel(
        y_ptr, z_ptr, rows_ptr, num_tokens, num_rows, stride_y, stride_z,
        ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Rows are unique, so no two programs write one element: no atomics, one rounding.
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        slot_mask = slots < num_rows
        rows = tl.load(rows_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
        mask = (tokens < num_tokens)[:, None] & slot_mask[None, :]
        y_offsets = tokens[:, None] * stride_y + rows[None, :]
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + tokens[:, None] * stride_z + slots[None, :], mask=mask, other=0.0).to(acc_dtype)
        tl.store(y_ptr + y_offsets, (y + z).to(y_ptr.dtype.element_ty), mask=mask)

    def _launch_row_scatter_add(y2d, z2d, rows):
        block_t, block_r = 32, 64
        grid = (triton.cdiv(y2d.shape[0], block_t), triton.cdiv(rows.numel(), block_r))
        _row_scatter_add_kernel[grid](
            y2d, z2d, rows, y2d.shape[0], rows.numel(), y2d.stride(0), z2d.stride(0),
            ACC_FP64=naive.accumulate_dtype(y2d, z2d) == torch.float64, BLOCK_T=block_t, BLOCK_R=block_r,
        )

    @register("row_scatter_add", "triton")
    def _row_scatter_add_triton(y, z, rows):
        _scatter_2d(y, z, rows, _launch_row_scatter_add)


def row_scatter_add_(y: Tensor, z: Tensor, rows: Tensor, backend: str = "auto", *, validate: bool = True) -> Tensor:
    """In place ``y[..., rows[r]] += z[..., r]`` for ``y`` [..., features], ``z`` [..., R] and 1-D
    integer ``rows`` [R]; returns ``y``. ``y`` and ``z`` must not overlap.

    ``validate=True`` checks that the rows are in range and unique (one host sync); callers that
    hold canonical rows (validated once, see :func:`spft_kernels.ops.index.canonical_rows`) pass
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
