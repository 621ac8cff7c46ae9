"""PST's reference backend (pure PyTorch, any device, fp32 or fp64): the math of
``pst_linear.py`` computed by row blocks of the weight, so that no n x k temporary exists in a
training step (only the export, ``pst_dense``, returns n x k tensors, by nature).

Before, the reference built W_eff, S, the keys, the positions, M, the masked weight and G whole
(about 20 n x k temporaries per layer, 1.3 GiB transient at Llama-2-7B) and sorted all n*k keys.
Now every function walks the same row blocks (:func:`row_blocks`: at most
``naive.CHUNK_ELEMENTS`` entries and 1/``naive.WEIGHT_FRACTION`` of the weight per block), so a
block's score is computed the same way, bit for bit, by the threshold, the forward, the backward
and the export; the temporaries are a few blocks, plus one n x k: the forward's masked weight,
so that the forward is one GEMM (exactly the plain linear's at sparsity 0). The GEMMs are dense GEMMs per block (their
number grows with n / rows-per-block, never with tokens).

The threshold is a radix select over the int64 order keys, 11 bits per pass (3 passes for fp32
scores, 6 for fp64), then a pass that finds the tie cut in position order: each pass recomputes
the block scores (two rank-r GEMMs per block), counts with ``bincount`` and keeps every
intermediate on the device (no host sync, no sort, no n*k buffer).
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


def row_blocks(n: int, k: int):
    """``(start, stop)`` row ranges covering [0, n) with at most the budget of entries each."""
    budget = max(k, min(naive.CHUNK_ELEMENTS, (n * k) // naive.WEIGHT_FRACTION))
    rows = max(1, budget // max(k, 1))
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

    def __init__(self, weight, U, V, A, B, R, C, beta, alpha1, alpha2):
        self.args = (weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        self.acc = naive.accumulate_dtype(weight, U, V, A, B, R, C)
        self.n, self.k = weight.shape
        self.device = weight.device

    def __iter__(self):
        for start, stop in row_blocks(self.n, self.k):
            yield (start, stop, *block_weight_and_score(*self.args, start, stop, self.acc))

    def masks(self, threshold):
        """Yields (start, stop, W_eff, S, M) per block."""
        for start, stop, effective, score in self:
            positions = _positions(start, stop, self.k, self.device)
            yield start, stop, effective, score, keep_mask(order_keys(score), positions, threshold)


def threshold(weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep: int) -> Tensor:
    """int64 [2] ``(t, p)``: ``key > t or (key == t and position < p)`` keeps exactly ``keep``
    (0 < keep < n*k) entries; the same pair a stable descending sort of the keys gives."""
    blocks = _Blocks(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
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


def _masked(effective, mask, dtype, acc):
    # The weight the GEMM sees, as in the fused kernel: W_eff ⊙ M rounded to x's dtype.
    return torch.where(mask, effective, 0.0).to(dtype).to(acc)


def forward(x2d, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2):
    """``y = x (W_eff ⊙ M)ᵀ + b``: the masked weight is assembled block by block, in x's dtype,
    into the one n x k temporary of the step (the size of W0 itself for a bf16 model), then one
    GEMM as F.linear runs it, so that at sparsity 0 the layer computes exactly what the plain
    linear did (a GEMM split by rows rounds differently, so the row blocks stop here)."""
    blocks = _Blocks(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    masked = torch.empty(weight.shape, dtype=x2d.dtype, device=weight.device)
    for start, stop, effective, _, mask in blocks.masks(threshold):
        masked[start:stop] = torch.where(mask, effective, 0.0)
    return F.linear(x2d, masked, bias)


def effective_weight_grad(g, mask, effective, abs_score_grad):
    """dL/dW_eff = G ⊙ M, plus dS ⊙ sign(W_eff) = G ⊙ |W_eff| through the score's |W_eff| term."""
    return g * (mask + effective.abs()) if abs_score_grad else g * mask


def backward(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params):
    """(dx or None, (dU, dV, dA, dB, dR, dC) or None) in the accumulate dtype; G = dyᵀx is
    formed one row block at a time and folded into the factor gradients."""
    blocks = _Blocks(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    acc = naive.accumulate_dtype(dy2d, x2d, weight, U, V, A, B, R, C)
    wide_dy, wide_x = dy2d.to(acc), x2d.to(acc)
    dx = torch.zeros(x2d.shape, dtype=acc, device=x2d.device) if needs_dx else None
    if needs_params:
        U, V, A, B = (t.to(acc) for t in (U, V, A, B))
        dU, dA = torch.empty(U.shape, dtype=acc, device=U.device), torch.empty(A.shape, dtype=acc, device=A.device)
        dV, dB = torch.zeros(V.shape, dtype=acc, device=V.device), torch.zeros(B.shape, dtype=acc, device=B.device)
        dR = torch.empty(R.shape, dtype=acc, device=R.device)
        dC = torch.zeros(C.shape, dtype=acc, device=C.device)
    for start, stop, effective, _, mask in blocks.masks(threshold):
        dy_block = wide_dy[:, start:stop]
        if needs_dx:
            dx.addmm_(dy_block, _masked(effective, mask, x2d.dtype, acc))
        if not needs_params:
            continue
        g = dy_block.t() @ wide_x
        d_effective = effective_weight_grad(g, mask, effective, abs_score_grad)
        d_score = g.mul_(effective)
        dU[start:stop] = beta * d_effective @ V.t()
        dV.addmm_(U[start:stop].t(), d_effective, alpha=beta)
        dA[start:stop] = alpha1 * d_score @ B.t()
        dB.addmm_(A[start:stop].t(), d_score, alpha=alpha1)
        dR[start:stop] = alpha2 * d_score.sum(1, keepdim=True)
        dC += alpha2 * d_score.sum(0, keepdim=True)
    dx = None if dx is None else dx.to(x2d.dtype)
    return dx, ((dU, dV, dA, dB, dR, dC) if needs_params else None)
