"""PST's reference backend (pure PyTorch, any device, fp32 or fp64): the math of
``pst_linear.py`` as a handful of whole-tensor ops per step.

A training step (forward + backward) is ~40 launched ops per chunk of ``CHUNK_ENTRIES``
entries: the scores, the mask and the masked weight each a few elementwise
ops over the whole weight, the GEMMs ``x (W_eff ⊙ M)ᵀ``, ``dy (W_eff ⊙ M)``, ``G = dyᵀx`` and
the six factor gradients. Before, every function walked row blocks of 1/16 of the weight and
ran ~58 ops per block (921 ops a step at 2048x2048, 25.7x LoRA's time at 64x64).

The memory bound that motivated the blocks (about 20 n x k temporaries, 1.3 GiB transient at
Llama-2-7B, when everything was built whole) is kept by a fixed size instead of a fraction:
a call works on row chunks of at most ``CHUNK_ENTRIES`` = 2^22 entries (a 2048x2048 weight in
one chunk; 4096x4096 in 4, 11008x4096 in 11), with the temporaries reused in place: the step's
transient peak is under 30 bytes an entry of a chunk (W_eff, |W_eff|, the keys written over S,
the positions, G, dW_eff, the masks: measured 22-28), ≤ 0.12 GiB whatever the weight's size
(test_pst_reference.py checks the bound). Only W0's own dtype copy of the masked weight spans the whole weight in the
forward (the one n x k temporary before too), so that the forward is one GEMM exactly as
``F.linear`` runs it (at sparsity 0 the layer computes exactly what the plain linear did).
The ops grow with ``ceil(n·k / CHUNK_ENTRIES)``, never with the tokens.

The threshold is a radix select over the int64 order keys, 11 bits per pass (3 passes for fp32
scores, 6 for fp64), then a pass that finds the tie cut in position order: each pass recomputes
the chunk scores (two rank-r GEMMs per chunk), counts with ``scatter_add`` and keeps every
intermediate on the device (no host sync, no sort, no n*k buffer). It runs once per optimizer
step (``PSTLinear.threshold`` caches it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import naive

Tensor = torch.Tensor

# Bits per radix pass: 11 makes a 2,048-bin histogram (16 KiB, smaller than any block worth
# splitting) and 3 passes over fp32 keys (6 over fp64); 16 bits would save one pass at 512 KiB
# of histogram plus its cumulative sums, more than a small layer's whole weight.
_DIGIT_BITS = 11


# Entries of one chunk of the forward and backward (see the module docstring): 2^22 = 4.2M, a
# 2048x2048 weight; their peak is under 30 bytes an entry of a chunk (0.12 GiB at the cap). At
# 2^24 (4096x4096 in one chunk, 4x fewer ops there) the 7B estimate's peak rose by 0.27 GiB
# (17.10 -> 17.37 GiB, spft-bench --memory --rank 64): the memory target decided.
CHUNK_ENTRIES = 1 << 22
# The threshold's chunks: its radix passes hold int64 keys, digits and counts (~58 bytes an
# entry, measured): 2^22 entries (0.23 GiB); it runs once per optimizer step.
THRESHOLD_CHUNK_ENTRIES = 1 << 22


def row_blocks(n: int, k: int, entries: int = None):
    """``(start, stop)`` row ranges covering [0, n) with at most ``entries`` (default
    ``CHUNK_ENTRIES``) entries each (at least one row)."""
    rows = max(1, (CHUNK_ENTRIES if entries is None else entries) // max(k, 1))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def block_weight_and_score(weight, U, V, A, B, R, C, beta, alpha1, alpha2, start, stop, acc):
    """(W_eff, S) for rows [start, stop), [rows, k] in ``acc``."""
    effective = torch.addmm(weight[start:stop].to(acc), U[start:stop].to(acc), V.to(acc), alpha=beta)
    score = torch.addmm(effective.abs(), A[start:stop].to(acc), B.to(acc), alpha=alpha1)
    score += alpha2 * (R[start:stop].to(acc) + C.to(acc))
    return effective, score


def order_keys(scores: Tensor) -> Tensor:
    """int64 keys that order like the fp32/fp64 ``scores`` (their bit patterns with the magnitude
    bits of negatives flipped); ``-0.0`` gets the key of ``+0.0``."""
    if scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"order_keys: scores must be fp32 or fp64, got {scores.dtype}")
    int_dtype, sign = (torch.int64, 63) if scores.dtype == torch.float64 else (torch.int32, 31)
    bits = scores.contiguous().view(int_dtype)
    bits = bits.masked_fill(bits == torch.iinfo(int_dtype).min, 0)
    return (bits ^ ((bits >> sign) & torch.iinfo(int_dtype).max)).to(torch.int64)


def _positions(start: int, stop: int, k: int, device) -> Tensor:
    return torch.arange(start * k, stop * k, device=device).view(stop - start, k)


def keep_mask(keys: Tensor, positions: Tensor, threshold: Tensor) -> Tensor:
    t_key, p_cut = threshold[0], threshold[1]
    return (keys > t_key) | ((keys == t_key) & (positions < p_cut))


class _Blocks:
    """The factors of one call and their row blocks; yields (start, stop, W_eff, S)."""

    def __init__(self, weight, U, V, A, B, R, C, beta, alpha1, alpha2, entries=None):
        self.args = (weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        self.entries = entries
        self.acc = naive.accumulate_dtype(weight, U, V, A, B, R, C)
        self.n, self.k = weight.shape
        self.device = weight.device

    def __iter__(self):
        for start, stop in row_blocks(self.n, self.k, self.entries):
            yield (start, stop, *block_weight_and_score(*self.args, start, stop, self.acc))

    def masks(self, threshold):
        """Yields (start, stop, W_eff, S, M) per block."""
        for start, stop, effective, score in self:
            positions = _positions(start, stop, self.k, self.device)
            yield start, stop, effective, score, keep_mask(order_keys(score), positions, threshold)


def threshold(weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep: int) -> Tensor:
    """int64 [2] ``(t, p)``: ``key > t or (key == t and position < p)`` keeps exactly ``keep``
    (0 < keep < n*k) entries; the same pair a stable descending sort of the keys gives."""
    blocks = _Blocks(weight, U, V, A, B, R, C, beta, alpha1, alpha2, THRESHOLD_CHUNK_ENTRIES)
    device = blocks.device
    bits = 64 if blocks.acc == torch.float64 else 32
    prefix = None  # the key's bits above the current digit, chosen so far (a device scalar)
    remaining = torch.tensor(keep, dtype=torch.int64, device=device)  # entries still to keep at or below it
    high = bits
    while high > 0:
        shift = max(0, high - _DIGIT_BITS)
        width = high - shift
        counts = torch.zeros(1 << width, dtype=torch.int64, device=device)
        for _, _, _, score in blocks:
            keys = order_keys(score).view(-1)
            if prefix is None:
                # The top digit is signed (arithmetic shift): offset it so that 0 is the smallest.
                counts.scatter_add_(0, (keys >> shift) + (1 << (width - 1)), torch.ones_like(keys))
            else:
                # Count only the keys under the chosen prefix (no boolean indexing: no host sync).
                matching = ((keys >> high) == prefix).long()
                counts.scatter_add_(0, (keys >> shift) & ((1 << width) - 1), matching)
        at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries whose digit is >= d
        chosen = (at_or_above >= remaining).sum() - 1  # the largest digit that still reaches `remaining`
        # index_select, not [chosen]: indexing by a 0-d tensor reads it on the host (a sync).
        above = (at_or_above - counts).index_select(0, chosen.reshape(1))[0]
        remaining = remaining - above
        prefix = chosen - (1 << (width - 1)) if prefix is None else (prefix << width) | chosen
        high = shift
    t_key = prefix
    # The tie cut: the `remaining`-th entry (in position order) whose key equals t.
    seen = torch.zeros((), dtype=torch.int64, device=device)
    cut = torch.zeros((), dtype=torch.int64, device=device)
    for start, stop, _, score in blocks:
        equal = order_keys(score).view(-1) == t_key
        rank = equal.cumsum(0) + seen
        hit = equal & (rank == remaining)
        positions = torch.arange(start * blocks.k, stop * blocks.k, device=device)
        cut = torch.maximum(cut, torch.where(hit, positions + 1, 0).max())
        seen = rank[-1] if rank.numel() else seen
    return torch.stack([t_key, cut])


def dense(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2):
    """(W_eff, M): n x k outputs (for export and a trainable W0), built block by block."""
    blocks = _Blocks(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    effective = torch.empty(weight.shape, dtype=blocks.acc, device=blocks.device)
    mask = torch.empty(weight.shape, dtype=torch.bool, device=blocks.device)
    for start, stop, block_effective, _, block_mask in blocks.masks(threshold):
        effective[start:stop] = block_effective
        mask[start:stop] = block_mask
    return effective, mask


def _chunk(weight, U, V, A, B, R, C, beta, alpha1, alpha2, threshold, start, stop, acc):
    """(W_eff, |W_eff|, M) of rows [start, stop) in 12 ops: the same scores as
    :func:`block_weight_and_score` (bit for bit) and the same mask as :func:`keep_mask` on
    :func:`order_keys`. Two steps of those are dropped because they cannot change the result
    here: S is never -0.0 (|W_eff| >= +0, and a sum is -0.0 only when both terms are), so the
    keys need no -0.0 fix; fp32 keys are compared as int32."""
    rows = _rows(start, stop, weight.shape[0])
    effective = torch.addmm(_as(_part(weight, rows), acc), _as(_part(U, rows), acc), _as(V, acc), alpha=beta)
    magnitude = effective.abs()
    score = torch.addmm(magnitude, _as(_part(A, rows), acc), _as(B, acc), alpha=alpha1)
    score += (alpha2 * (_as(_part(R, rows), acc) + _as(C, acc)) if alpha2 != 1.0
              else _as(_part(R, rows), acc) + _as(C, acc))  # (no name: the sum is freed at once)
    if acc == torch.float32 and stop * score.shape[1] < 2**31:
        # key > t or (key == t and position < p)  <=>  key + (position < p) > t, in 3 ops instead
        # of 5 (int32 cannot overflow here: only a NaN with an all-ones payload has the key 2^31-1).
        # The sentinels of "keep all" / "keep none" are int32's extremes for fp32 scores
        # (pst_linear._pst_threshold_op), so t compares as int32 without a clamp.
        bits = score.view(torch.int32)
        keys = bits.bitwise_xor_((bits >> 31) & torch.iinfo(torch.int32).max)  # in place: S is not needed after
        positions = torch.arange(start * score.shape[1], stop * score.shape[1], dtype=torch.int32,
                                 device=score.device).view(score.shape)
        mask = keys.add_(positions < threshold[1]) > threshold[0]
    else:
        keys = order_keys(score)
        mask = keep_mask(keys, _positions(start, stop, score.shape[1], score.device), threshold)
    return effective, magnitude, mask


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A cast to the same dtype returns t itself, but the call costs ~1 µs, and a step of a small
    # layer made 28 of them (a tenth of its host time at 64x64).
    return t if t.dtype == dtype else t.to(dtype)


def _rows(start: int, stop: int, n: int):
    """The chunk's rows as a slice, or None for all of them (one chunk: every layer up to
    2048x2048), read by :func:`_part` without a slice op."""
    return None if start == 0 and stop == n else slice(start, stop)


def _part(t: Tensor, rows) -> Tensor:
    return t if rows is None else t[rows]


def _chunks(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, acc):
    n, k = weight.shape
    for start, stop in row_blocks(n, k):
        yield (start, stop, *_chunk(weight, U, V, A, B, R, C, beta, alpha1, alpha2, threshold, start, stop, acc))


def forward(x2d, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2):
    """``y = x (W_eff ⊙ M)ᵀ + b``: the masked weight in x's dtype (the one n x k temporary of the
    step, W0's size for a bf16 model), assembled chunk by chunk, then one GEMM as F.linear runs
    it, so that at sparsity 0 the layer computes exactly what the plain linear did."""
    acc = naive.accumulate_dtype(weight, U, V, A, B, R, C)
    chunks = list(row_blocks(*weight.shape))
    if len(chunks) == 1:
        _, _, effective, _, mask = next(_chunks(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, acc))
        masked = _as(torch.where(mask, effective, 0.0), x2d.dtype)
    else:
        masked = torch.empty(weight.shape, dtype=x2d.dtype, device=weight.device)
        for start, stop, effective, _, mask in _chunks(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, acc):
            masked[start:stop] = torch.where(mask, effective, 0.0)
            del effective, mask  # before the next chunk's buffers are made
    return F.linear(x2d, masked, bias)


def effective_weight_grad(g, mask, effective, abs_score_grad):
    """dL/dW_eff = G ⊙ M, plus dS ⊙ sign(W_eff) = G ⊙ |W_eff| through the score's |W_eff| term."""
    return g * (mask + effective.abs()) if abs_score_grad else g * mask


def backward(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params):
    """(dx or None, (dU, dV, dA, dB, dR, dC) or None) in the accumulate dtype: per chunk (one
    chunk up to ``CHUNK_ENTRIES``) G = dyᵀx is formed once and folded into the factor gradients."""
    acc = naive.accumulate_dtype(dy2d, x2d, weight, U, V, A, B, R, C)
    wide_dy, wide_x = _as(dy2d, acc), _as(x2d, acc)
    dx = None
    chunks = list(row_blocks(*weight.shape))
    grads = [] if needs_params else None
    U, V, A, B = (_as(t, acc) for t in (U, V, A, B))
    for start, stop, effective, magnitude, mask in _chunks(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, acc):
        rows = _rows(start, stop, weight.shape[0])
        dy_block = wide_dy if rows is None else wide_dy[:, rows]
        if needs_dx:
            # W_eff ⊙ M rounded to x's dtype, as the forward's GEMM saw it.
            masked = torch.where(mask, effective, 0.0)
            if x2d.dtype != acc:
                masked = masked.to(x2d.dtype).to(acc)
            dx = torch.mm(dy_block, masked) if dx is None else dx.addmm_(dy_block, masked)
            del masked
        if not needs_params:
            del effective, magnitude, mask
            continue
        g = torch.mm(dy_block.t(), wide_x)
        d_effective = g * (magnitude + mask) if abs_score_grad else g * mask
        d_score = g.mul_(effective)
        del effective, magnitude, mask
        grads.append((
            _scaled(torch.mm(d_effective, V.t()), beta), _scaled(torch.mm(_part(U, rows).t(), d_effective), beta),
            _scaled(torch.mm(d_score, B.t()), alpha1), _scaled(torch.mm(_part(A, rows).t(), d_score), alpha1),
            _scaled(d_score.sum(1, keepdim=True), alpha2), _scaled(d_score.sum(0, keepdim=True), alpha2),
        ))
        del g, d_effective, d_score  # before the next chunk's buffers are made
    if dx is None and needs_dx:
        dx = torch.zeros(x2d.shape, dtype=acc, device=x2d.device)
    dx = None if dx is None else _as(dx, x2d.dtype)
    if not needs_params:
        return dx, None
    if len(chunks) == 1:
        return dx, grads[0]
    dU, dV, dA, dB, dR, dC = zip(*grads)
    return dx, (torch.cat(dU), sum(dV[1:], dV[0]), torch.cat(dA), sum(dB[1:], dB[0]), torch.cat(dR), sum(dC[1:], dC[0]))


def _scaled(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1.0 else t.mul_(factor)
