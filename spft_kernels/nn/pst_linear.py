"""``PSTLinear``, the ``pst`` kind: prune a frozen W0 while training small factors (PST). Its
"positions" are a learned structured mask (the top-v of a score), so it has no fixed positions,
never writes into W0 and does not sum with other adapters; it owns its options (``PSTOptions``),
its adapter form (the factors and options) and its conversion (data-free, factors from one seeded
generator). The math, the ops and the backends are in ``ops/pst_linear.py``."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import torch
import torch.nn as nn

from ..ops import naive
from ..ops._eager import runs_eagerly
from ..ops._guards import builds_state
from ..ops.backends import check_backend_name, resolve_backend
from ..ops.pst_linear import (
    _check_input,
    _check_scalars,
    _check_sparsity,
    _EagerPstLinear,
    _FACTORS,
    _OPS,
    keep_count,
    _pst_dense_op,
    pst_linear,
    pst_threshold,
)
from .base import SpftLayer
from .registry import register_kind
from .stored import AdapterPayload, expect_tensor, take_tensors, VALUE_DTYPES

Tensor = torch.Tensor

# A weight of at most this many entries keeps its mask M (as 0/1 in the factors' accumulate dtype:
# at most 256 KiB in fp32) from one threshold to the next, beside it: its training step then runs
# 3 + 14 ops instead of 38 (the score and the mask are not made again in the forward and the
# backward). Below this size a step is host time, so the 256 KiB is nothing next to what it saves
# (64x64, 16 tokens: 17 ops, 1.67x peft LoRA's time, against 2.59x when the step makes M;
# bench/results/cpu-pst-lean-2026-12-02); a larger weight makes M in its step, chunk by chunk, and
# keeps nothing n x k between steps. The mask is kept as floats, not bools: W_eff * M and |W_eff| + M
# with a bool M cast it to float in each of the step's 3 uses (~3 µs each on this CPU), and 0/1 are
# exact in every float dtype, so the results are bitwise the same.
KEEP_MASK_ENTRIES = 1 << 16

_optimizer_steps = 0
_step_hook = None


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """Steps taken by any ``torch.optim.Optimizer`` (fused ones included) since the first
    ``PSTLinear`` was built: a global step-post hook counts them (``PSTLinear.threshold``)."""
    return _optimizer_steps


def _watch_optimizer_steps() -> None:
    global _step_hook
    if _step_hook is None:  # once per process, when the first PSTLinear is built (not at import)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_step)


class _StepCache:
    """What a layer's step reads that changes only with the sparsity, the options or a tensor's
    values: the threshold, the kept mask (``UNSET`` until the first forward asks; None when the
    layer does not keep it) and whether every op of a step resolves to the reference backend
    (then the forward takes the lean path, see :meth:`PSTLinear.forward`)."""

    UNSET = object()
    __slots__ = ("key", "threshold", "mask", "reference")

    def __init__(self, key: tuple, threshold: Tensor, reference: bool) -> None:
        self.key, self.threshold, self.reference = key, threshold, reference
        self.mask = self.UNSET


@dataclasses.dataclass(frozen=True)
class PSTOptions:
    """PST's options (the paper's defaults): the sparsity the mask applies, the ranks of the
    importance term AB (``r1``) and of the update UV (``r2``), the weights of the update (``beta``)
    and of the score terms (``alpha1``, ``alpha2``), and whether |W_eff| in the score is
    differentiated (``abs_score_grad``)."""

    sparsity: float = 0.0
    r1: int = 8
    r2: int = 8
    beta: float = 1.0
    alpha1: float = 1.0
    alpha2: float = 1.0
    abs_score_grad: bool = True


_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(PSTOptions))


@register_kind
class PSTLinear(SpftLayer):
    """A drop-in ``nn.Linear`` that prunes its frozen weight W0 to ``sparsity`` while training
    only U, V, A, B, R, C (``(n + k)(r1 + r2 + 1)`` values, fp32 masters):
    ``y = x ((W0 + βUV) ⊙ M)ᵀ + b``, M the top-v mask of ``|W0 + βUV| + α1·AB + α2·(R + C)``.

    A training loop calls ``layer.set_sparsity(spft.cubic_sparsity(step, ...))`` each step; the
    threshold is recomputed only when the sparsity or a factor changed. ``to_linear()`` exports
    the pruned weight as a plain ``nn.Linear``; ``sparsity_report()`` says what it holds.
    The state dict holds W0, bias, the factors and (extra state) sparsity, β, α1, α2.
    ``PSTLinear.from_linear(linear, sparsity, *, r1=8, r2=8, ..., backend="auto", name=None)``, or
    with ``PSTOptions`` in place of the sparsity.
    """

    # Every PST product reads W0 itself: the output weight is W0 ⊙ M plus the factors, M from
    # |W0 + βUV|, so a quantized W0 would need a dense copy of every layer for the step.
    dense_w0_reason = ("PST prunes the base weight itself (y = x (W0 ⊙ M + ...)ᵀ, mask scores from |W0 + βUV|), "
                       "which needs a dense W0")

    kind = "pst"
    unit = "factor values"
    writes_w0 = False  # the mask prunes W0 on the fly; W0 itself is never written
    additive = False  # each adapter prunes W0 with its own learned mask: two do not sum
    shira_refusal = (
        "PST's output is a pruned weight (W0 + βUV) ⊙ M, not W0 plus a set of trained entries, so peft's SHiRA "
        "format cannot express it"
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        sparsity: float = 0.0,
        r1: int = 8,
        r2: int = 8,
        beta: float = 1.0,
        alpha1: float = 1.0,
        alpha2: float = 1.0,
        abs_score_grad: bool = True,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        name: Optional[str] = None,
    ) -> None:
        layer_name = name or "PSTLinear"
        _check_ranks(r1, r2, layer_name)
        check_backend_name(backend)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype, backend=backend, name=name)
        self.r1, self.r2 = int(r1), int(r2)
        self.beta, self.alpha1, self.alpha2 = _check_scalars(beta, alpha1, alpha2, layer_name)
        self.abs_score_grad = bool(abs_score_grad)
        self.sparsity = _check_sparsity(sparsity)
        self._step_cache: Optional[_StepCache] = None
        _watch_optimizer_steps()
        self.reset_factors(generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        positions=None,
        *,
        mode: str = "auto",
        backend: str = "auto",
        name: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        **options,
    ) -> "PSTLinear":
        """Wrap ``linear`` without copying its weight (shared and frozen, as is its bias); the
        layer starts as ``W0 ⊙ M`` with M the top-v mask of ``|W0|`` at ``sparsity``.
        ``positions``: the sparsity (a number) or a ``PSTOptions``; ``options``: ``PSTOptions``
        fields (``r1``, ``r2``, ``beta``, ...). ``mode``: PST has one way to compute (``auto``)."""
        layer_name = name or cls.__name__
        cls._check_linear(linear, layer_name, mode)
        if mode not in ("auto", "split"):
            raise ValueError(
                f"{layer_name}: PST computes its pruned weight on the fly and never writes into W0; mode must be "
                f"'auto' (or 'split'), got {mode!r}"
            )
        fields = _options(positions, options, layer_name)
        # Built on the meta device, so no second weight is allocated or initialised.
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, backend=backend, name=name, **fields)
        layer._share_base(linear)
        layer.reset_factors(generator)
        return layer

    # --- factors, sparsity and threshold ------------------------------------------------------

    def _master_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    @builds_state  # the factors train later: never inference tensors (ops/_guards.py)
    @torch.no_grad()
    def reset_factors(self, generator: Optional[torch.Generator] = None) -> None:
        """The paper's initialisation: U, A ~ N(0, 1); V, B, R, C = 0 (so βUV = 0, AB = 0)."""
        n, k, device, dtype = self.out_features, self.in_features, self.weight.device, self._master_dtype()

        def normal(*shape):
            if generator is None or device.type == "meta":
                return torch.randn(*shape, dtype=dtype, device=device)
            return torch.randn(*shape, dtype=dtype, generator=generator, device=generator.device).to(device)

        values = dict(
            U=normal(n, self.r2), V=torch.zeros(self.r2, k, dtype=dtype, device=device),
            A=normal(n, self.r1), B=torch.zeros(self.r1, k, dtype=dtype, device=device),
            R=torch.zeros(n, 1, dtype=dtype, device=device), C=torch.zeros(1, k, dtype=dtype, device=device),
        )
        for label, value in values.items():
            setattr(self, label, nn.Parameter(value))
        self._step_cache = None

    def factors(self) -> tuple[Tensor, ...]:
        return self._tensors()[1:]

    def _tensors(self) -> tuple[Tensor, ...]:
        """(W0, U, V, A, B, R, C), read from ``_parameters`` directly: ``nn.Module.__getattr__``
        costs ~0.4 µs a name (a step read 17 of them, ~5% of a 64x64 step)."""
        held = self._parameters
        try:
            return held["weight"], held["U"], held["V"], held["A"], held["B"], held["R"], held["C"]
        except KeyError:  # a name held elsewhere (e.g. a parametrization): through getattr
            return (self.weight,) + tuple(getattr(self, label) for label in _FACTORS)

    def set_sparsity(self, sparsity: float) -> None:
        """The sparsity the mask applies from the next forward on (0 <= sparsity < 1)."""
        self.sparsity = _check_sparsity(sparsity)

    @property
    def kept(self) -> int:
        """v: how many entries of the weight the mask keeps at the current sparsity."""
        return keep_count(self.weight.numel(), self.sparsity)

    def invalidate_threshold(self) -> None:
        """Forget the cached threshold (needed only after replacing a factor's ``.data`` by hand;
        in-place updates and optimizer steps are seen, see :meth:`threshold`)."""
        self._step_cache = None

    def _state_key(self, tensors: tuple) -> tuple:
        """What the threshold and the kept mask depend on: the options, the optimizer steps and
        each of W0, U, V, A, B, R, C's version counter, storage, dtype and device. Written out
        (no per-tensor tuples): ~1.7 µs a forward, against ~6.3 µs before (a 64x64 step: ~150)."""
        w, U, V, A, B, R, C = tensors
        try:
            return (
                self.sparsity, self.beta, self.alpha1, self.alpha2, self.backend, optimizer_steps(), KEEP_MASK_ENTRIES,
                w._version, w.data_ptr(), w.dtype, w.device, U._version, U.data_ptr(), U.dtype, U.device,
                V._version, V.data_ptr(), V.dtype, V.device, A._version, A.data_ptr(), A.dtype, A.device,
                B._version, B.data_ptr(), B.dtype, B.device, R._version, R.data_ptr(), R.dtype, R.device,
                C._version, C.data_ptr(), C.dtype, C.device,
            )
        except RuntimeError:
            # An inference tensor (e.g. a W0 made under inference_mode) has no version counter, a
            # tensor subclass without storage no data pointer: a key equal to nothing, so the
            # threshold is made at each forward.
            return (object(),)

    def _step_state(self, tensors: tuple) -> _StepCache:
        """The cache for the current options and tensors, made again when the key changed. Making
        it checks the layer's own tensors (``pst_threshold``: shapes, dtypes, devices, backend), so
        a forward checks only x and the bias while nothing of the layer changed."""
        key = self._state_key(tensors)
        cache = self._step_cache
        if cache is None or cache.key != key:
            weight = tensors[0]
            with torch.inference_mode(False):
                threshold = pst_threshold(
                    *tensors, self.sparsity, beta=self.beta, alpha1=self.alpha1, alpha2=self.alpha2,
                    backend=self.backend,
                )
            reference = all(resolve_backend(op, self.backend, weight.device) == "reference" for op in _OPS)
            cache = self._step_cache = _StepCache(key, threshold, reference)
        return cache

    def threshold(self) -> Tensor:
        """The top-v threshold for the current sparsity and factors, computed at most once per
        change of either (so once per optimizer step, whatever the gradient accumulation).

        A change is seen through the version counters (in-place updates, foreach/for-loop
        optimizers) and through a count of optimizer steps: fused optimizers (torch's
        ``AdamW(fused=True)``, the transformers Trainer's default) update the factors without
        bumping their version counters, and a mask kept from step 0 would never follow training.
        The merged layers count gradients for the same reason (base.py), which is right for an
        O(nnz) re-sync; here a recomputation is several passes over the n x k scores, so counting
        steps keeps it once per step under gradient accumulation (3 micro-batches: 1 threshold,
        not 3). The threshold is made outside inference mode, so one evaluation under
        ``torch.inference_mode`` does not leave an inference tensor that the next training
        forward would have to save for backward."""
        return self._step_state(self._tensors()).threshold

    def _kept_mask(self, cache: _StepCache, tensors: tuple) -> Optional[Tensor]:
        """M for the cache's threshold as 0/1 floats when this layer keeps it (a weight of at most
        ``KEEP_MASK_ENTRIES`` on the reference backend), made once per threshold by the
        reference's export op (the same score and tie rule as its step, so the same mask), else
        None."""
        if cache.mask is _StepCache.UNSET:
            weight, *factors = tensors
            mask = None
            if weight.numel() <= KEEP_MASK_ENTRIES and cache.reference:
                with torch.no_grad(), torch.inference_mode(False):
                    _, kept = _pst_dense_op(weight, *(t.detach() for t in factors), cache.threshold, self.beta,
                                            self.alpha1, self.alpha2, "reference")
                    mask = kept.to(naive.accumulate_dtype(*tensors))
            cache.mask = mask
        return cache.mask

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # The cache's key (version counters, inference flags) cannot be traced: a compiled graph
            # computes the threshold itself, one custom op (no graph break, no host sync).
            threshold = pst_threshold(
                self.weight, *self.factors(), self.sparsity, beta=self.beta, alpha1=self.alpha1,
                alpha2=self.alpha2, backend=self.backend,
            )
            return pst_linear(
                x, self.weight, *self.factors(), self.bias, threshold=threshold, beta=self.beta,
                alpha1=self.alpha1, alpha2=self.alpha2, abs_score_grad=self.abs_score_grad, backend=self.backend,
            )
        tensors = self._tensors()
        bias = self._parameters["bias"] if "bias" in self._parameters else self.bias
        # x and the bias are checked (and cast under autocast) before anything is computed or
        # cached; the layer's own tensors were checked when the cache was made (the same values,
        # storage, dtypes and devices since: its key).
        x, bias = _check_input(x, tensors[0], bias, self.layer_name)
        cache = self._step_state(tensors)
        kept_mask = self._kept_mask(cache, tensors)
        if cache.reference and runs_eagerly(x, *tensors, bias):
            # The lean path: no second check of the layer's tensors and no custom op wrapper
            # (ops/_eager.py): 16-21 µs a step less than through pst_linear at 64x64, 16 tokens (a
            # step of ~100 µs there), the same ops and results.
            return _EagerPstLinear.apply(
                x, *tensors, bias, cache.threshold, self.beta, self.alpha1, self.alpha2, self.abs_score_grad,
                self.backend, {"kept_mask": kept_mask},
            )
        return pst_linear(
            x, *tensors, bias, threshold=cache.threshold, beta=self.beta, alpha1=self.alpha1, alpha2=self.alpha2,
            abs_score_grad=self.abs_score_grad, backend=self.backend, _kept_mask=kept_mask,
        )

    # --- export -------------------------------------------------------------------------------

    @torch.no_grad()
    def _dense(self) -> tuple[Tensor, Tensor]:
        effective, mask = _pst_dense_op(
            self.weight, *(t.detach() for t in self.factors()), self.threshold(), self.beta, self.alpha1,
            self.alpha2, self.backend,
        )
        return torch.where(mask, effective, 0.0).to(self.weight.dtype), mask

    def mask(self) -> Tensor:
        """M as a bool [n, k] tensor (an n x k allocation: for inspection and export)."""
        return self._dense()[1]

    def masked_weight(self) -> Tensor:
        """``(W0 + βUV) ⊙ M`` in W0's dtype (a new n x k tensor)."""
        return self._dense()[0]

    @staticmethod
    def _report(sparsity: float, weight: Tensor, mask: Tensor) -> dict:
        numel = mask.numel()
        kept, nonzero = int(mask.sum()), int(weight.count_nonzero())
        return dict(
            target_sparsity=sparsity, numel=numel, kept=kept, mask_sparsity=1.0 - kept / numel if numel else 0.0,
            nonzero=nonzero, weight_sparsity=1.0 - nonzero / numel if numel else 0.0,
        )

    def sparsity_report(self) -> dict:
        """What the export holds: ``kept`` (entries of the mask; exactly v), ``mask_sparsity``
        (1 - kept / numel), ``nonzero`` and ``weight_sparsity`` (of the exported weight: a kept
        entry can still be 0, e.g. a W_eff that rounds to 0 in W0's dtype)."""
        return self._report(self.sparsity, *self._dense())

    def to_linear(self, *, return_report: bool = False):
        """A plain ``nn.Linear`` holding ``(W0 + βUV) ⊙ M`` in W0's dtype (new tensors; this layer
        is unchanged), and with ``return_report=True`` also its :meth:`sparsity_report`."""
        weight, mask = self._dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=self.weight.dtype)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return (linear, self._report(self.sparsity, weight, mask)) if return_report else linear

    # --- state dict, dtype and device ---------------------------------------------------------

    def get_extra_state(self) -> dict:
        return dict(sparsity=self.sparsity, beta=self.beta, alpha1=self.alpha1, alpha2=self.alpha2,
                    abs_score_grad=self.abs_score_grad)

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not {"sparsity", "beta", "alpha1", "alpha2"} <= set(state):
            raise ValueError(f"{self.layer_name}: the extra state must hold sparsity, beta, alpha1 and alpha2")
        sparsity = _check_sparsity(state["sparsity"])
        self.beta, self.alpha1, self.alpha2 = _check_scalars(state["beta"], state["alpha1"], state["alpha2"], self.layer_name)
        self.abs_score_grad = bool(state.get("abs_score_grad", self.abs_score_grad))
        self.sparsity = sparsity
        self._step_cache = None

    def _after_apply(self) -> None:
        self._step_cache = None

    # --- the position-kind protocol ---------------------------------------------------------

    def trainable_tensors(self) -> dict:
        return dict(zip(_FACTORS, self.factors()))

    def options(self) -> dict:
        return dict(r1=self.r1, r2=self.r2, **self.get_extra_state())

    @classmethod
    def serves(cls, config) -> bool:
        return config.method == "pst"

    @classmethod
    def options_from_config(cls, config) -> dict:
        """At sparsity 0 (the converted model computes what the original did; a training loop
        raises it with set_pst_sparsity), the factors drawn from one generator seeded with
        ``config.seed`` in target order."""
        r1, r2 = config.pst_ranks
        return dict(sparsity=0.0, r1=r1, r2=r2, generator=torch.Generator().manual_seed(config.seed))

    @classmethod
    def select_positions(cls, selection) -> dict:
        selection.takes_no_scoring_options()
        return {name: None for name in selection.targets}  # data-free: no positions to choose

    def adapter_payload(self) -> AdapterPayload:
        values = {label: factor.detach() for label, factor in zip(_FACTORS, self.factors())}
        count = sum(factor.numel() for factor in values.values())
        return AdapterPayload(values, {}, {"count": count, "index": None, "pst": self.options()})

    @classmethod
    def read_adapter_payload(cls, where, name, entry, tensors, shape):
        n, k = shape
        options = entry.get("pst")
        required = {"r1", "r2", "sparsity", "beta", "alpha1", "alpha2", "abs_score_grad"}
        if not isinstance(options, dict) or set(options) != required:
            raise ValueError(f"{where}: a pst layer's metadata must hold {sorted(required)}, got {options!r}")
        r1, r2 = options["r1"], options["r2"]
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in (r1, r2)):
            raise ValueError(f"{where}: bad ranks r1={r1!r}, r2={r2!r}")
        try:  # the layer's own checks of the sparsity and the scalars
            _check_sparsity(options["sparsity"])
            _check_scalars(options["beta"], options["alpha1"], options["alpha2"], where)
        except ValueError as error:
            raise ValueError(f"{where}: bad pst options: {error}") from None
        if not isinstance(options["abs_score_grad"], bool):
            raise ValueError(f"{where}: abs_score_grad must be a bool")
        if entry["count"] != (n + k) * (r1 + r2 + 1) or entry["index"] is not None:
            raise ValueError(f"{where}: a pst layer of shape {[n, k]} with r1={r1}, r2={r2} has {(n + k) * (r1 + r2 + 1)} values")
        shapes = dict(U=(n, r2), V=(r2, k), A=(n, r1), B=(r1, k), R=(n, 1), C=(1, k))
        values = take_tensors(where, name, tensors, _FACTORS)
        for label, value in values.items():
            expect_tensor(f"{name}.{label}", value, VALUE_DTYPES, shapes[label])
        return None, values, dict(options), {f"{name}.{label}" for label in _FACTORS}

    @classmethod
    def config_for(cls, layers: list) -> dict:
        """The first layer's ranks, the highest sparsity."""
        return {"method": "pst", "sparsity": max(layer.sparsity for layer in layers), "pst_r1": layers[0].r1,
                "pst_r2": layers[0].r2}

    def export(self):
        return self.to_linear(return_report=True)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r1={self.r1}, r2={self.r2}, sparsity={self.sparsity:.4g}, "
            f"beta={self.beta:g}, alpha1={self.alpha1:g}, alpha2={self.alpha2:g}, backend={self.backend}"
        )


def _check_ranks(r1, r2, layer_name: str) -> None:
    for label, rank in (("r1", r1), ("r2", r2)):
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise ValueError(f"{layer_name}: {label} must be an integer >= 0, got {rank!r}")


def _options(positions, options: dict, layer_name: str) -> dict:
    """``from_linear``'s PST options as keywords of ``PSTLinear``: from a ``PSTOptions``, or a
    sparsity and option keywords."""
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"PSTLinear.from_linear got unexpected options {unknown}")
    if isinstance(positions, PSTOptions):
        if options:
            raise TypeError(f"{layer_name}: give PSTOptions or option keywords, not both")
        return dataclasses.asdict(positions)
    if positions is not None:
        if "sparsity" in options:
            raise TypeError(f"{layer_name}: sparsity given twice")
        options = dict(options, sparsity=positions)
    return dataclasses.asdict(PSTOptions(**options))
