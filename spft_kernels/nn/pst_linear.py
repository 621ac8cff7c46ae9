"""``PSTLinear``: the PST layer (prune a frozen W0 while training small factors); the math, the
ops and the backends are in ``ops/pst_linear.py``."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn as nn

from ..ops._guards import builds_state
from ..ops.backends import check_backend_name
from ..ops.pst_linear import (
    _check_scalars,
    _check_sparsity,
    _FACTORS,
    keep_count,
    _pst_dense_op,
    pst_linear,
    pst_threshold,
)
from .base import _check_sizes

Tensor = torch.Tensor

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


def _tensor_key(t: Tensor) -> tuple:
    # An inference tensor (a layer built under inference_mode) has no version counter: never equal.
    version = object() if t.is_inference() else t._version
    return (version, t.data_ptr(), t.dtype, t.device)


class PSTLinear(nn.Linear):
    """A drop-in ``nn.Linear`` that prunes its frozen weight W0 to ``sparsity`` while training
    only U, V, A, B, R, C (``(n + k)(r1 + r2 + 1)`` values, fp32 masters):
    ``y = x ((W0 + βUV) ⊙ M)ᵀ + b``, M the top-v mask of ``|W0 + βUV| + α1·AB + α2·(R + C)``.

    A training loop calls ``layer.set_sparsity(spft.cubic_sparsity(step, ...))`` each step; the
    threshold is recomputed only when the sparsity or a factor changed. ``to_linear()`` exports
    the pruned weight as a plain ``nn.Linear``; ``sparsity_report()`` says what it holds.
    The state dict holds W0, bias, the factors and (extra state) sparsity, β, α1, α2.
    """

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
        for label, rank in (("r1", r1), ("r2", r2)):
            if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
                raise ValueError(f"{layer_name}: {label} must be an integer >= 0, got {rank!r}")
        sizes = _check_sizes(in_features, out_features, layer_name)
        super().__init__(*sizes, bias=bias, device=device, dtype=dtype)
        self.layer_name = layer_name
        self.r1, self.r2 = int(r1), int(r2)
        self.beta, self.alpha1, self.alpha2 = _check_scalars(beta, alpha1, alpha2, layer_name)
        self.abs_score_grad = bool(abs_score_grad)
        self.backend = check_backend_name(backend)
        self.sparsity = _check_sparsity(sparsity)
        self._threshold_cache: Optional[tuple] = None
        _watch_optimizer_steps()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_factors(generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparsity: float,
        r1: int = 8,
        r2: int = 8,
        *,
        beta: float = 1.0,
        alpha1: float = 1.0,
        alpha2: float = 1.0,
        abs_score_grad: bool = True,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        name: Optional[str] = None,
    ) -> "PSTLinear":
        """Wrap ``linear`` without copying its weight (shared and frozen, as is its bias); the
        layer starts as ``W0 ⊙ M`` with M the top-v mask of ``|W0|`` at ``sparsity``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError(f"{name or 'PSTLinear'}: the linear's weight is on the meta device; materialise it first")
        # Built on the meta device, so no second weight is allocated or initialised.
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
            dtype=linear.weight.dtype, sparsity=sparsity, r1=r1, r2=r2, beta=beta, alpha1=alpha1, alpha2=alpha2,
            abs_score_grad=abs_score_grad, backend=backend, name=name,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
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
        self._threshold_cache = None

    def factors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, label) for label in _FACTORS)

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
        self._threshold_cache = None

    def _threshold_key(self) -> tuple:
        tensors = (self.weight,) + self.factors()
        return (self.sparsity, self.beta, self.alpha1, self.alpha2, self.backend, optimizer_steps()) + tuple(
            _tensor_key(t) for t in tensors
        )

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
        key = self._threshold_key()
        if self._threshold_cache is None or self._threshold_cache[0] != key:
            with torch.inference_mode(False):
                value = pst_threshold(
                    self.weight, *self.factors(), self.sparsity, beta=self.beta, alpha1=self.alpha1,
                    alpha2=self.alpha2, backend=self.backend,
                )
            self._threshold_cache = (key, value)
        return self._threshold_cache[1]

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # The cache's key (version counters, inference flags) cannot be traced: a compiled graph
            # computes the threshold itself, one custom op (no graph break, no host sync).
            threshold = pst_threshold(
                self.weight, *self.factors(), self.sparsity, beta=self.beta, alpha1=self.alpha1,
                alpha2=self.alpha2, backend=self.backend,
            )
        else:
            threshold = self.threshold()
        return pst_linear(
            x, self.weight, *self.factors(), self.bias, threshold=threshold, beta=self.beta,
            alpha1=self.alpha1, alpha2=self.alpha2, abs_score_grad=self.abs_score_grad, backend=self.backend,
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
        self._threshold_cache = None

    def _apply(self, fn, recurse=True):
        # A cast of the module to bf16/fp16 must not round the fp32 masters: keep their values
        # and move them to the new device in the master dtype instead.
        before = {label: (p.data, p.grad) for label, p in self._parameters.items() if label in _FACTORS}
        super()._apply(fn, recurse)
        master = self._master_dtype()
        for label, (values, grad) in before.items():
            parameter = self._parameters[label]
            if parameter.dtype != master:
                parameter.data = values.to(device=parameter.device, dtype=master)
                parameter.grad = None if grad is None else grad.to(device=parameter.device, dtype=master)
        self._threshold_cache = None
        return self

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r1={self.r1}, r2={self.r2}, sparsity={self.sparsity:.4g}, "
            f"beta={self.beta:g}, alpha1={self.alpha1:g}, alpha2={self.alpha2:g}, backend={self.backend}"
        )
