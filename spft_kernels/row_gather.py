"""``dy[..., rows]``: the SPruFT row gather that feeds ``dWf = dy[..., rows]ᵀ x``."""

from __future__ import annotations

import torch

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


@register("row_gather", "cuda")
def _row_gather_cuda(src, rows):
    src2d = src.reshape(-1, src.shape[-1])
    if src2d.stride(-1) != 1:
        src2d = src2d.contiguous()
    return torch.ops.spft.cuda_row_gather(src2d, rows).reshape(*src.shape[:-1], rows.numel())


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
    return _row_gather_op(src, rows, backend)
