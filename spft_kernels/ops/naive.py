"""The reference math in pure PyTorch: the CPU fallback, the docs' definition and the tests' oracle.

Fast by construction (``docs/architecture.md``): every product with the sparse delta is a dense GEMM over one
block of Δ's rows at a time (``dy[:, block]ᵀ x`` for the delta gradient, ``x Δ_blockᵀ`` and
``dy[:, block] Δ_block`` for the SpMMs), with O(nnz) gathers and scatters around it; only at very
low density and few tokens, where the cost model below says so, the entries are gathered and
multiplied directly ("gather"), in one pass. The number of launched ops never depends on the
number of tokens.

Memory-lean: no out x in temporary. A temporary holds at most one block, ``temporary_budget``
values (1/16 of the weight for the SpMMs, 1/8 for the delta gradient, at most ``CHUNK_ELEMENTS``);
the delta gradient may instead copy the columns of ``x`` one block needs (at most 1/8 of the
weight). Half-precision inputs on the CPU
are upcast once to fp32 (a copy of the activation). Accumulation is in fp32, or fp64 when an
operand is fp64; every op here is deterministic (the same inputs give the same bits), on the CPU
and on CUDA (no atomics; cuBLAS: see the README's Backends section).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

# A temporary holds at most 2**22 values (16 MiB in fp32) and at most 1/16 of the weight's
# entries, so the reference never approaches an out x in allocation.
CHUNK_ELEMENTS = 1 << 22
WEIGHT_FRACTION = 16
# The delta gradient's blocks are twice as tall (1/8 of the weight: the bound on a temporary
# that issue 14 set): each block's GEMM re-reads (MKL: repacks) all of x, so fewer blocks cost less. At
# 2048x2048, 1,024 tokens, 1% density, fp32, 2 threads (spft-bench, interleaved, median of 25):
# 16 blocks 1.65x the dense dyᵀx GEMM and 1.18x full fine-tuning of the layer, 8 blocks 1.15x and
# 1.03x; +1 MiB of peak memory (41.8 -> 42.9 MiB, LoRA r=16: 56.3).
DELTA_GRAD_WEIGHT_FRACTION = 8
HALF = (torch.float16, torch.bfloat16)


def accumulate_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def temporary_budget(out_features: int, in_features: int, fraction: int = WEIGHT_FRACTION) -> int:
    """The most values one temporary may hold for an [out, in] weight (at least 1): 1/fraction of
    it, at most ``CHUNK_ELEMENTS``."""
    return max(1, min(CHUNK_ELEMENTS, out_features * in_features // fraction))


def block_rows(out_features: int, in_features: int, fraction: int = WEIGHT_FRACTION) -> int:
    """Rows of Δ per block: one [rows, in] block of the dense product fits the budget."""
    return max(1, min(out_features, temporary_budget(out_features, in_features, fraction) // max(in_features, 1)))


# --- when to gather instead of a GEMM -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceCosts:
    """Seconds per unit of work, for the choice between the two paths (bench/TUNING.md derives
    them): a GEMM flop (half-precision operands, others), one (entry, token) product of the
    gather path, one launched op."""

    flop_half: float
    flop: float
    gather: float
    launch: float


DEVICE_COSTS = {
    # Measured on the 2-core CPU of the development machine (fp32, 2048x2048, one thread): a
    # GEMM at ~30 GFLOP/s, the gather path at ~4 ns per (entry, token) while its temporaries
    # stay in cache (~12 ns beyond), ~10 us per launched op; its bf16 GEMM is pathologically slow.
    "cpu": DeviceCosts(flop_half=1 / 5e9, flop=1 / 35e9, gather=4e-9, launch=10e-6),
    # Derived for an H100/H200 from its datasheet, to be measured: ~650 TFLOP/s on bf16/fp16
    # tensor cores, ~50 TFLOP/s in fp32/fp64; the gather path moves ~96 bytes per (entry, token)
    # (two scattered 2-byte reads that cost a 32-byte sector each, upcasts, product, sum) at
    # ~3 TB/s; ~5 us of host time per launched op.
    "cuda": DeviceCosts(flop_half=1 / 650e12, flop=1 / 50e12, gather=32e-12, launch=5e-6),
}
GATHER_OPS = 6  # launched ops of the gather path
OPS_PER_BLOCK = 4  # launched ops per block of the row-block path (sync-free: GEMM, mask, gather, select)


def uses_gather(num_tokens: int, nnz: int, out_features: int, in_features: int, dtype: torch.dtype,
                device_type: str) -> bool:
    """Whether the gather path beats one dense GEMM by row blocks for this problem, from host
    values only (no device sync). It must fit one pass: its two [tokens, nnz] temporaries stay
    within the budget, so the number of ops never depends on the number of tokens."""
    if 2 * num_tokens * nnz > temporary_budget(out_features, in_features):
        return False
    costs = DEVICE_COSTS.get(device_type, DEVICE_COSTS["cpu"])
    flop = costs.flop_half if dtype in HALF else costs.flop
    blocks = -(-out_features // block_rows(out_features, in_features, DELTA_GRAD_WEIGHT_FRACTION))
    gemm = 2.0 * num_tokens * out_features * in_features * flop + blocks * OPS_PER_BLOCK * costs.launch
    return num_tokens * nnz * costs.gather + GATHER_OPS * costs.launch <= gemm


# --- GEMMs accumulated in fp32 / fp64 -----------------------------------------------------------


def gemm_dtype(t: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype ``t`` enters a GEMM in: its own half precision on CUDA (tensor cores, fp32
    accumulation and output), else the accumulate dtype (an upcast copy on the CPU)."""
    return t.dtype if t.is_cuda and t.dtype in HALF and acc == torch.float32 else acc


def mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``acc``: one GEMM, operands in :func:`gemm_dtype`
    (on CUDA an fp32 ``b`` is rounded to a half-precision ``a``'s dtype, as the tensor cores need)."""
    dtype = gemm_dtype(a, acc)
    a, b = a.to(dtype), b.to(dtype)
    if dtype == acc:
        return torch.mm(a, b, out=out)
    if out is None:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a, b, out_dtype=acc, out=out)


def addmm_acc_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """In place ``total += a @ b`` for ``total`` in the accumulate dtype: the GEMM accumulates
    into it when the operands share its dtype, else a :func:`mm_acc` result is added."""
    if a.dtype == b.dtype == total.dtype:
        return total.addmm_(a, b)
    return total.add_(mm_acc(a, b, total.dtype))


def mm_tn_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``aᵀ @ b`` for ``a`` [T, M], ``b`` [T, N], summed over the T tokens in ``acc``."""
    return mm_acc(a.t(), b, acc)


# --- row blocks of Δ -----------------------------------------------------------------------------


def split_flat(flat: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of flat positions ``row * in + col``."""
    rows = torch.div(flat, in_features, rounding_mode="floor")
    return rows, flat - rows * in_features


@dataclasses.dataclass
class _RowBlocks:
    """Blocks of ``rows`` rows of an [out, in] Δ and where their entries lie in the canonical
    (row-major sorted) index. ``bounds`` (host ints, entries ``bounds[b]:bounds[b+1]`` are block b's)
    when the index is in host memory, where reading it costs no device sync; otherwise
    ``block_of`` and ``local`` per entry, and each block selects its entries by mask (O(nnz) per
    block, no sync)."""

    rows: int
    out_features: int
    in_features: int
    flat: torch.Tensor
    bounds: Optional[list[int]] = None
    block_of: Optional[torch.Tensor] = None
    local: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, flat: torch.Tensor, out_features: int, in_features: int, sync_free: Optional[bool],
           fraction: int = WEIGHT_FRACTION) -> "_RowBlocks":
        rows = block_rows(out_features, in_features, fraction)
        blocks = cls(rows, out_features, in_features, flat)
        if sync_free is None:
            sync_free = flat.device.type != "cpu"
        if sync_free:
            blocks.block_of = torch.div(flat, rows * in_features, rounding_mode="floor")
            blocks.local = flat - blocks.block_of * (rows * in_features)
        else:
            firsts = torch.arange(0, out_features + rows, rows, dtype=torch.int64).clamp_(max=out_features)
            starts = torch.searchsorted(flat, (firsts * in_features).to(flat.dtype))
            blocks.bounds = starts.tolist()
        return blocks

    def __iter__(self):
        """(block number, first row, last row + 1) of every block."""
        for number, first in enumerate(range(0, self.out_features, self.rows)):
            yield number, first, min(first + self.rows, self.out_features)

    def empty(self, number: int) -> bool:
        return self.bounds is not None and self.bounds[number] == self.bounds[number + 1]

    def entries(self, number: int, first: int) -> tuple[slice, torch.Tensor]:
        """(the block's entries, their positions inside the block) on the host-bounds path."""
        entries = slice(self.bounds[number], self.bounds[number + 1])
        return entries, self.flat[entries] - first * self.in_features


def sddmm(x: torch.Tensor, dy: torch.Tensor, flat: torch.Tensor, *, gather: Optional[bool] = None,
          sync_free: Optional[bool] = None) -> torch.Tensor:
    """``grad[k] = Σ_t dy[t, row_k] * x[t, col_k]`` for 2-D ``x`` [T, in], ``dy`` [T, out] and a
    canonical (sorted) ``flat`` index, in the accumulate dtype; never the whole ``dyᵀx``.

    By row blocks: per block of Δ's rows one GEMM ``dy[:, block]ᵀ x`` (over only the block's
    columns when they are at most half of them), then a gather of the block's entries: one dense
    GEMM in total. ``gather`` (default: :func:`uses_gather`) takes the gather path instead;
    ``sync_free`` (default: off the CPU) selects each block's entries by mask."""
    num_tokens, in_features = x.shape
    out_features, nnz = dy.shape[1], flat.numel()
    acc = accumulate_dtype(x, dy)
    if nnz == 0 or num_tokens == 0:
        return torch.zeros(nnz, dtype=acc, device=x.device)
    if gather is None:
        gather = uses_gather(num_tokens, nnz, out_features, in_features, x.dtype, x.device.type)
    if gather:
        rows, cols = split_flat(flat, in_features)
        products = dy.index_select(1, rows).to(acc)
        return products.mul_(x.index_select(1, cols).to(acc)).sum(dim=0)
    blocks = _RowBlocks.of(flat, out_features, in_features, sync_free, DELTA_GRAD_WEIGHT_FRACTION)
    x = x.to(gemm_dtype(x, acc))
    product = torch.empty(blocks.rows, in_features, dtype=acc, device=x.device)
    grad = torch.empty(nnz, dtype=acc, device=x.device)
    for number, first, last in blocks:
        if blocks.empty(number):
            continue
        dy_block = dy[:, first:last].t()
        if blocks.bounds is None:
            mm_acc(dy_block, x, acc, out=product[: last - first])
            grad = torch.where(blocks.block_of == number, product.view(-1).index_select(0, blocks.local), grad)
            continue
        entries, local = blocks.entries(number, first)
        if entries.stop - entries.start <= in_features:  # only then can it touch at most half the columns
            block_rows_of, cols = split_flat(local, in_features)
            used_cols, position = torch.unique(cols, sorted=True, return_inverse=True)
            # Narrower by half at least, and x's columns at most one block's worth (1/8 of W).
            if 2 * used_cols.numel() <= in_features and num_tokens * used_cols.numel() <= product.numel():
                narrow = mm_acc(dy_block, x.index_select(1, used_cols), acc)
                torch.index_select(narrow.view(-1), 0, block_rows_of * used_cols.numel() + position, out=grad[entries])
                continue
        mm_acc(dy_block, x, acc, out=product[: last - first])
        torch.index_select(product.view(-1), 0, local, out=grad[entries])
    return grad


def _densify_block(dense: torch.Tensor, values: torch.Tensor, blocks: _RowBlocks, number: int, first: int) -> bool:
    """Write block ``number`` of Δ into ``dense`` ([rows * in + 1] flat, zeroed here; the last slot
    takes the masked-out entries of the sync-free path). False when the block has no entries."""
    if blocks.empty(number):
        return False
    dense.zero_()
    if blocks.bounds is not None:
        entries, local = blocks.entries(number, first)
        dense.index_put_((local,), values[entries])
    else:
        spare = blocks.rows * blocks.in_features
        dense.index_put_((torch.where(blocks.block_of == number, blocks.local, spare),), values)
    return True


def _spmm_row_blocks(base, src, delta, flat, out_features, in_features, transposed, sync_free):
    """``base + src Δᵀ`` (``src`` = x [T, in]) or, ``transposed``, ``base + src Δ`` (``src`` = dy
    [T, out]): per block of Δ's rows, Δ_block densified and one GEMM, summed in the accumulate
    dtype (blocks in a fixed order), rounded once to base's dtype."""
    acc = accumulate_dtype(base, src, delta)
    blocks = _RowBlocks.of(flat, out_features, in_features, sync_free)
    operand = gemm_dtype(src, acc)
    src = src.to(operand)
    dense = torch.empty(blocks.rows * in_features + 1, dtype=operand, device=src.device)
    values = delta.to(operand)
    total = base.to(acc, memory_format=torch.contiguous_format, copy=True)
    for number, first, last in blocks:
        if not _densify_block(dense, values, blocks, number, first):
            continue
        block = dense[: (last - first) * in_features].view(last - first, in_features)
        if transposed:
            addmm_acc_(total, src[:, first:last], block)
        else:
            addmm_acc_(total[:, first:last], src, block.t())
    return total.to(base.dtype)


def _spmm(base, src, delta, flat, out_features, in_features, transposed, gather, sync_free):
    num_tokens = src.shape[0]
    if gather is None:
        gather = uses_gather(num_tokens, flat.numel(), out_features, in_features, src.dtype, src.device.type)
    if flat.numel() == 0 or num_tokens == 0:
        return base.to(memory_format=torch.contiguous_format, copy=True)
    if gather:
        rows, cols = split_flat(flat, in_features)
        return gather_scale_add(base, src, delta, rows, cols) if transposed else gather_scale_add(
            base, src, delta, cols, rows)
    return _spmm_row_blocks(base, src, delta, flat, out_features, in_features, transposed, sync_free)


def spmm_add(base: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, flat: torch.Tensor, *,
             gather: Optional[bool] = None, sync_free: Optional[bool] = None) -> torch.Tensor:
    """``base + x Δᵀ`` for ``base`` [T, out], ``x`` [T, in] and a canonical ``flat`` index: by row
    blocks of Δ (or the gather path, as in :func:`sddmm`), one rounding to base's dtype."""
    return _spmm(base, x, delta, flat, base.shape[1], x.shape[1], False, gather, sync_free)


def spmm_t_add(base: torch.Tensor, dy: torch.Tensor, delta: torch.Tensor, flat: torch.Tensor, *,
               gather: Optional[bool] = None, sync_free: Optional[bool] = None) -> torch.Tensor:
    """``base + dy Δ`` for ``base`` [T, in], ``dy`` [T, out], as :func:`spmm_add`."""
    return _spmm(base, dy, delta, flat, dy.shape[1], base.shape[1], True, gather, sync_free)


def gather_scale_add(
    base: torch.Tensor,
    src: torch.Tensor,
    values: torch.Tensor,
    gather_cols: torch.Tensor,
    scatter_cols: torch.Tensor,
) -> torch.Tensor:
    """``out[t, scatter_cols[k]] = base[t, ...] + Σ_k values[k] * src[t, gather_cols[k]]`` in one
    pass (the gather path; the caller keeps [T, nnz] within the budget).

    With gather = col, scatter = row it is ``base + x Δᵀ``; with gather = row, scatter = col it is
    ``base + dy Δ``. The sum is formed in the accumulate dtype and rounded once to base's dtype.
    Bitwise repeatable on every device: on the CPU ``index_add_`` adds in index order; on CUDA it
    adds with atomics (roundings differ run to run), so there the sums go through
    ``index_put_(accumulate=True)``, which sorts the indices and adds each column's entries in
    order (deterministic by torch's documentation), on [features, tokens] layouts so that only
    the nnz indices are sorted.
    """
    acc = accumulate_dtype(base, src, values)
    if base.device.type == "cpu":
        total = base.to(acc, memory_format=torch.contiguous_format, copy=True)
        contributions = src.index_select(1, gather_cols).to(acc).mul_(values.to(acc))
        return total.index_add_(1, scatter_cols, contributions).to(base.dtype)
    total = base.t().to(acc).contiguous()
    contributions = src.t().index_select(0, gather_cols).to(acc).mul_(values.to(acc)[:, None])
    total.index_put_((scatter_cols,), contributions, accumulate=True)
    return total.t().to(base.dtype, memory_format=torch.contiguous_format)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    flat_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ = scatter(delta, flat_index)`` (canonical index), computed
    as ``x W0ᵀ + b + x Δᵀ`` in ``x``'s dtype with the sparse part accumulated in fp32/fp64."""
    out_features, in_features = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), in_features)
    base = torch.nn.functional.linear(x2d, weight, bias)
    return spmm_add(base, x2d, delta, flat_index).reshape(*x.shape[:-1], out_features)


# --- SPruFT row delta ------------------------------------------------------------------------


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
