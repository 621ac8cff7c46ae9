"""The reference math in pure PyTorch: the CPU fallback, the docs' definition and the tests' oracle.

Memory-lean: no out x in temporary at any point. Work is chunked over tokens so that a
temporary holds at most about ``CHUNK_ELEMENTS`` values (at least one token's worth, i.e. nnz).
Accumulation is in fp32, or fp64 when an operand is fp64; every op here is deterministic (the
same inputs give the same bits), on the CPU and on CUDA.
"""

from __future__ import annotations

from typing import Optional

import torch

# A temporary holds at most 2**22 values (16 MiB in fp32) and at most 1/16 of the weight's
# entries, so the reference never approaches an out x in allocation; one token's nnz values is
# the floor.
CHUNK_ELEMENTS = 1 << 22
WEIGHT_FRACTION = 16


def accumulate_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def token_chunk(num_tokens: int, nnz: int, weight_numel: int, temporaries: int = 1) -> int:
    """Tokens per chunk so that ``temporaries`` buffers of [chunk, nnz] stay within the budget."""
    budget = max(nnz, min(CHUNK_ELEMENTS, weight_numel // WEIGHT_FRACTION) // temporaries)
    return max(1, min(num_tokens, budget // max(nnz, 1)))


def gather_scale_add(
    base: torch.Tensor,
    src: torch.Tensor,
    values: torch.Tensor,
    gather_cols: torch.Tensor,
    scatter_cols: torch.Tensor,
) -> torch.Tensor:
    """``out[t, scatter_cols[k]] = base[t, ...] + Σ_k values[k] * src[t, gather_cols[k]]``.

    With gather = col, scatter = row it is ``base + x Δᵀ``; with gather = row, scatter = col it is
    ``base + dy Δ``. The sum is formed in the accumulate dtype and rounded once to base's dtype.
    Bitwise repeatable on every device: on the CPU ``index_add_`` adds in index order; on CUDA it
    adds with atomics (roundings differ run to run), so there the sums go through
    ``index_put_(accumulate=True)``, which sorts the indices and adds each column's entries in
    order (deterministic by torch's documentation), on [features, tokens] layouts so that only
    the nnz indices are sorted.
    """
    acc = accumulate_dtype(base, src, values)
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    scaled_values = values.to(acc)
    step = token_chunk(src.shape[0], values.numel(), base.shape[1] * src.shape[1])
    for start in range(0, src.shape[0], step):
        stop = start + step
        if base.device.type == "cpu":
            partial = base[start:stop].to(acc, copy=True)
            contributions = src[start:stop].index_select(1, gather_cols).to(acc).mul_(scaled_values)
            partial.index_add_(1, scatter_cols, contributions)
            out[start:stop] = partial
        else:
            partial = base[start:stop].t().to(acc).contiguous()
            contributions = src[start:stop].t().index_select(0, gather_cols).to(acc).mul_(scaled_values[:, None])
            partial.index_put_((scatter_cols,), contributions, accumulate=True)
            out[start:stop] = partial.t()
    return out


def sddmm(x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``grad[k] = Σ_t dy[t, rows[k]] * x[t, cols[k]]`` in the accumulate dtype (never dyᵀx)."""
    acc = accumulate_dtype(x, dy)
    grad = torch.zeros(rows.numel(), dtype=acc, device=x.device)
    step = token_chunk(x.shape[0], rows.numel(), x.shape[1] * dy.shape[1], temporaries=2)
    for start in range(0, x.shape[0], step):
        stop = start + step
        products = dy[start:stop].index_select(1, rows).to(acc)
        products.mul_(x[start:stop].index_select(1, cols).to(acc))
        grad += products.sum(dim=0)
    return grad


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    flat_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ = scatter(delta, flat_index)``, computed as
    ``x W0ᵀ + b + x Δᵀ`` in ``x``'s dtype with the sparse part accumulated in fp32/fp64."""
    out_features, in_features = weight.shape
    rows = torch.div(flat_index, in_features, rounding_mode="floor")
    cols = flat_index - rows * in_features
    x2d = x.reshape(-1, in_features)
    base = torch.nn.functional.linear(x2d, weight, bias)
    return gather_scale_add(base, x2d, delta, cols, rows).reshape(*x.shape[:-1], out_features)


# --- SPruFT row delta ------------------------------------------------------------------------


def mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` for ``a`` [M, K], ``b`` [K, N], accumulated and returned in ``acc``; chunked over M
    so that the upcast copy of ``a`` stays within the budget."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=acc, device=a.device)
    wide_b = b.to(acc)
    step = max(1, CHUNK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, a.shape[0], step):
        torch.mm(a[start : start + step].to(acc), wide_b, out=out[start : start + step])
    return out


def mm_tn_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``aᵀ @ b`` for ``a`` [T, M], ``b`` [T, N], summed over the T tokens in ``acc``, chunked over T."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=acc, device=a.device)
    step = max(1, CHUNK_ELEMENTS // max(a.shape[1] + b.shape[1], 1))
    for start in range(0, a.shape[0], step):
        stop = start + step
        out.addmm_(a[start:stop].to(acc).t(), b[start:stop].to(acc))
    return out


def row_scatter_add_(y: torch.Tensor, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place ``y[..., rows[r]] += z[..., r]``: the sum in fp32 (fp64 if an operand is fp64),
    rounded once to y's dtype. ``rows`` must be unique (a repeated row keeps one of its sums)."""
    wide_rows = rows.long()
    values = y.index_select(-1, wide_rows).to(accumulate_dtype(y, z))
    values = values + z.to(values.dtype)
    y.index_copy_(y.dim() - 1, wide_rows, values.to(y.dtype))
    return y


def row_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta_rows: torch.Tensor,
    rows: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SPruFT: ``y = x W0ᵀ + b``, then ``y[..., rows] += x Wfᵀ`` with ``Wf = delta_rows`` [R, in].
    ``x Wfᵀ`` is accumulated in fp32/fp64 and added into y with one rounding."""
    out_features, in_features = weight.shape
    x2d = x.reshape(-1, in_features)
    y = torch.nn.functional.linear(x2d, weight, bias)
    z = mm_acc(x2d, delta_rows.t(), accumulate_dtype(x, delta_rows))
    return row_scatter_add_(y, z, rows).reshape(*x.shape[:-1], out_features)


def write_rows_(
    weight: torch.Tensor,
    rows: torch.Tensor,
    base: Optional[torch.Tensor] = None,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place ``weight[rows] = (base or weight[rows]) + delta`` for a [out, in] weight and [R, in]
    ``base`` (weight's dtype) / ``delta``: the sum in fp32 (fp64 if an operand is fp64), rounded
    once. SPruFT's merge, unmerge and re-sync; O(R * in) on any device and any weight layout."""
    if base is None and delta is None:
        return weight
    wide_rows = rows.long()
    values = base if base is not None else weight.index_select(0, wide_rows)
    if delta is not None:
        acc = accumulate_dtype(weight, delta)
        values = values.to(acc) + delta.to(acc)
    weight.index_copy_(0, wide_rows, values.to(weight.dtype))
    return weight
