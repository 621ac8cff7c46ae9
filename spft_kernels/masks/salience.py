"""Salience scores for choosing which weight entries to train (SPEFT, arXiv 2412.13488).

``salience_scores(model, batches, loss_fn, metric)`` returns ``{module_name: score[out, in]}``
(fp32, on the weight's device) for every targeted linear layer; ``select_topk`` (select.py) keeps
the top entries. θ is a target's *effective* weight (``W0 + Δ`` for a ``SparseDeltaLinear``) and
``g = ∂ℓ/∂θ`` is averaged over the calibration batches (``g = mean_b ∇ℓ_b``). Higher means "train
this entry" for every metric:

==============  ================================================================================
``magnitude``   ``|θ|`` (data-free)
``gradient``    ``|g|``; the paper writes ``∂ℓ/∂θ``, its code ranks the magnitude of the averaged
                gradient, as here (the absolute value is taken after averaging)
``snip``        ``|g ⊙ θ|``
``force``       ``−g ⊙ θ``
``taylor_fo``   ``(g ⊙ θ)²``
``synflow``     ``|∂R/∂θ ⊙ θ| / R`` with ``R = 1ᵀ(Π_l |θ_l|)1`` (data-free; construction below)
``grasp``       ``(H g) ⊙ θ`` with ``H`` the Hessian of the mean loss w.r.t. the target weights;
                sign convention below
``fisher``      ``mean_e (∂ℓ_e/∂θ)²`` over single examples ``e`` (per-example gradients)
``random``      uniform in [0, 1): SpaRTA's random mask through the same selection
==============  ================================================================================

Contracts
---------
- ``batches``: an iterable of batches (a list, a DataLoader); ``loss_fn(model, batch)`` returns a
  scalar loss tensor. ``num_batches`` caps how many are used (SPEFT's default is 64 steps of
  batch 16 = 1024 examples). ``grasp`` reads the batches twice, so they must be re-iterable.
- ``fisher`` splits batches into examples: a batch is a tensor or a (nested) dict/list/tuple whose
  tensors all share the leading batch dimension B (0-d tensors and non-tensor leaves are passed to
  every example unchanged); example ``e`` is the same structure sliced to ``[e:e+1]`` and
  ``ℓ_e = loss_fn(model, example_e)``.
- The model's train/eval mode is left as it is (call ``model.eval()`` for scores without dropout).
  Non-target parameters are frozen while scoring and every ``requires_grad`` flag and existing
  ``.grad`` is restored afterwards; the weights are restored bitwise (SparseDeltaLinear layers are
  merged for scoring, O(nnz), and unmerged again if they were not merged).

Memory (first-order metrics)
----------------------------
Each target weight gets one fp32 score buffer. A ``register_post_accumulate_grad_hook`` on every
target weight adds its gradient into that buffer as soon as autograd produces it and frees it, so
the peak is the model + the scores + one layer's gradient + activations, never every target's
gradient at once; the final transform (``|g|``, ``|g ⊙ θ|``, …) runs in place on the buffer.
Measured with ``TensorMemoryTracker`` on the CPU (test_salience.py: a Llama of hidden size 64 with
4 blocks in fp32, 2 batches of 2 × 8 tokens; model 624,896 B of which 589,824 B are target
weights): the hook-based pass peaks 879,048 B above the model = the 589,824 B of scores + 289,224 B
for one forward/backward (activations and the one transient layer gradient, largest 32,768 B);
the naive loop that lets ``.grad`` accumulate peaks 1,179,648 B above the model = the scores + all
589,824 B of target gradients at once.

Where the scores live: ``score_device`` (default: each weight's device) and ``score_dtype``
(default fp32) say where the per-target score buffers are kept. At 7B the fp32 scores are 24.1
GiB, more than the bf16 model (12.6 GiB): on the accelerator the gradient metric peaked at 39.5
GiB with one 1 x 512 batch, above the training step it prepares for. ``score_device="cpu"`` keeps
them in host memory: each layer's gradient is copied there as it arrives (then freed), so the
device holds the model, the activations and one layer's gradient, below a training step (no
optimizer state, no trainable copies); ``spft-bench --memory`` reports both peaks. A bf16
``score_dtype`` halves the buffers; each batch's gradient is then rounded once into the bf16 sum
(~3 significant digits: enough to rank entries, not for exact scores). The first-order metrics
and ``fisher`` honour both options; ``grasp`` and ``synflow`` keep fp32 scores on the weights'
devices.

- ``fisher`` (``fisher_mode="vmap"``) holds ``chunk × all target weights`` per-example gradients
  (``fisher_chunk_size``); ``fisher_mode="loop"`` runs one backward per example with the same
  hooks (one layer's gradient at a time). ``"auto"`` tries vmap and falls back to the loop (with a
  warning) for models that vmap cannot trace (e.g. BERT's mask code calls ``.item()``).
- ``grasp`` needs the whole target gradient with its graph once per batch (double backward), plus
  a second fp32 buffer per target for ``H g``.
- ``synflow`` needs one ``|W|`` temporary of the current layer.

SynFlow construction
--------------------
SynFlow's network is the chain of the target linears in ``named_modules`` order (registration
order: in Hugging Face blocks, attention projections, output projection, then the MLP), each
computing ``|W| x`` with biases and everything else (embeddings, LayerNorm, attention softmax,
activations, residuals) left out, fed with an all-ones input. Where the output width of one layer
differs from the input width of the next, the flow is passed on uniformly (an all-ones
connector), so parallel projections (q/k/v, gate/up) become consecutive links of the chain: a
well-defined linear path, not the transformer's exact data flow, which has no linear version. On a plain MLP of ``nn.Linear`` layers this is exactly SynFlow:
``R = 1ᵀ|W_L|…|W_1|1``. Each layer's score is ``|W_l| ⊙ a_l b_lᵀ / R`` where ``b_l`` is the flow
into its inputs and ``a_l`` the flow back from the output; the vectors are renormalised after each
layer (in fp64) and the division by ``R`` makes the result scale-free, so deep models do not
overflow. Dividing every layer by the same ``R`` keeps the global ranking; each layer's scores sum
to 1 (SynFlow's conservation law). The model is only read, never modified.

GRaSP sign convention
---------------------
The paper lists GRaSP as ``−(H g) ⊙ θ``: the score ``S(−θ)`` of Wang et al., whose *largest*
entries GRaSP removes. Here higher always means "keep", so the score is ``(H g) ⊙ θ = −S(−θ)``,
as in the SPEFT authors' code. ``H g`` is a Hessian-vector product by double backward, with ``H``
the Hessian of the mean loss with respect to the target weights (the other parameters are
frozen). Fused scaled-dot-product attention kernels are not twice differentiable, so the second
pass runs under the math SDPA backend.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..nn.registry import is_spft_layer
from ..ops._guards import as_int, describe
from . import quantized_scores
from .progress import progress_bar
from .targets import check_gradients_possible, check_materialised, TargetModules, find_target_linears

Tensor = torch.Tensor

METRICS = ("magnitude", "gradient", "snip", "force", "taylor_fo", "synflow", "grasp", "fisher", "random")
DATA_FREE_METRICS = ("magnitude", "synflow", "random")
FISHER_MODES = ("auto", "vmap", "loop")

# In-place transforms of the fp32 buffer holding the summed gradient (n batches) into the score.
_FIRST_ORDER = {
    "gradient": lambda s, w, n: s.div_(n).abs_(),
    "snip": lambda s, w, n: s.div_(n).mul_(w).abs_(),
    "force": lambda s, w, n: s.div_(-n).mul_(w),
    "taylor_fo": lambda s, w, n: s.div_(n).mul_(w).square_(),
}


def salience_scores(
    model: nn.Module,
    batches: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    metric: str = "gradient",
    *,
    target_modules: TargetModules = None,
    exclude_attention: bool = False,
    num_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
    fisher_mode: str = "auto",
    fisher_chunk_size: Optional[int] = None,
    score_device=None,
    score_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """``{module_name: score[out, in]}`` (fp32, on each weight's device) for the targeted linears.

    Args:
        model: a plain model (``nn.Linear`` targets) or one already converted
            (``SparseDeltaLinear`` targets, scored at ``W0 + Δ``).
        batches, loss_fn: calibration data and ``loss_fn(model, batch) -> scalar``; required by
            the data metrics, ignored by ``magnitude``, ``synflow`` and ``random``.
        metric: one of ``METRICS`` (see the module docstring for the definitions).
        target_modules, exclude_attention: which linears, as in ``find_target_linears`` (default:
            every ``nn.Linear`` inside the transformer blocks).
        num_batches: use at most this many batches (``None``: all).
        progress: a tqdm bar over calibration steps; default (``None``): when stderr is a terminal or
            in a notebook, after 2 s, unless ``SPFT_PROGRESS=0`` (``masks/progress.py``).
        generator: the random generator of ``metric="random"`` (scores are drawn on its device).
        fisher_mode: ``"vmap"`` (torch.func per-example gradients), ``"loop"`` (one backward per
            example, lean) or ``"auto"`` (vmap, falling back to the loop when it cannot trace).
        fisher_chunk_size: examples per vmap call (``None``: the whole batch).
        score_device: where the score buffers live (``None``: each weight's device; ``"cpu"``
            keeps them off the accelerator, see "Where the scores live").
        score_dtype: the scores' dtype (fp32; ``torch.bfloat16`` halves them).

    Raises ``ValueError`` for an unknown metric or option, missing or empty batches, a loss that
    is not a scalar depending on the target weights, and batches Fisher cannot split.
    """
    if metric not in METRICS:
        raise ValueError(f"salience_scores: unknown metric {metric!r}; choose one of {METRICS}")
    if fisher_mode not in FISHER_MODES:
        raise ValueError(f"salience_scores: unknown fisher_mode {fisher_mode!r}; choose one of {FISHER_MODES}")
    _check_positive_int("num_batches", num_batches)
    _check_positive_int("fisher_chunk_size", fisher_chunk_size)
    if metric not in DATA_FREE_METRICS:
        check_gradients_possible("salience_scores", metric)
        if batches is None:
            raise ValueError(f"salience_scores: metric {metric!r} needs calibration batches")
        if not callable(loss_fn):
            raise ValueError(f"salience_scores: metric {metric!r} needs loss_fn(model, batch) -> scalar loss")
        if metric == "grasp" and iter(batches) is batches:
            raise ValueError(
                "salience_scores: metric 'grasp' reads the batches twice; pass a list or a DataLoader, "
                "not a one-shot iterator"
            )
    if not isinstance(score_dtype, torch.dtype) or not score_dtype.is_floating_point:
        raise ValueError(f"salience_scores: score_dtype must be a floating-point torch.dtype, got {score_dtype!r}")
    placement = _ScorePlacement(None if score_device is None else torch.device(score_device), score_dtype)
    targets = find_target_linears(model, target_modules, exclude_attention=exclude_attention)
    check_materialised("salience_scores", targets)
    if quantized_scores.quantized_targets(targets):
        calibration = _Calibration(batches, loss_fn, num_batches, progress, metric)
        return _quantized_salience(model, targets, metric, calibration, placement, generator)

    with _effective_weights(targets) as weights:
        if metric == "magnitude":
            return {name: w.detach().to(torch.float32, copy=True).abs_() for name, w in weights.items()}
        if metric == "random":
            return {name: _uniform(w, generator) for name, w in weights.items()}
        if metric == "synflow":
            return _synflow(weights)
        calibration = _Calibration(batches, loss_fn, num_batches, progress, metric)
        with _only_these_trainable(model, weights):
            if metric in _FIRST_ORDER:
                scores, count = calibration.gradient_sums(model, weights, placement)
                for name, w in weights.items():
                    theta = None if metric == "gradient" else placement.weight_for(scores[name], w)
                    _FIRST_ORDER[metric](scores[name], theta, count)
                return scores
            if metric == "grasp":
                return calibration.grasp(model, weights)
            return calibration.fisher(model, weights, fisher_mode, fisher_chunk_size, placement)


def _quantized_salience(model, targets, metric, calibration, placement, generator) -> dict[str, Tensor]:
    """salience_scores over targets with a quantized base (masks/quantized_scores.py): gradients
    from x and dy, W0 read in bands of rows; fp32 scores placed as the dense path's."""
    check = quantized_scores.check_metric
    check("salience_scores", metric, quantized_scores.SALIENCE_METRICS, quantized_scores.quantized_targets(targets))
    if metric == "magnitude":
        return {name: quantized_scores.magnitude(module) for name, module in targets.items()}
    if metric == "random":
        return {name: _uniform(torch.empty(module.out_features, module.in_features, device="meta"), generator,
                               module.weight.device) for name, module in targets.items()}

    def zeros(module):
        return torch.zeros(module.out_features, module.in_features, dtype=placement.dtype,
                           device=placement.device or module.weight.device)

    def losses():
        return (calibration.loss(model, batch) for batch in calibration.iterate(f"salience ({metric})"))

    sums, count = quantized_scores.gradient_sums(targets, losses, zeros, placement.add, _only_these_trainable(model, {}))
    for name, module in targets.items():
        if metric == "gradient":
            _FIRST_ORDER[metric](sums[name], None, count)
        else:
            quantized_scores.multiply_by_weight_(sums[name], module, lambda band, w: _FIRST_ORDER[metric](band, w, count))
    return sums


def _check_positive_int(name: str, value) -> None:
    if value is not None and (as_int(value) is None or as_int(value) < 1):
        raise ValueError(f"salience_scores: {name} must be a positive integer or None, got {describe(value)}")


def _uniform(weight: Tensor, generator: Optional[torch.Generator], where: Optional[torch.device] = None) -> Tensor:
    where = weight.device if where is None else where
    device = where if generator is None else generator.device
    return torch.rand(weight.shape, generator=generator, device=device, dtype=torch.float32).to(where)


# --- the weights being scored ---------------------------------------------------------------


@contextlib.contextmanager
def _effective_weights(targets: Mapping[str, nn.Module]):
    """Yields ``{name: weight parameter}`` holding each target's effective weight.

    A converted layer runs as a plain dense linear on its effective weight while scored
    (``SpftLayer.as_plain_linear``: a delta layer merges, O(positions)), so autograd (double
    backward, vmap included) sees an ordinary weight; on exit each layer is put back as it was.
    """
    seen: dict[int, str] = {}
    with contextlib.ExitStack() as stack:
        for name, module in targets.items():
            if id(module.weight) in seen:
                raise ValueError(f"salience_scores: {name} shares its weight with {seen[id(module.weight)]}")
            seen[id(module.weight)] = name
            if is_spft_layer(module):
                stack.enter_context(module.as_plain_linear())
        yield {name: module.weight for name, module in targets.items()}


@contextlib.contextmanager
def _only_these_trainable(model: nn.Module, weights: Mapping[str, Tensor]):
    """Only the target weights require grad inside (with no stale ``.grad``); every flag and
    ``.grad`` is put back on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stashed = [(w, w.grad) for w in weights.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for w, grad in stashed:
            w.grad = grad


@contextlib.contextmanager
def _grad_hooks(weights: Mapping[str, Tensor], consume: Callable[[str, Tensor], None]):
    """Hands each target's gradient to ``consume(name, grad)`` as soon as autograd accumulates it,
    then frees it, so that one layer's gradient is alive at a time."""

    def hook_for(name):
        def hook(param):
            consume(name, param.grad)
            param.grad = None

        return hook

    handles = [w.register_post_accumulate_grad_hook(hook_for(name)) for name, w in weights.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zeros_like_fp32(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _ScorePlacement(None, torch.float32).zeros(weights)


class _ScorePlacement:
    """Where the score buffers live (``device``: None means each weight's own) and their dtype."""

    def __init__(self, device: Optional[torch.device], dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def zeros(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: torch.zeros(w.shape, dtype=self.dtype, device=self.device or w.device) for name, w in weights.items()
        }

    def weight_for(self, score: Tensor, weight: Tensor) -> Tensor:
        """θ for the in-place transforms, on the score's device (a host copy of one layer at a time)."""
        return weight.detach().to(score.device)

    @staticmethod
    def add(total: Tensor, grad: Tensor) -> None:
        # One rounding into the buffer's dtype; a gradient on another device is copied there (and
        # freed with the hook's reference), never kept twice on the accelerator.
        total.add_(grad.to(device=total.device, dtype=total.dtype) if grad.device != total.device else grad)

    @staticmethod
    def add_square(total: Tensor, grad: Tensor) -> None:
        grad = grad.to(device=total.device, dtype=torch.float32)
        total.addcmul_(grad, grad)


# --- data metrics ---------------------------------------------------------------------------


class _Calibration:
    """Iterates the calibration batches (with the progress bar) for the data metrics."""

    def __init__(self, batches, loss_fn, num_batches, progress, metric):
        self.batches, self.loss_fn, self.num_batches = batches, loss_fn, num_batches
        self.progress, self.metric = progress, metric

    def iterate(self, desc: str):
        total = self.num_batches
        if hasattr(self.batches, "__len__"):
            total = len(self.batches) if total is None else min(total, len(self.batches))
        batches = self.batches if self.num_batches is None else itertools.islice(self.batches, self.num_batches)
        count = 0
        for batch in progress_bar(batches, total=total, desc=desc, unit="batch", progress=self.progress):
            count += 1
            yield batch
        if count == 0:
            raise ValueError(f"salience_scores: metric {self.metric!r} got no batches (empty batches)")

    def loss(self, model, batch) -> Tensor:
        loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"salience_scores: loss_fn must return a scalar loss tensor, got {shape}")
        if loss.grad_fn is None:
            raise ValueError(
                "salience_scores: the loss does not depend on the target weights (did loss_fn run the "
                "model under torch.no_grad(), or detach the loss?)"
            )
        return loss.reshape(())

    def gradient_sums(self, model, weights, placement=None) -> tuple[dict[str, Tensor], int]:
        """``(Σ_b ∇ℓ_b per target (fp32 unless placed otherwise), number of batches)``."""
        placement = placement or _ScorePlacement(None, torch.float32)
        sums = placement.zeros(weights)
        count = 0
        with _grad_hooks(weights, lambda name, grad: placement.add(sums[name], grad)):
            for batch in self.iterate(f"salience ({self.metric})"):
                self.loss(model, batch).backward()
                count += 1
        return sums, count

    def grasp(self, model, weights) -> dict[str, Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mean_grad, count = self.gradient_sums(model, weights)
        for g in mean_grad.values():
            g.div_(count)
        hvp = _zeros_like_fp32(weights)
        params = list(weights.values())
        seen = 0
        with _grad_hooks(weights, lambda name, grad: hvp[name].add_(grad)), sdpa_kernel([SDPBackend.MATH]):
            for batch in self.iterate("salience (grasp: H g)"):
                grads = torch.autograd.grad(self.loss(model, batch), params, create_graph=True, allow_unused=True)
                # d/dθ <g_stop, ∇ℓ_b(θ)> = H_b g: one Hessian-vector product by double backward.
                inner = sum(
                    torch.dot(grad.reshape(-1), mean_grad[name].to(grad.dtype).reshape(-1))
                    for name, grad in zip(weights, grads)
                    if grad is not None
                )
                if isinstance(inner, Tensor) and inner.requires_grad:
                    inner.backward()
                seen += 1
        if seen != count:
            raise ValueError(
                f"salience_scores: grasp read {count} batches on the first pass but {seen} on the second; "
                "the batches must be the same on every iteration"
            )
        del mean_grad
        for name, w in weights.items():
            hvp[name].div_(seen).mul_(w.detach())
        return hvp

    def fisher(self, model, weights, mode: str, chunk_size: Optional[int], placement=None) -> dict[str, Tensor]:
        placement = placement or _ScorePlacement(None, torch.float32)
        scores = placement.zeros(weights)
        examples = 0
        with _grad_hooks(weights, lambda name, grad: placement.add_square(scores[name], grad)):
            for batch in self.iterate("salience (fisher)"):
                size = _batch_size(batch)
                if mode != "loop":
                    try:
                        per_example = _per_example_grads(model, self.loss_fn, weights, batch, chunk_size)
                    except Exception as error:  # noqa: BLE001 - any trace failure means "use the loop"
                        if mode == "vmap":
                            raise
                        warnings.warn(
                            f"salience_scores: torch.func.vmap cannot trace this model ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}); computing Fisher with one backward per example",
                            stacklevel=3,
                        )
                        mode = "loop"
                    else:
                        for name, grads in per_example.items():
                            placement.add(scores[name], grads.square_().sum(0))
                if mode == "loop":
                    for e in range(size):
                        example = tree_map(lambda t: t[e : e + 1] if _batched(t) else t, batch)
                        self.loss(model, example).backward()
                examples += size
        for score in scores.values():
            score.div_(examples)
        return scores


def _batched(leaf) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0


def _batch_size(batch) -> int:
    sizes = {leaf.shape[0] for leaf in tree_flatten(batch)[0] if _batched(leaf)}
    if len(sizes) != 1:
        raise ValueError(
            "salience_scores: fisher splits each batch into examples, so a batch must be a tensor or a "
            "dict/list/tuple of tensors sharing one leading batch dimension; got "
            + (f"leading dimensions {sorted(sizes)}" if sizes else f"no batched tensor in a {type(batch).__name__}")
        )
    return sizes.pop()


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can swap the model's
    weights for the tensors torch.func differentiates."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch).reshape(())


def _per_example_grads(model, loss_fn, weights, batch, chunk_size) -> dict[str, Tensor]:
    """``{name: [B, out, in]}``: ``∂ℓ_e/∂θ`` for every example by ``vmap(grad(functional_call))``."""
    from torch.func import functional_call, grad, vmap

    wrapper = _LossOf(model, loss_fn)
    keys = {name: f"model.{name}.weight" for name in weights}
    params = {keys[name]: w.detach() for name, w in weights.items()}

    def example_loss(params, example):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        return functional_call(wrapper, params, (one,))

    in_dims = tree_map(lambda leaf: 0 if _batched(leaf) else None, batch)
    with warnings.catch_warnings():
        # Ops without a batching rule (SDPA on the CPU) run per example: slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(example_loss), in_dims=(None, in_dims), randomness="different", chunk_size=chunk_size)(
            params, batch
        )
    return {name: grads[keys[name]] for name in weights}


# --- SynFlow --------------------------------------------------------------------------------


@torch.no_grad()
def _synflow(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SynFlow over the chain of target linears (construction in the module docstring)."""
    names = list(weights)
    shapes = [tuple(weights[name].shape) for name in names]

    def absolute(name):
        return weights[name].detach().to(torch.float32, copy=True).abs_()

    def normalised(v):
        top = v.max()
        return v / top if top > 0 else v

    def passed_on(flow, width, device):
        # Same width: the layers chain; otherwise the connector spreads the flow uniformly.
        if flow is not None and flow.numel() == width:
            return normalised(flow.to(device))
        return torch.ones(width, dtype=torch.float64, device=device)

    inputs, flow = [], None  # inputs[l] = b_l, the flow arriving at layer l's inputs
    for name, (out_f, in_f) in zip(names, shapes):
        device = weights[name].device
        b = passed_on(flow, in_f, device)
        inputs.append(b)
        flow = torch.mv(absolute(name), b.to(torch.float32)).double()
    scores: dict[str, Tensor] = {}
    back = None  # the flow from the output back to the current layer's outputs
    for position in reversed(range(len(names))):
        name, (out_f, in_f) = names[position], shapes[position]
        device = weights[name].device
        a = passed_on(back, out_f, device)
        score = absolute(name)
        back = torch.mv(score.t(), a.to(torch.float32)).double()
        total = torch.dot(back, inputs[position])  # R for this layer's (normalised) vectors
        score.mul_(a.to(torch.float32).unsqueeze(1)).mul_(inputs[position].to(torch.float32).unsqueeze(0))
        if total > 0:
            score.div_(total.to(torch.float32))
        scores[name] = score
    return {name: scores[name] for name in names}
