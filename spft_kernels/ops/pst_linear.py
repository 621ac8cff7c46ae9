"""PST, parameter-efficient sparse training (Li et al., IJCAI 2022, "Parameter-Efficient
Sparsity for Large Language Models Fine-Tuning"): prune a frozen weight to a target sparsity
during fine-tuning while training only small matrices.

For ``W0`` [n, k] the layer trains ``U`` [n, r2], ``V`` [r2, k] (the update ``βUV``) and the
importance parts ``A`` [n, r1], ``B`` [r1, k], ``R`` [n, 1], ``C`` [1, k]
((n + k)(r1 + r2 + 1) values):

- ``W_eff = W0 + βUV``; score ``S = |W_eff| + α1·AB + α2·(R + C)`` (paper eq. 6);
- ``M`` keeps the top-v entries of S, ``v = round((1 - sparsity)·n·k)`` (Python's round, half to
  even). Ties are broken by flat position ``row * k + col``: the lower position is kept, so the
  mask keeps exactly v entries whatever the scores;
- ``y = x (W_eff ⊙ M)ᵀ + b`` (eq. 7).

Backward (straight-through through the top-v, as in movement pruning and the paper's released
code: the mask's gradient is passed to S unchanged). With ``G = dyᵀx`` [n, k], the gradient
of the masked weight:

- ``dS = G ⊙ W_eff`` (the gradient reaching M is that of the masked weight times the weight);
- ``dW_eff = G ⊙ M + dS ⊙ sign(W_eff) = G ⊙ (M + |W_eff|)``: the data-free term ``|W_eff|`` of
  S is differentiated, as in eq. (8), which optimises U, V through ``f(|W0 + βUV| + ...)``, and
  as the authors' code does (autograd through ``weight.abs()``). ``abs_score_grad=False`` treats
  it as a detached signal instead (``dW_eff = G ⊙ M``, the movement-pruning reading);
- ``dU = β dW_eff Vᵀ``, ``dV = β Uᵀ dW_eff``, ``dA = α1 dS Bᵀ``, ``dB = α1 Aᵀ dS``,
  ``dR = α2 Σ_cols dS``, ``dC = α2 Σ_rows dS``; ``dx = dy (W_eff ⊙ M)``; ``db = Σ dy``.

The top-v threshold is computed once per step (``pst_threshold``) as the pair ``(t, p)``: the
v-th largest score's order key and the cut position among the scores equal to it; the mask is
``key > t or (key == t and position < p)``. ``PSTLinear`` caches it until the sparsity, an optimizer step or one of
W0, U, V, A, B, R, C changes (their version counters), so gradient accumulation pays it once.

Backends: ``reference`` (pure PyTorch, fp32/fp64, by row blocks of the weight: no n x k
temporary in a training step and no sort; pst_reference.py) and ``triton`` (pst_kernels.py: the threshold by a
streamed radix select and GEMMs that build the masked weight tile in registers; no n x k
temporary in a training step). Scores are computed in fp32 (fp64 for fp64 inputs in the
reference); the two backends round the score differently, so their masks can differ where two
scores are within rounding of each other at the threshold.

Initialisation (the authors' code): ``U ~ N(0, 1)``, ``V = 0`` (so βUV = 0 and the layer starts
as ``W0 ⊙ M``), ``A ~ N(0, 1)``, ``B = 0``, ``R = C = 0`` (so every entry starts with the same
data-driven score, paper §3.2). Defaults ``β = α1 = α2 = 1``, ``r1 = r2 = 8`` (paper §4.1).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import naive
from . import pst_kernels  # noqa: F401  (registers the Triton implementations)
from . import pst_reference
from ._guards import autocast_off
from ._eager import eager_autograd, runs_eagerly
from .backends import check_backend_name, implementation, register, resolve_backend

Tensor = torch.Tensor

_FACTORS = ("U", "V", "A", "B", "R", "C")
_OPS = ("pst_threshold", "pst_linear", "pst_linear_backward")


# --- schedule and sizes -------------------------------------------------------------------------


def _check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"pst: {name} must be a number with 0 <= {name} < 1, got {sparsity!r}")
    return float(sparsity)


def keep_count(numel: int, sparsity: float) -> int:
    """v, the number of entries the mask keeps: ``round((1 - sparsity) * numel)``."""
    return int(round((1.0 - _check_sparsity(sparsity)) * numel))


def cubic_sparsity(step, total_steps: int, final_sparsity: float, warmup: float = 0.1, cooldown: float = 0.3) -> float:
    """The paper's schedule (§4.1, Zhu & Gupta's cubic rule with warm-up and cool-down phases):
    0 for ``step <= warmup * total_steps``, ``final_sparsity`` for
    ``step > (1 - cooldown) * total_steps``, and in between
    ``final * (1 - (1 - (step - w) / (total - w - c))**3)`` with ``w = warmup * total``,
    ``c = cooldown * total``: it rises fast first and flattens as it nears the target."""
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or step < 0:
        raise ValueError(f"cubic_sparsity: step must be a number >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps <= 0:
        raise ValueError(f"cubic_sparsity: total_steps must be an integer > 0, got {total_steps!r}")
    final = _check_sparsity(final_sparsity, "final_sparsity")
    for name, value in (("warmup", warmup), ("cooldown", cooldown)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"cubic_sparsity: {name} must be a fraction in [0, 1], got {value!r}")
    if warmup + cooldown > 1.0:
        raise ValueError(f"cubic_sparsity: warmup + cooldown must be <= 1, got {warmup} + {cooldown}")
    warmup_steps = warmup * total_steps
    if step <= warmup_steps:
        return 0.0
    if step > total_steps - cooldown * total_steps:
        return final
    remaining = 1.0 - (step - warmup_steps) / (total_steps - (warmup + cooldown) * total_steps)
    return final * (1.0 - remaining**3)


# --- reference (pure PyTorch, by row blocks: pst_reference.py) ----------------------------------

order_keys = pst_reference.order_keys
_effective_weight_grad = pst_reference.effective_weight_grad
register("pst_threshold", "reference")(pst_reference.threshold)
register("pst_dense", "reference")(pst_reference.dense)
register("pst_linear", "reference")(pst_reference.forward)
register("pst_linear_backward", "reference")(pst_reference.backward)


# --- the ops ------------------------------------------------------------------------------------


def _run(op: str, backend: str, device: torch.device, *args):
    """The backend's implementation of ``op``, with autocast off: the ops choose their own
    precision (scores in fp32/fp64), and pst_linear casts x for autocast before the op."""
    chosen = resolve_backend(op, backend, device)
    with autocast_off(device.type):
        return implementation(op, chosen)(*args)


@torch.library.custom_op("spft::pst_threshold", mutates_args=())
def _pst_threshold_op(
    weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor,
    beta: float, alpha1: float, alpha2: float, keep: int, backend: str,
) -> Tensor:
    """int64 [2]: (t, p) such that ``key > t or (key == t and position < p)`` keeps exactly ``keep``."""
    numel = weight.numel()
    # "Keep all" / "keep none": the smallest / largest key of the scores' dtype (fp32 scores have
    # int32 keys, which the reference then compares without widening them).
    sentinel = torch.iinfo(torch.int64 if naive.accumulate_dtype(weight, U, V, A, B, R, C) == torch.float64 else torch.int32)
    if keep >= numel:
        return torch.tensor([sentinel.min, numel], dtype=torch.int64, device=weight.device)
    if keep <= 0:
        return torch.tensor([sentinel.max, 0], dtype=torch.int64, device=weight.device)
    return _run("pst_threshold", backend, weight.device, weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep)


@_pst_threshold_op.register_fake
def _(weight, U, V, A, B, R, C, beta, alpha1, alpha2, keep, backend):
    return weight.new_empty(2, dtype=torch.int64)


@torch.library.custom_op("spft::pst_dense", mutates_args=())
def _pst_dense_op(
    weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor, threshold: Tensor,
    beta: float, alpha1: float, alpha2: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """(W_eff [n, k] in fp32 (fp64 for fp64 inputs), M [n, k] bool): n x k outputs, for export."""
    return _run("pst_dense", backend, weight.device, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2)


@_pst_dense_op.register_fake
def _(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, backend):
    acc = naive.accumulate_dtype(weight, U, V, A, B, R, C)
    return weight.new_empty(weight.shape, dtype=acc), weight.new_empty(weight.shape, dtype=torch.bool)


@torch.library.custom_op("spft::pst_linear", mutates_args=())
def _pst_linear_op(
    x: Tensor, weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor,
    bias: Optional[Tensor], threshold: Tensor, beta: float, alpha1: float, alpha2: float,
    abs_score_grad: bool, backend: str,
) -> Tensor:
    return _pst_linear_impl(x, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2, abs_score_grad, backend)


def _pst_linear_impl(x, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2, abs_score_grad, backend,
                     kept_mask=None):
    out_features, in_features = weight.shape
    x2d = x.reshape(-1, in_features)
    if kept_mask is not None:  # the reference's forward with the mask given (PSTLinear.kept_mask)
        with autocast_off(x.device.type):
            y2d = pst_reference.forward_with_mask(x2d, weight, U, V, bias, kept_mask, beta)
    else:
        y2d = _run("pst_linear", backend, x.device, x2d, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2)
    return y2d.reshape(*x.shape[:-1], out_features)


@_pst_linear_op.register_fake
def _(x, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2, abs_score_grad, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("spft::pst_linear_backward", mutates_args=())
def _pst_linear_backward_op(
    dy2d: Tensor, x2d: Tensor, weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor,
    threshold: Tensor, beta: float, alpha1: float, alpha2: float, abs_score_grad: bool,
    needs_dx: bool, needs_params: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dU, dV, dA, dB, dR, dC) for 2-D dy, x; an output that was not asked for is empty."""
    return _pst_backward_impl(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad,
                              needs_dx, needs_params, backend)


def _pst_backward_impl(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad,
                       needs_dx, needs_params, backend, kept_mask=None):
    args = (dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params)
    if kept_mask is not None:
        with autocast_off(x2d.device.type):
            dx, grads = pst_reference.backward(*args, mask=kept_mask)
    else:
        dx, grads = _run("pst_linear_backward", backend, x2d.device, *args)
    factors = (U, V, A, B, R, C)
    dx = dx if needs_dx else x2d.new_empty(0)
    # (a same-dtype .to costs ~1.4 µs a call: 6 a step, ~5% of a 64x64 step)
    grads = ([g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, factors)] if needs_params
             else [p.new_empty(0) for p in factors])
    return (dx, *grads)


@_pst_linear_backward_op.register_fake
def _(dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs_dx, needs_params, backend):
    factors = (U, V, A, B, R, C)
    dx = x2d.new_empty(x2d.shape) if needs_dx else x2d.new_empty(0)
    return (dx, *(p.new_empty(p.shape if needs_params else (0,)) for p in factors))


def _setup_context(ctx, inputs, output):
    x, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2, abs_score_grad, backend = inputs
    ctx.save_for_backward(x, weight, U, V, A, B, R, C, threshold)
    ctx.config = (beta, alpha1, alpha2, abs_score_grad)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kept_mask = None


def _setup_context_eager(ctx, inputs, options, output):
    _setup_context(ctx, inputs, output)
    # A constant of the optimizer step (no gradient, never written): kept on ctx, not saved.
    ctx.kept_mask = options.get("kept_mask")


def _backward(ctx, dy):
    x, weight, U, V, A, B, R, C, threshold = ctx.saved_tensors
    beta, alpha1, alpha2, abs_score_grad = ctx.config
    needs = ctx.needs_input_grad
    out_features, in_features = weight.shape
    dy2d, x2d = dy.reshape(-1, out_features), x.reshape(-1, in_features)
    needs_params = any(needs[2:8])
    args = (dy2d, x2d, weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, abs_score_grad, needs[0],
            needs_params, ctx.backend)
    if runs_eagerly(dy2d, x2d, weight, U, V, A, B, R, C):
        dx, *factor_grads = _pst_backward_impl(*args, kept_mask=ctx.kept_mask)
    else:
        dx, *factor_grads = _pst_linear_backward_op(*args)
    dweight = dbias = None
    if needs[1]:
        # dW0 = dW_eff is n x k by nature: only when the frozen weight was made trainable.
        effective, mask = _pst_dense_op(weight, U, V, A, B, R, C, threshold, beta, alpha1, alpha2, ctx.backend)
        g = dy2d.to(effective.dtype).t() @ x2d.to(effective.dtype)
        dweight = _effective_weight_grad(g, mask, effective, abs_score_grad).to(weight.dtype)
    if needs[8]:
        dbias = dy2d.sum(dim=0, dtype=naive.accumulate_dtype(dy2d)).to(ctx.bias_dtype)
    factor_grads = [g if needs[2 + i] else None for i, g in enumerate(factor_grads)]
    return (dx.reshape(x.shape) if needs[0] else None, dweight, *factor_grads, dbias, None, None, None, None, None, None)


_pst_linear_op.register_autograd(_backward, setup_context=_setup_context)
# Plain tensors in eager mode skip the custom op's wrapper (ops/_eager.py); there a small layer
# may pass the mask it keeps for the optimizer step (options {"kept_mask": M}).
_EagerPstLinear = eager_autograd(_pst_linear_impl, _setup_context_eager, _backward, keyword_setup=True)


# --- functional entry points ---------------------------------------------------------------------


def _check_factors(weight, factors, name: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be a 2-D tensor [out, in]")
    n, k = weight.shape
    U, V, A, B, R, C = factors
    if not all(isinstance(t, Tensor) for t in factors):
        raise ValueError(f"{name}: U, V, A, B, R and C must be tensors")
    r2 = U.shape[1] if U.dim() == 2 else -1
    r1 = A.shape[1] if A.dim() == 2 else -1
    expected = dict(U=(n, r2), V=(r2, k), A=(n, r1), B=(r1, k), R=(n, 1), C=(1, k))
    for label, tensor in zip(_FACTORS, factors):
        if tuple(tensor.shape) != expected[label] or min(expected[label]) < 0:
            raise ValueError(
                f"{name}: {label} has shape {tuple(tensor.shape)}; for a weight of shape {(n, k)} expected "
                f"U [n, r2], V [r2, k], A [n, r1], B [r1, k], R [n, 1], C [1, k]"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: {label} must be floating point, got {tensor.dtype}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, got {weight.dtype}")
    _one_device(name, weight, *factors)


def _check_scalars(beta, alpha1, alpha2, name: str) -> tuple[float, float, float]:
    for label, value in (("beta", beta), ("alpha1", alpha1), ("alpha2", alpha2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name}: {label} must be a finite number, got {value!r}")
    return float(beta), float(alpha1), float(alpha2)


def _resolve_all(backend: str, device: torch.device, tensors, name: str) -> None:
    """Resolve every op a step needs now, so a missing kernel or an fp64 tensor for the Triton
    kernels fails here and not in the backward."""
    chosen = {resolve_backend(op, backend, device) for op in _OPS}
    if "triton" in chosen:
        try:
            pst_kernels._check_dtypes(*tensors)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def _check_input(x, weight: Tensor, bias, name: str) -> tuple[Tensor, Optional[Tensor]]:
    """(x, bias) for the step after checking them against a checked weight: x [..., in], bias
    [out] or None, both on weight's device and in its dtype, or under autocast cast to the
    autocast dtype. PSTLinear's forward checks only these once its own tensors are checked."""
    out_features, in_features = weight.shape
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name}: x must be a tensor of shape [..., {in_features}] to match weight {tuple(weight.shape)}, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_features,)):
        raise ValueError(f"{name}: bias must have shape ({out_features},)")
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        _one_device(name, weight, x, bias)
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: the GEMM runs in the autocast dtype. The masked weight tile
        # is built in fp32 from W0 as stored and rounded to it, so W0 needs no cast copy.
        x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = None if bias is None else bias.to(x.dtype)
    elif x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"{name}: x, weight and bias must share a dtype, got x {x.dtype}, weight {weight.dtype}"
            + ("" if bias is None else f", bias {bias.dtype}")
        )
    return x, bias


def _one_device(name: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")


@torch.no_grad()
def pst_threshold(
    weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor, sparsity: float,
    *, beta: float = 1.0, alpha1: float = 1.0, alpha2: float = 1.0, backend: str = "auto",
) -> Tensor:
    """The top-v threshold ``(t, p)`` (int64 [2], on the weight's device) for ``sparsity``: pass
    it to :func:`pst_linear` (``threshold=``) to reuse it over several forwards. The same backend
    must compute and use it (each backend has its own score rounding)."""
    name = "pst_threshold"
    check_backend_name(backend)
    factors = (U, V, A, B, R, C)
    _check_factors(weight, factors, name)
    beta, alpha1, alpha2 = _check_scalars(beta, alpha1, alpha2, name)
    keep = keep_count(weight.numel(), sparsity)
    _resolve_all(backend, weight.device, (weight,) + factors, name)
    factors = tuple(t.detach() for t in factors)
    return _pst_threshold_op(weight.detach(), *factors, beta, alpha1, alpha2, keep, backend)


def pst_linear(
    x: Tensor, weight: Tensor, U: Tensor, V: Tensor, A: Tensor, B: Tensor, R: Tensor, C: Tensor,
    bias: Optional[Tensor] = None, *, sparsity: Optional[float] = None, threshold: Optional[Tensor] = None,
    beta: float = 1.0, alpha1: float = 1.0, alpha2: float = 1.0, abs_score_grad: bool = True, backend: str = "auto",
    _kept_mask: Optional[Tensor] = None,
) -> Tensor:
    """``y = x ((W0 + βUV) ⊙ M)ᵀ + b`` with M the top-v mask of ``|W0 + βUV| + α1·AB + α2·(R + C)``.

    Give exactly one of ``sparsity`` (the threshold is then computed here) and ``threshold`` (from
    :func:`pst_threshold`, e.g. cached over gradient-accumulation steps). ``x``: [..., in] in
    W0's dtype (under autocast: the autocast dtype; W0 is then read as is, never copied);
    factors: any float dtype (fp32 masters). See the module docstring for the backward.
    """
    name = "pst_linear"
    check_backend_name(backend)
    factors = (U, V, A, B, R, C)
    _check_factors(weight, factors, name)
    beta, alpha1, alpha2 = _check_scalars(beta, alpha1, alpha2, name)
    if (sparsity is None) == (threshold is None):
        raise ValueError(f"{name}: give exactly one of sparsity and threshold")
    if threshold is not None and (
        not isinstance(threshold, Tensor) or threshold.dtype != torch.int64 or threshold.shape != (2,)
    ):
        raise ValueError(f"{name}: threshold must be the int64 [2] tensor returned by pst_threshold")
    x, bias = _check_input(x, weight, bias, name)
    if threshold is not None and threshold.device != weight.device:
        _one_device(name, weight, threshold)
    _resolve_all(backend, x.device, (x, weight, bias) + factors, name)
    if threshold is None:
        threshold = pst_threshold(
            weight, *factors, sparsity, beta=beta, alpha1=alpha1, alpha2=alpha2, backend=backend
        )
    args = (x, weight, U, V, A, B, R, C, bias, threshold, beta, alpha1, alpha2, bool(abs_score_grad), backend)
    if runs_eagerly(x, weight, U, V, A, B, R, C, bias, threshold):
        # ``_kept_mask``: M for this threshold (bool or 0/1 floats), from pst_dense (reference), kept
        # by PSTLinear for a small weight (nn/pst_linear.py); a traced call computes M itself (the
        # same mask).
        return _EagerPstLinear.apply(*args, {"kept_mask": _kept_mask})
    return _pst_linear_op(*args)
