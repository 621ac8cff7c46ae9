"""``dy[..., rows]``: the SPruFT row gather that feeds ``dWf = dy[..., rows]ᵀ x``."""

from __future__ import annotations

import torch

from ._eager import runs_eagerly
from ._linear_args import unit_feature_stride
from ._triton import tl, triton
from .backends import implementation, register, resolve_backend

Tensor = torch.Tensor


@torch.library.custom_op("spft::row_gather", mutates_args=())
def _row_gather_op(src: Tensor, rows: Tensor, backend: str) -> Tensor:
    chosen = resolve_backend("row_gather", backend, src.device)
    return implementation("row_gather", chosen)(src, rows)


@_row_gather_op.register_fake
def _(src, rows, backend):
    return src.new_empty((*src.shape[:-1], rows.numel()))


@register("row_gather", "reference")
def _row_gather_reference(src, rows):
    return src.index_select(-1, rows)


def _gather_2d(src, rows, kernel):
    """``kernel(src2d, rows) -> [tokens, R]`` on a [tokens, features] view with contiguous rows."""
    src2d = unit_feature_stride(src.reshape(-1, src.shape[-1]))
    return kernel(src2d, rows).reshape(*src.shape[:-1], rows.numel())


@register("row_gather", "cuda")
def _row_gather_cuda(src, rows):
    return _gather_2d(src, rows, torch.ops.spft.cuda_row_gather)


if triton is not None:

    @triton.jit
    def _row_gather_kernel(
        src_ptr, rows_ptr, out_ptr, num_tokens, num_rows, stride_src,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        slot_mask = slots < num_rows
        rows = tl.load(rows_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
        mask = (tokens < num_tokens)[:, None] & slot_mask[None, :]
        values = tl.load(src_ptr + tokens[:, None] * stride_src + rows[None, :], mask=mask)
        tl.store(out_ptr + tokens[:, None] * num_rows + slots[None, :], values, mask=mask)

    def _launch_row_gather(src2d, rows):
        out = torch.empty(src2d.shape[0], rows.numel(), dtype=src2d.dtype, device=src2d.device)
        if out.numel():
            block_t, block_r = 32, 64
            grid = (triton.cdiv(src2d.shape[0], block_t), triton.cdiv(rows.numel(), block_r))
            _row_gather_kernel[grid](
                src2d, rows, out, src2d.shape[0], rows.numel(), src2d.stride(0), BLOCK_T=block_t, BLOCK_R=block_r
            )
        return out

    @register("row_gather", "triton")
    def _row_gather_triton(src, rows):
        return _gather_2d(src, rows, _launch_row_gather)


def row_gather(src: Tensor, rows: Tensor, backend: str = "auto", *, validate: bool = True) -> Tensor:
    """``src[..., rows]`` for ``src`` [..., features] and 1-D integer ``rows``.

    ``validate=True`` checks that every row is in range (one host sync); layers that validated
    their rows once pass ``validate=False``.
    """
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("row_gather: rows must be a 1-D int32 or int64 tensor")
    if src.dim() == 0:
        raise ValueError("row_gather: src must have at least one dimension")
    if rows.device != src.device:
        raise ValueError(f"row_gather: rows are on {rows.device}, src on {src.device}")
    if validate and rows.numel():
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= src.shape[-1]:
            raise ValueError(f"row_gather: row {low if low < 0 else high} is out of range [0, {src.shape[-1]})")
    if runs_eagerly(src, rows):  # the body without the custom op's wrapper (ops/_eager.py)
        return implementation("row_gather", resolve_backend("row_gather", backend, src.device))(src, rows)
    return _row_gather_op(src, rows, backend)
