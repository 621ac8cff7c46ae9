"""Triton kernels of PST (ops and reference in pst.py): the exact top-v threshold, the fused
forward and backward GEMMs and the dense export, registered as the "triton" backend of the
``pst_*`` ops.

Every kernel rebuilds the tiles it needs of ``W_eff = W0 + βUV`` and of the score
``S = |W_eff| + α1·AB + α2·(R + C)`` from W0 and the small factors with one shared helper,
:func:`_weight_and_score`, whose arithmetic is a fixed chain of fp32 fmas per entry (no
``tl.dot``, no reduction whose order depends on the tile shape or the kernel). An entry's score
is therefore bitwise the same in the threshold passes and in the GEMMs, and the forward keeps
exactly the v entries the threshold counted. No kernel writes an n x k buffer except the export.

Threshold (``pst_threshold``), exact, with no score buffer:

- scores map to signed int32 keys that order like the floats (``-0.0`` counts as ``+0.0``);
- four radix-select passes over the (recomputed) scores, 8 bits each from the top: pass p
  histograms (``tl.histogram`` + integer atomics: deterministic) the next digit of the keys that
  share the prefix found so far, and a one-program kernel picks the digit holding the v-th
  largest key. After the fourth pass the v-th largest key ``t`` is known, and how many entries
  equal to ``t`` are kept (``need``; the rest of the v have keys above ``t``);
- ties are broken by flat position (``row * k + col``), lower first: one more pass counts the
  entries equal to ``t`` per row and a one-program kernel finds the row and then the column of
  the ``need``-th of them, i.e. the cut position ``p``.

The mask is then ``key > t or (key == t and position < p)``: the pair ``(t, p)`` (int64 [2], on
the device, no host sync) is all the GEMMs need. Extra memory: 4 x 256 + n + 4 int64.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .backends import register

Tensor = torch.Tensor

_DIGIT_BITS = 8
_NUM_BINS = 1 << _DIGIT_BITS
_PASSES = 32 // _DIGIT_BITS
_TOKENS_PER_SPLIT = 512
_MAX_SPLITS = 64


def _check_dtypes(*tensors) -> None:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        raise ValueError(
            "pst: the Triton PST kernels compute scores in fp32 and take fp16/bf16/fp32 tensors; "
            "use backend='reference' for fp64"
        )


def _factor_args(weight, U, V, A, B, R, C, beta, alpha1, alpha2):
    """The score arguments every kernel takes, in its order; a rank-0 factor (never read) is
    replaced by the weight, since an empty tensor has no pointer to pass."""
    _check_dtypes(weight, U, V, A, B, R, C)
    n, k = weight.shape

    def pointer(t):
        return t.contiguous() if t.numel() else weight

    factors = (weight, pointer(U), pointer(V), pointer(A), pointer(B), pointer(R), pointer(C))
    return factors + (n, k, weight.stride(0), weight.stride(1), float(beta), float(alpha1), float(alpha2))


def _ranks(U, A):
    return dict(R1=A.shape[1], R2=U.shape[1])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact fp32 products like F.linear (not TF32); others run on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    # --- shared tile helpers --------------------------------------------------------------------

    @triton.jit
    def _weight_and_score(
        w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        rows, cols, R1: tl.constexpr, R2: tl.constexpr,
    ):
        # W_eff = W0 + β Σ_j U[:, j] V[j, :] and S = |W_eff| + α1 Σ_j A[:, j] B[j, :] + α2 (R + C)
        # for rows x cols, in fp32, as explicit fmas in a fixed order: the same bits in every kernel.
        row_ok = rows < n
        col_ok = cols < k
        weight = tl.load(
            w0_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        update = tl.zeros_like(weight)
        for j in tl.static_range(R2):
            u = tl.load(u_ptr + rows * R2 + j, mask=row_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + j * k + cols, mask=col_ok, other=0.0).to(tl.float32)
            update = tl.fma(u[:, None], v[None, :], update)
        weight = tl.fma(update, beta, weight)
        low_rank = tl.zeros_like(weight)
        for j in tl.static_range(R1):
            a = tl.load(a_ptr + rows * R1 + j, mask=row_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + j * k + cols, mask=col_ok, other=0.0).to(tl.float32)
            low_rank = tl.fma(a[:, None], b[None, :], low_rank)
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        score = tl.fma(r[:, None] + c[None, :], alpha2, tl.fma(low_rank, alpha1, tl.abs(weight)))
        return weight, score

    @triton.jit
    def _order_key(score):
        # Signed int32 keys that order like the fp32 scores; -0.0 is made +0.0 on the bits (a
        # float select could be folded away).
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _masked_tile(
        w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        rows, cols, t_key, p_cut, R1: tl.constexpr, R2: tl.constexpr,
    ):
        # (W_eff tile in fp32, keep tile): keep = key > t or (key == t and flat position < p).
        weight, score = _weight_and_score(
            w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
            rows, cols, R1, R2,
        )
        key = _order_key(score).to(tl.int64)
        position = rows[:, None] * k + cols[None, :]
        return weight, (key > t_key) | ((key == t_key) & (position < p_cut))

    # --- threshold ------------------------------------------------------------------------------

    @triton.jit
    def _pst_select_kernel(
        w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        state_ptr, hist_ptr, row_count_ptr,
        SHIFT: tl.constexpr, ROW_COUNTS: tl.constexpr, DIGIT_BITS: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One radix pass over a tile of scores (ROW_COUNTS=False): histogram of the digit at
        # SHIFT among the keys whose higher digits equal the prefix in state[0]. Or (ROW_COUNTS)
        # per-row counts of the keys equal to state[0]. Keys are unsigned here: key + 2**31.
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        _, score = _weight_and_score(
            w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
            rows, cols, R1, R2,
        )
        key = _order_key(score).to(tl.int64) + 2147483648
        valid = (rows < n)[:, None] & (cols < k)[None, :]
        prefix = tl.load(state_ptr)
        if ROW_COUNTS:
            equal = tl.sum((valid & (key == prefix)).to(tl.int64), axis=1)
            tl.atomic_add(row_count_ptr + rows, equal, mask=(rows < n) & (equal > 0))
        else:
            if SHIFT + DIGIT_BITS < 32:
                valid = valid & ((key >> (SHIFT + DIGIT_BITS)) == prefix)
            digit = ((key >> SHIFT) & ((1 << DIGIT_BITS) - 1)).to(tl.int32)
            counts = tl.histogram(
                tl.reshape(digit, (BLOCK_N * BLOCK_K,)), 1 << DIGIT_BITS, mask=tl.reshape(valid, (BLOCK_N * BLOCK_K,))
            )
            tl.atomic_add(hist_ptr + tl.arange(0, 1 << DIGIT_BITS), counts.to(tl.int64))

    @triton.jit
    def _pst_radix_descend_kernel(hist_ptr, state_ptr, NUM_BINS: tl.constexpr):
        # state = (prefix, rank): the rank-th largest key (1-based) among those with this prefix.
        # Pick the digit that holds it and make the rank relative to that digit's bin.
        bins = tl.arange(0, NUM_BINS)
        counts = tl.load(hist_ptr + bins)
        prefix = tl.load(state_ptr)
        rank = tl.load(state_ptr + 1)
        at_least = tl.sum(counts) - tl.cumsum(counts, 0) + counts  # keys with a digit >= bin
        digit = tl.max(tl.where(at_least >= rank, bins, 0))
        above = tl.sum(tl.where(bins == digit, at_least - counts, 0))
        tl.store(state_ptr, prefix * NUM_BINS + digit)
        tl.store(state_ptr + 1, rank - above)

    @triton.jit
    def _pst_tie_kernel(
        w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        state_ptr, row_count_ptr, out_ptr,
        R1: tl.constexpr, R2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program: the flat position of the need-th entry (in row-major order) whose key is
        # the threshold; out = (signed threshold key, that position + 1).
        target = tl.load(state_ptr)
        need = tl.load(state_ptr + 1)
        seen = need * 0
        row = need * 0
        before = need * 0
        for first in range(0, n, BLOCK_R):
            rr = (first + tl.arange(0, BLOCK_R)).to(tl.int64)
            counts = tl.load(row_count_ptr + rr, mask=rr < n, other=0)
            upto = tl.cumsum(counts, 0) + seen
            hit = (upto >= need) & (upto - counts < need)
            row += tl.sum(tl.where(hit, rr, 0))
            before += tl.sum(tl.where(hit, upto - counts, 0))
            seen += tl.sum(counts)
        need -= before
        rows = row + tl.zeros([1], tl.int64)
        col = need * 0
        seen = need * 0
        for first in range(0, k, BLOCK_K):
            cols = (first + tl.arange(0, BLOCK_K)).to(tl.int64)
            _, score = _weight_and_score(
                w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
                rows, cols, R1, R2,
            )
            key = _order_key(score).to(tl.int64) + 2147483648
            equal = ((key == target) & (cols < k)[None, :]).to(tl.int64)
            upto = tl.cumsum(equal, 1) + seen
            col += tl.sum(tl.where((equal > 0) & (upto == need), cols[None, :], 0))
            seen += tl.sum(equal)
        tl.store(out_ptr, target - 2147483648)
        tl.store(out_ptr + 1, row * k + col + 1)

    def _threshold_triton(weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep):
        args = _factor_args(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        n, k = weight.shape
        device = weight.device
        hist = torch.zeros(_PASSES, _NUM_BINS, dtype=torch.int64, device=device)
        state = torch.zeros(2, dtype=torch.int64, device=device)
        state[1] = keep
        row_counts = torch.zeros(n, dtype=torch.int64, device=device)
        out = torch.empty(2, dtype=torch.int64, device=device)
        block_n, block_k = 32, 64
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        common = dict(DIGIT_BITS=_DIGIT_BITS, BLOCK_N=block_n, BLOCK_K=block_k, **_ranks(U, A))
        for p in range(_PASSES):
            shift = 32 - _DIGIT_BITS * (p + 1)
            _pst_select_kernel[grid](*args, state, hist[p], row_counts, SHIFT=shift, ROW_COUNTS=False, **common)
            _pst_radix_descend_kernel[(1,)](hist[p], state, NUM_BINS=_NUM_BINS)
        _pst_select_kernel[grid](*args, state, hist[0], row_counts, SHIFT=0, ROW_COUNTS=True, **common)
        _pst_tie_kernel[(1,)](*args, state, row_counts, out, BLOCK_R=256, BLOCK_K=128, **_ranks(U, A))
        return out

    register("pst_threshold", "triton")(_threshold_triton)

    # --- forward: y = x (W_eff ⊙ M)ᵀ + b ----------------------------------------------------------

    @triton.jit
    def _pst_forward_kernel(
        x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        thr_ptr, bias_ptr, y_ptr, num_tokens, stride_x, stride_y,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # A GEMM whose weight tile is built in registers: W0 tile + βUV tile, masked by the score
        # tile against (t, p). The weight tile is rebuilt for every token block (cost ∝ r1 + r2
        # fmas per entry per BLOCK_T tokens).
        tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        rows = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        t_key = tl.load(thr_ptr)
        p_cut = tl.load(thr_ptr + 1)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for first in range(0, k, BLOCK_K):
            cols = (first + tl.arange(0, BLOCK_K)).to(tl.int64)
            weight, keep = _masked_tile(
                w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
                rows, cols, t_key, p_cut, R1, R2,
            )
            masked = tl.where(keep, weight, 0.0).to(x_ptr.dtype.element_ty)
            x = tl.load(
                x_ptr + tokens[:, None] * stride_x + cols[None, :],
                mask=(tokens < num_tokens)[:, None] & (cols < k)[None, :],
                other=0.0,
            )
            acc = tl.dot(x, tl.trans(masked), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < n, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + tokens[:, None] * stride_y + rows[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(tokens < num_tokens)[:, None] & (rows < n)[None, :],
        )

    @register("pst_linear", "triton")
    def _forward_triton(x2d, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2):
        args = _factor_args(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        _check_dtypes(x2d, bias)
        num_tokens, n = x2d.shape[0], weight.shape[0]
        y = torch.empty(num_tokens, n, dtype=x2d.dtype, device=x2d.device)
        if num_tokens == 0 or n == 0:
            return y
        x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
        block_t, block_n = 64, 64
        _pst_forward_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n))](
            x2d, *args, threshold, bias if bias is not None else y, y, num_tokens, x2d.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2d.dtype), **_ranks(U, A),
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=32,
        )
        return y

    # --- backward -------------------------------------------------------------------------------

    @triton.jit
    def _pst_dx_kernel(
        dy_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        thr_ptr, dx_ptr, num_tokens, stride_dy, stride_dx,
        DOT_PRECISION: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # dx = dy (W_eff ⊙ M), the weight tile built as in the forward.
        tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        t_key = tl.load(thr_ptr)
        p_cut = tl.load(thr_ptr + 1)
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for first in range(0, n, BLOCK_N):
            rows = (first + tl.arange(0, BLOCK_N)).to(tl.int64)
            weight, keep = _masked_tile(
                w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
                rows, cols, t_key, p_cut, R1, R2,
            )
            masked = tl.where(keep, weight, 0.0).to(dy_ptr.dtype.element_ty)
            dy = tl.load(
                dy_ptr + tokens[:, None] * stride_dy + rows[None, :],
                mask=(tokens < num_tokens)[:, None] & (rows < n)[None, :],
                other=0.0,
            )
            acc = tl.dot(dy, masked, acc, input_precision=DOT_PRECISION)
        tl.store(
            dx_ptr + tokens[:, None] * stride_dx + cols[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=(tokens < num_tokens)[:, None] & (cols < k)[None, :],
        )

    @triton.jit
    def _grad_tile(
        dy_ptr, x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk,
        beta, alpha1, alpha2, rows, cols, t_key, p_cut, first_token, last_token, stride_dy, stride_x,
        ABS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # For one weight tile and one token range: G = dyᵀx (never stored), then
        # dW_eff = G ⊙ (M [+ |W_eff|]) and dS = G ⊙ W_eff (straight-through top-v).
        g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t0 in range(first_token, last_token, BLOCK_T):
            tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            token_ok = tokens < last_token
            dy = tl.load(
                dy_ptr + tokens[:, None] * stride_dy + rows[None, :],
                mask=token_ok[:, None] & (rows < n)[None, :],
                other=0.0,
            )
            x = tl.load(
                x_ptr + tokens[:, None] * stride_x + cols[None, :],
                mask=token_ok[:, None] & (cols < k)[None, :],
                other=0.0,
            )
            g = tl.dot(tl.trans(dy), x, g, input_precision=DOT_PRECISION)
        weight, keep = _masked_tile(
            w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
            rows, cols, t_key, p_cut, R1, R2,
        )
        coefficient = tl.where(keep, 1.0, 0.0)
        if ABS_GRAD:
            coefficient += tl.abs(weight)
        return g * coefficient, g * weight

    @triton.jit
    def _token_range(num_tokens, tokens_per_split):
        split = tl.program_id(1).to(tl.int64)
        first_token = split * tokens_per_split
        return split, first_token, tl.minimum(first_token + tokens_per_split, num_tokens)

    @triton.jit
    def _add_times_wide_factor_t(acc, d, factor_ptr, cols, k, RANK: tl.constexpr, PAD: tl.constexpr):
        # acc [BLOCK_N, PAD] += d [BLOCK_N, BLOCK_K] @ F[:, cols]ᵀ for F = V or B ([RANK, k]).
        if RANK > 0:
            ranks = tl.arange(0, PAD)
            factor_t = tl.load(
                factor_ptr + ranks[None, :] * k + cols[:, None],
                mask=(cols < k)[:, None] & (ranks < RANK)[None, :],
                other=0.0,
            )
            acc = tl.dot(d, factor_t.to(tl.float32), acc, input_precision="ieee")
        return acc

    @triton.jit
    def _add_tall_factor_t_times(acc, d, factor_ptr, rows, n, RANK: tl.constexpr, PAD: tl.constexpr):
        # acc [PAD, BLOCK_K] += F[rows, :]ᵀ @ d [BLOCK_N, BLOCK_K] for F = U or A ([n, RANK]).
        if RANK > 0:
            ranks = tl.arange(0, PAD)
            factor_t = tl.load(
                factor_ptr + rows[None, :] * RANK + ranks[:, None],
                mask=(rows < n)[None, :] & (ranks < RANK)[:, None],
                other=0.0,
            )
            acc = tl.dot(factor_t.to(tl.float32), d, acc, input_precision="ieee")
        return acc

    @triton.jit
    def _pst_grad_rows_kernel(
        dy_ptr, x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk,
        beta, alpha1, alpha2, thr_ptr, du_ptr, da_ptr, dr_ptr, num_tokens, stride_dy, stride_x, tokens_per_split,
        ABS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
        R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Program (row block, token split): partial dU = dW_eff Vᵀ, dA = dS Bᵀ, dR = Σ_cols dS over
        # all column blocks, written per split (summed on the host in a fixed order).
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        split, first_token, last_token = _token_range(num_tokens, tokens_per_split)
        t_key = tl.load(thr_ptr)
        p_cut = tl.load(thr_ptr + 1)
        du = tl.zeros((BLOCK_N, R2_PAD), dtype=tl.float32)
        da = tl.zeros((BLOCK_N, R1_PAD), dtype=tl.float32)
        dr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first in range(0, k, BLOCK_K):
            cols = (first + tl.arange(0, BLOCK_K)).to(tl.int64)
            dw, ds = _grad_tile(
                dy_ptr, x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk,
                beta, alpha1, alpha2, rows, cols, t_key, p_cut, first_token, last_token, stride_dy, stride_x,
                ABS_GRAD, DOT_PRECISION, R1, R2, BLOCK_T, BLOCK_N, BLOCK_K,
            )
            du = _add_times_wide_factor_t(du, dw, v_ptr, cols, k, R2, R2_PAD)
            da = _add_times_wide_factor_t(da, ds, b_ptr, cols, k, R1, R1_PAD)
            dr += tl.sum(ds, axis=1)
        row_ok = (rows < n)[:, None]
        rank2 = tl.arange(0, R2_PAD)[None, :]
        rank1 = tl.arange(0, R1_PAD)[None, :]
        tl.store(du_ptr + (split * n + rows[:, None]) * R2 + rank2, du, mask=row_ok & (rank2 < R2))
        tl.store(da_ptr + (split * n + rows[:, None]) * R1 + rank1, da, mask=row_ok & (rank1 < R1))
        tl.store(dr_ptr + split * n + rows, dr, mask=rows < n)

    @triton.jit
    def _pst_grad_cols_kernel(
        dy_ptr, x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk,
        beta, alpha1, alpha2, thr_ptr, dv_ptr, db_ptr, dc_ptr, num_tokens, stride_dy, stride_x, tokens_per_split,
        ABS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
        R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Program (column block, token split): partial dV = Uᵀ dW_eff, dB = Aᵀ dS, dC = Σ_rows dS.
        # G is recomputed here rather than kept from the row kernel: sharing it would need
        # partials of size (n / BLOCK_N) x (r1 + r2 + 1) x k, a quarter of n x k at r = 8.
        cols = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        split, first_token, last_token = _token_range(num_tokens, tokens_per_split)
        t_key = tl.load(thr_ptr)
        p_cut = tl.load(thr_ptr + 1)
        dv = tl.zeros((R2_PAD, BLOCK_K), dtype=tl.float32)
        db = tl.zeros((R1_PAD, BLOCK_K), dtype=tl.float32)
        dc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for first in range(0, n, BLOCK_N):
            rows = (first + tl.arange(0, BLOCK_N)).to(tl.int64)
            dw, ds = _grad_tile(
                dy_ptr, x_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk,
                beta, alpha1, alpha2, rows, cols, t_key, p_cut, first_token, last_token, stride_dy, stride_x,
                ABS_GRAD, DOT_PRECISION, R1, R2, BLOCK_T, BLOCK_N, BLOCK_K,
            )
            dv = _add_tall_factor_t_times(dv, dw, u_ptr, rows, n, R2, R2_PAD)
            db = _add_tall_factor_t_times(db, ds, a_ptr, rows, n, R1, R1_PAD)
            dc += tl.sum(ds, axis=0)
        col_ok = (cols < k)[None, :]
        rank2 = tl.arange(0, R2_PAD)[:, None]
        rank1 = tl.arange(0, R1_PAD)[:, None]
        tl.store(dv_ptr + (split * R2 + rank2) * k + cols[None, :], dv, mask=col_ok & (rank2 < R2))
        tl.store(db_ptr + (split * R1 + rank1) * k + cols[None, :], db, mask=col_ok & (rank1 < R1))
        tl.store(dc_ptr + split * k + cols, dc, mask=cols < k)

    def _pad(rank: int) -> int:
        return max(16, triton.next_power_of_2(rank))

    @register("pst_linear_backward", "triton")
    def _backward_triton(
        dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params
    ):
        args = _factor_args(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        _check_dtypes(dy2d, x2d)
        num_tokens, (n, k) = x2d.shape[0], weight.shape
        dy2d = dy2d if dy2d.stride(-1) == 1 else dy2d.contiguous()
        x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
        precision = _dot_precision(x2d.dtype)
        ranks = _ranks(U, A)
        dx = None
        if needs_dx:
            dx = torch.empty(num_tokens, k, dtype=x2d.dtype, device=x2d.device)
            if num_tokens and k:
                block_t, block_k = 64, 64
                _pst_dx_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(k, block_k))](
                    dy2d, *args, threshold, dx, num_tokens, dy2d.stride(0), dx.stride(0),
                    DOT_PRECISION=precision, **ranks, BLOCK_T=block_t, BLOCK_N=32, BLOCK_K=block_k,
                )
        if not needs_params:
            return dx, None
        if num_tokens == 0:
            return dx, tuple(torch.zeros_like(p, dtype=torch.float32) for p in (U, V, A, B, R, C))
        # Token splits depend on the shapes only: same inputs, same bits on any device.
        splits = min(_MAX_SPLITS, triton.cdiv(num_tokens, _TOKENS_PER_SPLIT))
        tokens_per_split = triton.cdiv(num_tokens, splits)
        splits = triton.cdiv(num_tokens, tokens_per_split)
        r1, r2 = ranks["R1"], ranks["R2"]
        partial = dict(dtype=torch.float32, device=x2d.device)
        du, da, dr = torch.empty(splits, n, r2, **partial), torch.empty(splits, n, r1, **partial), torch.empty(splits, n, **partial)
        dv, db, dc = torch.empty(splits, r2, k, **partial), torch.empty(splits, r1, k, **partial), torch.empty(splits, k, **partial)
        blocks = dict(DOT_PRECISION=precision, ABS_GRAD=bool(abs_score_grad), R1_PAD=_pad(r1), R2_PAD=_pad(r2),
                      BLOCK_T=32, BLOCK_N=64, BLOCK_K=64, **ranks)
        strides = (num_tokens, dy2d.stride(0), x2d.stride(0), tokens_per_split)
        _pst_grad_rows_kernel[(triton.cdiv(n, 64), splits)](
            dy2d, x2d, *args, threshold, du if r2 else dr, da if r1 else dr, dr, *strides, **blocks
        )
        _pst_grad_cols_kernel[(triton.cdiv(k, 64), splits)](
            dy2d, x2d, *args, threshold, dv if r2 else dc, db if r1 else dc, dc, *strides, **blocks
        )
        grads = (
            du.sum(0).mul_(beta), dv.sum(0).mul_(beta), da.sum(0).mul_(alpha1), db.sum(0).mul_(alpha1),
            dr.sum(0).mul_(alpha2).view(n, 1), dc.sum(0).mul_(alpha2).view(1, k),
        )
        return dx, grads

    # --- dense export: W_eff and the mask -----------------------------------------------------------

    @triton.jit
    def _pst_dense_kernel(
        w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
        thr_ptr, weight_out_ptr, mask_out_ptr,
        R1: tl.constexpr, R2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # The same tiles the GEMMs build, written out (export and inspection only).
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        weight, keep = _masked_tile(
            w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, n, k, stride_wn, stride_wk, beta, alpha1, alpha2,
            rows, cols, tl.load(thr_ptr), tl.load(thr_ptr + 1), R1, R2,
        )
        offsets = rows[:, None] * k + cols[None, :]
        valid = (rows < n)[:, None] & (cols < k)[None, :]
        tl.store(weight_out_ptr + offsets, weight, mask=valid)
        tl.store(mask_out_ptr + offsets, keep.to(tl.int8), mask=valid)

    @register("pst_dense", "triton")
    def _dense_triton(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2):
        args = _factor_args(weight, U, V, A, B, R, C, beta, alpha1, alpha2)
        n, k = weight.shape
        weight_out = torch.empty(n, k, dtype=torch.float32, device=weight.device)
        mask = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        if n and k:
            _pst_dense_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 64))](
                *args, threshold, weight_out, mask, **_ranks(U, A), BLOCK_N=32, BLOCK_K=64
            )
        return weight_out, mask.view(torch.bool)

