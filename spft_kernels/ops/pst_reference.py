"""PST's reference backend (pure PyTorch, any device, fp32 or fp64): the math of
``pst_linear.py`` in whole-tensor ops over row chunks of the weight.

A training step (forward + backward, fp32) launches 38 ops for a weight of one chunk (up to
``CHUNK_ENTRIES`` = 7.5 Mi entries: a square weight up to 2804x2804), else ``10 + 37 * chunks``
(:func:`step_ops_bound`; ``chunks`` = row chunks of at most 7.5 Mi entries: 121 at 4096x4096 (3),
232 at 11008x4096 (6)), never more with the tokens. Per chunk: ``W_eff`` (one GEMM), the score (one GEMM, two
broadcast adds, in place over ``|W_eff|``), the mask (keys made in place over the score, the tie
cut as one broadcast compare: no positions array), then in the backward ``dy (W_eff ⊙ M)``,
``G = dyᵀx``, ``G ⊙ (M + |W_eff|)`` and ``G ⊙ W_eff`` written over their inputs, and the
factor gradients' GEMMs and row/column sums, written into (or added to) the whole-weight results;
scalings and casts happen once a call.

Why chunks at all (the op count cannot be independent of the weight's size within the memory a
step may take): the backward's ``G = dyᵀx`` is an n x k fp32 tensor that every factor gradient
reads through an arbitrary mask, and each op holds its output whole, so an op-count bound for any
size means ``4 n·k`` bytes of G at least (``13 n·k`` with W_eff, its mask and the two masked
products: 0.55 GiB at 11008x4096), where a chunk bounds them by ~16 bytes an entry of a chunk (see
``CHUNK_ENTRIES`` for the choice). The forward keeps one n x k temporary, the masked weight in
x's dtype, so that the forward is one GEMM exactly as ``F.linear`` runs it (at sparsity 0 the
layer computes exactly what the plain linear did).

The threshold is a radix select over the order keys, 11 bits per pass (3 passes for fp32
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


# Entries of one chunk of the forward and backward (see the module docstring): a chunk's
# temporaries peak at 12 bytes an entry in the forward (fp32 W_eff, the score, its key shift) and
# 13 in the backward over several chunks (W_eff, the score, its key shift; then W_eff, |W_eff|, M
# and G). Bounded by the 7B estimate (spft-bench --memory --rank 64, bf16), whose peak must not
# pass what it was before chunks (17.10 GiB, 18,363,174,144 bytes): 2^23 gives 18,356,800,256
# (the forward of an 11008x4096 layer, its masked weight plus a chunk: 190 MiB, sets it), 2^22
# 18,349,868,296; 2^24 would add ~90 MiB more to that forward. And kept under 2^23 so that an
# fp32 chunk buffer stays under 32 MiB, glibc's largest heap block (above it every temporary is
# a fresh mmap and its pages fault in: at 4096x4096, 64 tokens, a step took 535-652 ms in 2
# chunks of 2^23 against 348-410 ms in 3 of 7.5 Mi on this CPU). 15 * 2^19 leaves a 2 MiB margin.
CHUNK_ENTRIES = 15 << 19
# The threshold's chunks: its passes hold the keys (made in place over W_eff), their int64 digits
# and a flag, or int32 ranks (13 bytes an entry at most: 52 MiB at 2^22, was 184 MiB); it runs
# once per optimizer step. 15 * 2^18 keeps the int64 digits under 32 MiB (see CHUNK_ENTRIES).
THRESHOLD_CHUNK_ENTRIES = 15 << 18

# Ops of a training step (forward + backward, fp32, every gradient asked), counted by
# python_tests/ops/test_launch_lean.py at several sizes: one chunk (no slices, no whole-weight
# results to assemble), or a fixed part and a part per chunk.
ONE_CHUNK_STEP_OPS = 38
STEP_OPS_FIXED = 10
STEP_OPS_PER_CHUNK = 37


def step_ops_bound(n: int, k: int) -> int:
    """The most ops a reference training step of an [n, k] weight launches (fp32)."""
    chunks = len(row_blocks(n, k))
    return ONE_CHUNK_STEP_OPS if chunks == 1 else STEP_OPS_FIXED + STEP_OPS_PER_CHUNK * chunks


def row_blocks(n: int, k: int, entries: int = None):
    """``(start, stop)`` row ranges covering [0, n) with at most ``entries`` (default
    ``CHUNK_ENTRIES``) entries each (at least one row)."""
    rows = max(1, (CHUNK_ENTRIES if entries is None else entries) // max(k, 1))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


class _Factors:
    """One call's factors in the accumulate dtype, α2·R and α2·C made once, and the chunks."""

    def __init__(self, weight, U, V, A, B, R, C, beta, alpha1, alpha2, *others):
        self.acc = acc = naive.accumulate_dtype(weight, U, V, A, B, R, C, *others)
        self.weight = weight
        self.U, self.V, self.A, self.B = (_as(t, acc) for t in (U, V, A, B))
        self.R, self.C = (_scaled_copy(_as(t, acc), alpha2) for t in (R, C))
        self.beta, self.alpha1 = beta, alpha1
        self.n, self.k = weight.shape
        self.device = weight.device

    def effective(self, rows) -> Tensor:
        """W_eff of the chunk's rows: one GEMM (W0 cast once if it is not in the acc dtype)."""
        return torch.addmm(_as(_part(self.weight, rows), self.acc), _part(self.U, rows), self.V, alpha=self.beta)

    def score_over(self, magnitude: Tensor, rows, keep_magnitude: bool = False) -> Tensor:
        """S = |W_eff| + α1·AB + α2·R + α2·C, written over ``magnitude`` (|W_eff|) unless
        ``keep_magnitude``: one GEMM and two broadcast adds, no other n x k temporary. The
        threshold, the step and the export all call this, so an entry's score is bitwise the same
        in each (addmm and addmm_ run the same GEMM on a copy or in place)."""
        A = _part(self.A, rows)
        score = (torch.addmm(magnitude, A, self.B, alpha=self.alpha1) if keep_magnitude
                 else magnitude.addmm_(A, self.B, alpha=self.alpha1))
        return score.add_(_part(self.R, rows)).add_(self.C)

    def weight_and_score(self, rows):
        effective = self.effective(rows)
        return effective, self.score_over(effective.abs(), rows)


def block_weight_and_score(weight, U, V, A, B, R, C, beta, alpha1, alpha2, start, stop, acc):
    """(W_eff, S) for rows [start, stop), [rows, k] in ``acc``."""
    factors = _Factors(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    assert factors.acc == acc, (factors.acc, acc)
    return factors.weight_and_score(slice(start, stop))


def order_keys(scores: Tensor) -> Tensor:
    """int64 keys that order like the fp32/fp64 ``scores`` (their bit patterns with the magnitude
    bits of negatives flipped); ``-0.0`` gets the key of ``+0.0``."""
    if scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"order_keys: scores must be fp32 or fp64, got {scores.dtype}")
    return _native_keys(scores.contiguous(), fix_negative_zero=True).to(torch.int64)


def _native_keys(scores: Tensor, fix_negative_zero: bool, in_place: bool = False) -> Tensor:
    """Keys in the scores' own integer width (int32 for fp32, int64 for fp64), written over the
    scores when ``in_place`` (3 ops, one temporary of the keys' size)."""
    int_dtype, sign = (torch.int64, 63) if scores.dtype == torch.float64 else (torch.int32, 31)
    bits = scores.view(int_dtype)
    if fix_negative_zero:
        bits = bits.masked_fill(bits == torch.iinfo(int_dtype).min, 0)
        in_place = True  # a new tensor already
    elif not in_place:
        bits = bits.clone()
    flip = (bits >> sign).bitwise_and_(torch.iinfo(int_dtype).max)
    return bits.bitwise_xor_(flip)


class _TieCut:
    """``position < p`` for a chunk's rows (a bool [rows, k]). Over several chunks: one broadcast
    compare of the column numbers with ``p - row·k`` per chunk, no positions array (3 ops once a
    call, 1 a chunk); for one chunk the flat positions (int32 below 2^31) compared with p (2 ops,
    a 4-byte-an-entry temporary freed before the mask is made)."""

    def __init__(self, threshold: Tensor, n: int, k: int, device, chunked: bool):
        self.cut, self.n, self.k, self.device = threshold[1], n, k, device
        if chunked:
            self.columns = torch.arange(k, device=device)
            self.bounds = self.cut - torch.arange(0, n * k, k, device=device).unsqueeze(1)

    def before(self, rows) -> Tensor:
        if rows is not None:
            return self.columns < self.bounds[rows]
        numel = self.n * self.k
        positions = torch.arange(numel, dtype=torch.int32 if numel < 2**31 else torch.int64, device=self.device)
        return positions.view(self.n, self.k) < self.cut


# The masked weight W_eff ⊙ M is W_eff times the bool mask: 6x faster than torch.where or
# masked_fill on this CPU (2.6 ms against 16-17 ms at 2048x2048, fp32: a random mask defeats
# their branches) and one op fewer than where with a zero tensor. The same values as
# where(M, W_eff, 0) except for a dropped negative W_eff (-0.0, which no sum can tell from +0.0)
# and a dropped non-finite W_eff (NaN; a score that drops an infinite |W_eff| is itself NaN: the
# factors have diverged).


def _keep(score: Tensor, threshold: Tensor, before_cut: Tensor) -> Tensor:
    """M = key > t or (key == t and position < p), as key + (position < p) > t (no overflow: only a
    NaN with an all-ones payload has the largest key). The keys are written over ``score``. S is
    never -0.0 (|W_eff| >= +0, and a sum is -0.0 only when both terms are), so the keys need no
    -0.0 fix. The sentinels of "keep all" / "keep none" are the extremes of the keys' dtype
    (pst_linear._pst_threshold_op), so t compares in that dtype."""
    keys = _native_keys(score, fix_negative_zero=False, in_place=True).add_(before_cut)
    return keys > threshold[0]


def threshold(weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep: int) -> Tensor:
    """int64 [2] ``(t, p)``: ``key > t or (key == t and position < p)`` keeps exactly ``keep``
    (0 < keep < n*k) entries; the same pair a stable descending sort of the keys gives."""
    factors = _Factors(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    n, k, device = factors.n, factors.k, factors.device
    blocks = [slice(start, stop) for start, stop in row_blocks(n, k, THRESHOLD_CHUNK_ENTRIES)]

    def chunk_keys():
        for rows in blocks:
            effective = factors.effective(rows)
            score = factors.score_over(effective.abs_(), rows)  # W_eff is not needed here
            yield rows, _native_keys(score, fix_negative_zero=False, in_place=True).view(-1)

    bits = 64 if factors.acc == torch.float64 else 32
    prefix = None  # the key's bits above the current digit, chosen so far (a device scalar)
    remaining = torch.tensor(keep, dtype=torch.int64, device=device)  # entries still to keep at or below it
    high = bits
    while high > 0:
        shift = max(0, high - _DIGIT_BITS)
        width = high - shift
        # One extra bin (the last) takes the keys outside the chosen prefix: every count is a
        # scatter of ones (one value broadcast, no n x k source).
        counts = torch.zeros((1 << width) + 1, dtype=torch.int64, device=device)
        one = torch.ones((), dtype=torch.int64, device=device)
        for _, keys in chunk_keys():
            # (int64 digits for scatter_add_, made from the keys in place: 13 bytes an entry at most)
            if prefix is None:
                # The top digit is signed (arithmetic shift): offset it so that 0 is the smallest.
                digits = keys.to(torch.int64).bitwise_right_shift_(shift).add_(1 << (width - 1))
            else:
                outside = (keys >> high) != prefix
                digits = keys.to(torch.int64).bitwise_right_shift_(shift).bitwise_and_((1 << width) - 1)
                digits.masked_fill_(outside, 1 << width)
                del outside
            counts.scatter_add_(0, digits, one.expand(digits.shape))
            del digits
        counts = counts[:-1]
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
    for rows, keys in chunk_keys():
        equal = keys == t_key
        # Ranks within the chunk in int32 (a chunk has fewer than 2^31 entries); the wanted one is
        # the target-th (0 = found before this chunk: no entry equal to t has rank 0).
        rank = equal.cumsum(0, dtype=torch.int32)
        target = (remaining - seen).clamp(0, 2**31 - 1)
        hit = (rank == target).logical_and_(equal)  # at most one entry of the whole weight
        del equal
        found = rows.start * k + hit.to(torch.uint8).argmax() + 1
        cut = torch.where(hit.any(), found, cut)
        seen = seen + rank[-1] if rank.numel() else seen
        del rank, hit
    return torch.stack([t_key, cut])


def dense(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2):
    """(W_eff, M): n x k outputs (for export and a trainable W0), built chunk by chunk."""
    factors = _Factors(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    cut = _TieCut(threshold, factors.n, factors.k, factors.device, chunked=True)
    effective = torch.empty(weight.shape, dtype=factors.acc, device=factors.device)
    mask = torch.empty(weight.shape, dtype=torch.bool, device=factors.device)
    for start, stop in row_blocks(factors.n, factors.k):
        rows = slice(start, stop)
        effective[rows], score = factors.weight_and_score(rows)
        mask[rows] = _keep(score, threshold, cut.before(rows))
    return effective, mask


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A cast to the same dtype returns t itself, but the call costs ~1 µs, and a step of a small
    # layer made 28 of them (a tenth of its host time at 64x64).
    return t if t.dtype == dtype else t.to(dtype)


def _part(t: Tensor, rows) -> Tensor:
    """The chunk's rows of t; ``rows`` None means all of them (one chunk: every layer up to
    ``CHUNK_ENTRIES``), read without a slice op."""
    return t if rows is None else t[rows]


def _chunk_rows(n: int, k: int):
    """The chunks as slices, or [None] for one chunk (no slice ops)."""
    blocks = row_blocks(n, k)
    return [None] if len(blocks) == 1 else [slice(start, stop) for start, stop in blocks]


def forward(x2d, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2):
    """``y = x (W_eff ⊙ M)ᵀ + b``: the masked weight in x's dtype (the one n x k temporary of the
    step, W0's size for a bf16 model), assembled chunk by chunk, then one GEMM as F.linear runs
    it, so that at sparsity 0 the layer computes exactly what the plain linear did."""
    factors = _Factors(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
    chunks = _chunk_rows(factors.n, factors.k)
    cut = _TieCut(threshold, factors.n, factors.k, factors.device, chunked=chunks != [None])
    masked = None if chunks == [None] else torch.empty(weight.shape, dtype=x2d.dtype, device=weight.device)
    for rows in chunks:
        effective = factors.effective(rows)
        keep = _keep(factors.score_over(effective.abs(), rows), threshold, cut.before(rows))
        if masked is None:  # W_eff is not needed after: masked in place (the note above _keep)
            masked = _as(effective.mul_(keep), x2d.dtype)
        else:  # written (and rounded to x's dtype) into the chunk's rows: one op
            torch.mul(effective, keep, out=masked[rows])
        del effective, keep  # before the next chunk's buffers are made
    return F.linear(x2d, masked, bias)


def forward_with_mask(x2d, weight, U, V, bias, mask, beta):
    """:func:`forward` with M given (one chunk: the mask a small layer keeps for the optimizer
    step, made by :func:`dense` from the same threshold; bool or 0/1 floats, which multiply
    bitwise alike): the same W_eff and masked weight, 3 ops."""
    acc = naive.accumulate_dtype(weight, U, V)
    effective = torch.addmm(_as(weight, acc), _as(U, acc), _as(V, acc), alpha=beta)
    return F.linear(x2d, _as(effective.mul_(mask), x2d.dtype), bias)


def effective_weight_grad(g, mask, effective, abs_score_grad):
    """dL/dW_eff = G ⊙ M, plus dS ⊙ sign(W_eff) = G ⊙ |W_eff| through the score's |W_eff| term."""
    return g * (mask + effective.abs()) if abs_score_grad else g * mask


def backward(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params,
             mask=None):
    """(dx or None, (dU, dV, dA, dB, dR, dC) or None) in the accumulate dtype: per chunk G = dyᵀx
    is formed once and folded into the factor gradients, each written into (or added to) its
    whole result; the β, α1, α2 scalings once at the end. ``mask``: M given (one chunk, bool or
    0/1 floats, see :func:`forward_with_mask`), so the score and the mask are not made again."""
    factors = _Factors(weight, U, V, A, B, R, C, beta, alpha1, alpha2, dy2d, x2d)
    acc, n, k = factors.acc, factors.n, factors.k
    wide_dy, wide_x = _as(dy2d, acc), _as(x2d, acc)
    chunks = _chunk_rows(n, k)
    if mask is not None and chunks != [None]:
        raise ValueError(f"pst backward: a given mask is for a weight of one chunk, got {n}x{k}")
    cut = _TieCut(threshold, n, k, factors.device, chunked=chunks != [None]) if mask is None else None
    dx = grads = None
    for rows in chunks:
        effective = factors.effective(rows)
        # |W_eff| for dW_eff: kept from the score in one chunk (one op fewer), made again after the
        # mask over several (12 bytes an entry while the mask is made instead of 16: the chunk size
        # is bounded by the memory of the largest layers, CHUNK_ENTRIES).
        magnitude = effective.abs() if needs_params and abs_score_grad and rows is None else None
        if mask is not None:
            keep = mask
        else:
            score = factors.score_over(effective.abs() if magnitude is None else magnitude, rows,
                                       keep_magnitude=magnitude is not None)
            keep = _keep(score, threshold, cut.before(rows))
            del score
        dy_chunk = wide_dy if rows is None else wide_dy[:, rows]
        if needs_dx:
            # W_eff ⊙ M rounded to x's dtype, as the forward's GEMM saw it.
            masked = effective * keep  # (the note above _keep)
            if x2d.dtype != acc:
                masked = masked.to(x2d.dtype)  # (the acc copy freed before the next one is made)
                masked = masked.to(acc)
            dx = torch.mm(dy_chunk, masked) if dx is None else dx.addmm_(dy_chunk, masked)
            del masked
        if needs_params:
            g = torch.mm(dy_chunk.t(), wide_x)
            # dW_eff = G ⊙ (M + |W_eff|) in |W_eff|'s buffer (G ⊙ M without the score's |.| term).
            if abs_score_grad:
                magnitude = effective.abs() if magnitude is None else magnitude
                d_effective = magnitude.add_(keep).mul_(g)
            else:
                d_effective = g * keep
            del keep, magnitude
            d_score = g.mul_(effective)  # dS = G ⊙ W_eff, over G
            del effective
            grads = _add_factor_grads(grads, rows, n, d_effective, d_score, factors)
            del d_effective, d_score  # before the next chunk's buffers are made
        else:
            del effective, keep
    if dx is None and needs_dx:
        dx = torch.zeros(x2d.shape, dtype=acc, device=x2d.device)
    dx = None if dx is None else _as(dx, x2d.dtype)
    if not needs_params:
        return dx, None
    dU, dV, dA, dB, dR, dC = grads
    return dx, (_scaled(dU, beta), _scaled(dV, beta), _scaled(dA, alpha1), _scaled(dB, alpha1),
                _scaled(dR, alpha2), _scaled(dC, alpha2))


def _add_factor_grads(grads, rows, n, d_effective, d_score, factors):
    """(dU, dV, dA, dB, dR, dC) before scaling, with this chunk's part: rows of dU, dA, dR written,
    dV, dB, dC summed over the chunks."""
    U, V, A, B = factors.U, factors.V, factors.A, factors.B
    if rows is None:  # one chunk: the results themselves
        return (torch.mm(d_effective, V.t()), torch.mm(U.t(), d_effective), torch.mm(d_score, B.t()),
                torch.mm(A.t(), d_score), d_score.sum(1, keepdim=True), d_score.sum(0, keepdim=True))
    if grads is None:
        acc, device = d_score.dtype, d_score.device
        grads = (torch.empty(n, U.shape[1], dtype=acc, device=device), torch.mm(U[rows].t(), d_effective),
                 torch.empty(n, A.shape[1], dtype=acc, device=device), torch.mm(A[rows].t(), d_score),
                 torch.empty(n, 1, dtype=acc, device=device), d_score.sum(0, keepdim=True))
    else:
        grads[1].addmm_(U[rows].t(), d_effective)
        grads[3].addmm_(A[rows].t(), d_score)
        grads[5].add_(d_score.sum(0, keepdim=True))
    torch.mm(d_effective, V.t(), out=grads[0][rows])
    torch.mm(d_score, B.t(), out=grads[2][rows])
    torch.sum(d_score, 1, keepdim=True, out=grads[4][rows])
    return grads


def _scaled(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1.0 else t.mul_(factor)


def _scaled_copy(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1.0 else t * factor
