"""SPruFT's neuron importance: a score per output row of each targeted linear layer, and the
choice of the top-r rows per layer (the SPruFT paper, Sec. 4.2 and App. A).

Metrics, for row i of a weight W with entries w_j = W[i, j]:

- ``l2``: ``‖W[i]‖₂``; needs no data.
- ``taylor``: ``Σ_j |ḡ_j w_j|``, ``ḡ`` the mean over the batches of ``∂loss/∂W``: the paper's
  first-order Taylor estimate of the loss change when the neuron is removed (App. A).
- ``zo_taylor``: the same with ``ḡ`` estimated by n-SPSA as in MeZO: every batch is one
  calibration set and gets ``num_perturbations`` directions ``z ~ N(0, I)`` over the target
  weights; ``ḡ = mean of (L(θ+εz) − L(θ−εz)) / 2ε · z`` over all n·k estimates. Forward passes
  only, under ``torch.no_grad()``: no parameter gradient is ever allocated. (The paper writes
  Eq. 8 as ``|θᵀĝ|``; like its App. A Taylor score we sum ``|ĝ_j w_j|`` over the row, so that
  zo_taylor estimates exactly what taylor computes.) Only the target weights are perturbed: the
  estimator's variance grows with the number of perturbed weights (Property 4.2), so ranking
  quality needs n·k well above that number.
- ``qm_taylor``: class-aware Taylor (Eq. 6, 7): ``η_i^t = Σ_j |ḡ^t_j w_j|`` with ``ḡ^t`` the mean
  gradient of the per-example losses of the examples of class t; the score is the mean of the
  0%, 10%, …, 100% quantiles (linear interpolation) of ``η_i^t`` over the classes seen.
- ``random``: uniform random scores (the paper's baseline); top-r is then a uniformly random set.

Scores are fp32 (fp64 for fp64 weights) on the weight's device. Data metrics run the model in
eval mode (dropout would make ``L(θ+εz) − L(θ−εz)`` mostly noise) and restore every module's
train/eval flag, every parameter's ``requires_grad`` and the target weights' existing ``.grad``
afterwards. The weights are never written: zo_taylor perturbs a linear by adding
``±ε x zᵀ`` to its output in a forward hook, which equals the output of ``x (W ± εz)ᵀ`` and leaves
W bitwise untouched; an in-place ``W ± εz`` would need a saved copy of every target weight to be
undone exactly (``(w + εz) − εz ≠ w`` in floating point).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import naive
from ..ops._guards import as_float, as_int, describe
from . import quantized_scores
from .progress import progress_bar
from .select import warn_if_empty
from .targets import check_gradients_possible, check_materialised, TargetModules, find_target_linears

Tensor = torch.Tensor

METRICS = ("l2", "taylor", "zo_taylor", "qm_taylor", "random")
_DATA_METRICS = ("taylor", "zo_taylor", "qm_taylor")

# zo_taylor regenerates z in blocks of whole rows of at most this many values (16 MiB in fp32),
# so a transient never exceeds one block whatever the layer's size.
ZO_BLOCK_ELEMENTS = naive.CHUNK_ELEMENTS

_QUANTILES = 11  # 0%, 10%, ..., 100%


def row_importance(
    model: nn.Module,
    batches: Optional[Iterable[Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None,
    metric: str = "l2",
    *,
    target_modules: TargetModules = None,
    exclude_attention: bool = False,
    label_fn: Optional[Callable[[Any], Tensor]] = None,
    classes_per_pass: Optional[int] = None,
    num_perturbations: int = 5,
    epsilon: float = 1e-3,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> dict[str, Tensor]:
    """``{module_name: score[out_features]}`` for every targeted linear layer (see the module
    docstring for the metrics).

    ``batches``: an iterable of batches (a list, a DataLoader); ``loss_fn(model, batch)`` returns
    the batch's mean loss as a scalar tensor. For the gradient metrics the mean gradient is the
    mean over batches, so batches of equal size weight every example alike.

    ``target_modules`` / ``exclude_attention``: which linears, as in
    :func:`spft_kernels.targets.find_target_linears`; ``exclude_attention=True`` is the paper's
    "FA" setting (attention frozen, only the MLP layers are scored and then tuned).

    ``qm_taylor`` needs ``label_fn(batch) -> LongTensor[B]``, each example's class, and then
    ``loss_fn`` must return the per-example losses ``[B]`` (``reduction="none"``) in the same
    order. Each class's gradient is accumulated separately, which holds one fp32 copy of the
    target weights per class at a time; ``classes_per_pass=c`` bounds that to c copies at the
    price of one pass over the batches per c classes (``batches`` must then be re-iterable).

    ``zo_taylor``: ``num_perturbations`` (n) directions per batch, perturbation scale
    ``epsilon``; ``seed`` makes z (and ``random``'s scores) reproducible.

    ``progress``: a tqdm bar over the batches (and zo_taylor's rebuild of the estimates); default
    (``None``): when stderr is a terminal or in a notebook, after 2 s, unless ``SPFT_PROGRESS=0``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"row_importance: model must be an nn.Module, got {type(model).__name__}")
    if metric not in METRICS:
        raise ValueError(f"row_importance: unknown metric {metric!r}; choose one of {METRICS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"row_importance: seed must be an int, got {seed!r}")
    if label_fn is not None and metric != "qm_taylor":
        raise ValueError(f"row_importance: label_fn is only used by metric='qm_taylor', got metric={metric!r}")
    if classes_per_pass is not None and metric != "qm_taylor":
        raise ValueError(f"row_importance: classes_per_pass is only used by metric='qm_taylor', got metric={metric!r}")
    if metric in _DATA_METRICS:
        _check_data(batches, loss_fn, metric)
    if metric in ("taylor", "qm_taylor"):
        check_gradients_possible("row_importance", metric)
    if metric == "qm_taylor":
        if not callable(label_fn):
            raise ValueError("row_importance: metric='qm_taylor' needs label_fn(batch) -> LongTensor[batch] of classes")
        if classes_per_pass is not None and (
            isinstance(classes_per_pass, bool) or not isinstance(classes_per_pass, int) or classes_per_pass < 1
        ):
            raise ValueError(f"row_importance: classes_per_pass must be a positive int or None, got {classes_per_pass!r}")
    if metric == "zo_taylor":
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
            raise ValueError(f"row_importance: num_perturbations must be a positive int, got {num_perturbations!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"row_importance: epsilon must be a positive finite number, got {epsilon!r}")

    targets = find_target_linears(model, target_modules, exclude_attention=exclude_attention)
    check_materialised("row_importance", targets)
    quantized = quantized_scores.quantized_targets(targets)
    if quantized:
        quantized_scores.check_metric("row_importance", metric, quantized_scores.ROW_METRICS, quantized)
        return _quantized_row_importance(model, targets, metric, batches, loss_fn, seed)
    # Tied weights are scored once: keys are the distinct weight tensors, in first-use order.
    weights: dict[int, Tensor] = {}
    owner: dict[str, int] = {}
    for name, module in targets.items():
        weight = module.weight
        if weight.device.type == "meta":
            raise ValueError(f"row_importance: {name}.weight is on the meta device; materialise the model first")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"row_importance: {name}.weight must be a 2-D floating-point tensor, got {weight.dtype} {tuple(weight.shape)}")
        weights.setdefault(id(weight), weight)
        owner[name] = id(weight)

    # Scores are plain numbers: no graph outside the gradient metrics' own backward passes.
    with torch.no_grad():
        if metric == "l2":
            scores = {key: _l2_rows(weight) for key, weight in weights.items()}
        elif metric == "random":
            scores = {}
            for position, (key, weight) in enumerate(weights.items()):
                generator = torch.Generator().manual_seed(_mix(seed, position))
                scores[key] = torch.rand(weight.shape[0], generator=generator, dtype=torch.float64).to(
                    device=weight.device, dtype=_acc(weight)
                )
        elif metric == "taylor":
            scores = _taylor(model, weights, batches, loss_fn, progress)
        elif metric == "qm_taylor":
            scores = _qm_taylor(model, weights, batches, loss_fn, label_fn, classes_per_pass, progress)
        else:
            scores = _zo_taylor(
                model, targets, owner, weights, batches, loss_fn, num_perturbations, float(epsilon), seed, progress
            )
    return {name: scores[owner[name]] for name in targets}


def _quantized_row_importance(model, targets, metric, batches, loss_fn, seed) -> dict[str, Tensor]:
    """row_importance when a target's base is quantized (masks/quantized_scores.py): l2 from W0
    read in bands of rows, taylor from x and dy (the model in eval mode, as the dense path's)."""
    if metric == "l2":
        return {name: quantized_scores.row_l2(module) for name, module in targets.items()}
    if metric == "random":
        return {name: torch.rand(module.out_features, generator=torch.Generator().manual_seed(_mix(seed, position)),
                                 dtype=torch.float64).to(device=module.weight.device, dtype=torch.float32)
                for position, (name, module) in enumerate(targets.items())}

    def zeros(module):
        return torch.zeros(module.out_features, module.in_features, dtype=torch.float32, device=module.weight.device)

    def losses():
        for batch in batches:
            yield _scalar_loss(loss_fn(model, batch), "taylor", needs_grad=True)

    sums, count = quantized_scores.gradient_sums(targets, losses, zeros, lambda total, g: total.add_(g),
                                                 _scoring_mode(model, ()))
    if count == 0:
        raise ValueError("row_importance: batches is empty")
    return {name: quantized_scores.row_taylor(sums[name], module, count) for name, module in targets.items()}


def select_rows(
    scores: Mapping[str, Tensor],
    num_rows: Union[int, Mapping[str, int], None] = None,
    *,
    ratio: Optional[float] = None,
    lora_rank: Optional[int] = None,
    model: Optional[nn.Module] = None,
) -> dict[str, Tensor]:
    """``{module_name: rows}``: the top-R rows of each module's scores, as canonical rows (sorted
    unique int64 on the scores' device, ready for ``RowSparseLinear.from_linear``). Ties go to the
    lower row. Give exactly one of:

    - ``num_rows``: R for every module, or ``{module_name: R}``;
    - ``ratio``: the fraction of each module's rows (its trainable fraction), ``R = round(ratio·out)``;
    - ``lora_rank=r`` with ``model``: as many trainable parameters as a rank-r LoRA on each module,
      ``r·(in + out)``, i.e. ``R = round(r·(in + out) / in)``, capped at ``out``.

    Rounding is to the nearest integer, halves up.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("select_rows: scores must be a non-empty {module_name: score[out]} mapping")
    for name, score in scores.items():
        if not isinstance(score, Tensor) or score.dim() != 1 or not score.is_floating_point():
            raise ValueError(f"select_rows: scores[{name!r}] must be a 1-D floating-point tensor")
        if score.device.type == "meta":
            raise ValueError(
                f"select_rows: scores[{name!r}] is on the meta device (it has no values); score a materialised model"
            )
        if bool(torch.isnan(score).any()):
            raise ValueError(f"select_rows: scores[{name!r}] contains NaN")
    given = [option for option, value in (("num_rows", num_rows), ("ratio", ratio), ("lora_rank", lora_rank)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"select_rows: give exactly one of num_rows, ratio or lora_rank, got {given or 'none'}")
    if model is not None and lora_rank is None:
        raise ValueError("select_rows: model is only used with lora_rank")

    counts: dict[str, int] = {}
    if num_rows is not None:
        if isinstance(num_rows, Mapping):
            if set(num_rows) != set(scores):
                raise ValueError(
                    f"select_rows: num_rows must name the same modules as scores; missing "
                    f"{sorted(set(scores) - set(num_rows))}, unknown {sorted(set(num_rows) - set(scores))}"
                )
            counts = dict(num_rows)
        else:
            counts = {name: num_rows for name in scores}
        for name, count in counts.items():
            value = as_int(count)
            if value is None or not 0 <= value <= scores[name].numel():
                raise ValueError(
                    f"select_rows: num_rows for {name!r} must be an integer in [0, {scores[name].numel()}], got "
                    f"{describe(count)}"
                )
            counts[name] = value
    elif ratio is not None:
        value = as_float(ratio)
        if value is None or not 0.0 <= value <= 1.0:
            raise ValueError(f"select_rows: ratio must be in [0, 1], got {describe(ratio)}")
        counts = {name: _round_half_up(value * score.numel()) for name, score in scores.items()}
    else:
        if as_int(lora_rank) is None or as_int(lora_rank) < 0:
            raise ValueError(f"select_rows: lora_rank must be a non-negative integer, got {describe(lora_rank)}")
        lora_rank = as_int(lora_rank)
        if not isinstance(model, nn.Module):
            raise ValueError("select_rows: lora_rank needs model=, to read each module's in_features")
        for name, score in scores.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"select_rows: the model has no module {name!r}") from None
            if not isinstance(module, nn.Linear) or module.out_features != score.numel():
                raise ValueError(
                    f"select_rows: {name!r} must be an nn.Linear with {score.numel()} output features to match its scores"
                )
            counts[name] = lora_matched_rows(module.in_features, module.out_features, lora_rank)

    selected = {}
    for name, score in scores.items():
        order = torch.argsort(score, descending=True, stable=True)[: counts[name]]
        selected[name] = order.sort().values
    warn_if_empty("select_rows", selected, "rows", sum(score.numel() for score in scores.values()),
                  num_rows=num_rows if not isinstance(num_rows, Mapping) else "{...}", ratio=ratio, lora_rank=lora_rank)
    return selected


def lora_matched_rows(in_features: int, out_features: int, rank: int) -> int:
    """Rows R whose ``R·in`` trainable parameters match a rank-``rank`` LoRA's ``rank·(in + out)``:
    ``round(rank·(in + out) / in)`` (halves up), capped at ``out``."""
    for label, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"lora_matched_rows: {label} must be a non-negative int, got {value!r}")
    if in_features == 0:
        return 0
    return min(out_features, _round_half_up(rank * (in_features + out_features) / in_features))


# --- shared helpers ----------------------------------------------------------------------------


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _acc(weight: Tensor) -> torch.dtype:
    return naive.accumulate_dtype(weight)


def _row_blocks(weight: Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``budget`` values each (at least one row)."""
    out_features, in_features = weight.shape
    step = max(1, budget // max(in_features, 1))
    return [(start, min(start + step, out_features)) for start in range(0, out_features, step)]


def _l2_rows(weight: Tensor) -> Tensor:
    acc = _acc(weight)
    norms = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for start, stop in _row_blocks(weight, naive.CHUNK_ELEMENTS):
        norms[start:stop] = torch.linalg.vector_norm(weight[start:stop].detach().to(acc), dim=1)
    return norms


def _taylor_rows(grad_sum: Tensor, weight: Tensor, count: int) -> Tensor:
    """``Σ_j |grad_sum[i, j] / count · W[i, j]|`` per row; consumes ``grad_sum`` (in place)."""
    scores = torch.empty(weight.shape[0], dtype=grad_sum.dtype, device=grad_sum.device)
    for start, stop in _row_blocks(weight, naive.CHUNK_ELEMENTS):
        block = grad_sum[start:stop].mul_(weight[start:stop].detach()).abs_()
        scores[start:stop] = block.sum(dim=1)
    return scores.div_(count)


def _check_data(batches, loss_fn, metric: str) -> None:
    if batches is None or loss_fn is None:
        raise ValueError(f"row_importance: metric={metric!r} needs batches and loss_fn(model, batch)")
    if isinstance(batches, (Mapping, Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(
            f"row_importance: batches must be an iterable of batches (a list, a DataLoader), got a single "
            f"{type(batches).__name__}; wrap one batch in a list"
        )
    if not callable(loss_fn):
        raise ValueError("row_importance: loss_fn must be callable as loss_fn(model, batch)")


def _scalar_loss(loss, metric: str, needs_grad: bool) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(
            f"row_importance ({metric}): loss_fn must return a scalar floating-point tensor, got "
            f"{type(loss).__name__ if not isinstance(loss, Tensor) else f'{loss.dtype} {tuple(loss.shape)}'}"
        )
    if needs_grad and not loss.requires_grad:
        raise ValueError(
            f"row_importance ({metric}): the loss does not depend on any target weight (it does not require grad)"
        )
    return loss.reshape(())


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, trainable: Iterable[Tensor]):
    """Eval mode, gradients only for ``trainable`` (their existing .grad set aside); everything is
    restored on exit."""
    trainable_ids = {id(p) for p in trainable}
    training = [(module, module.training) for module in model.modules()]
    parameters = list(model.parameters())
    flags = [(p, p.requires_grad) for p in parameters]
    stashed = [(p, p.grad) for p in parameters if id(p) in trainable_ids]
    try:
        model.eval()
        for p in parameters:
            p.requires_grad_(id(p) in trainable_ids)
        for p, _ in stashed:
            p.grad = None
        yield
    finally:
        for p, grad in stashed:
            p.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, flag in training:
            module.training = flag


@contextlib.contextmanager
def _accumulating(weights: Mapping[int, Tensor], sink: Callable[[Tensor], None]):
    """Hands each target weight's gradient to ``sink`` as soon as it is accumulated and frees it,
    so that at most one module's gradient exists besides the sums."""

    def hook(param: Tensor) -> None:
        sink(param)
        param.grad = None

    handles = [weight.register_post_accumulate_grad_hook(hook) for weight in weights.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- taylor ------------------------------------------------------------------------------------


def _batches(batches, metric: str, progress: Optional[bool]):
    """``batches`` with a progress bar (when wanted)."""
    total = len(batches) if hasattr(batches, "__len__") else None
    return progress_bar(batches, total=total, desc=f"row_importance ({metric})", unit="batch", progress=progress)


def _taylor(model, weights, batches, loss_fn, progress) -> dict[int, Tensor]:
    sums = {key: torch.zeros(w.shape, dtype=_acc(w), device=w.device) for key, w in weights.items()}
    count = 0
    with _scoring_mode(model, weights.values()), _accumulating(weights, lambda p: sums[id(p)].add_(p.grad)):
        with torch.enable_grad():
            for batch in _batches(batches, "taylor", progress):
                _scalar_loss(loss_fn(model, batch), "taylor", needs_grad=True).backward()
                count += 1
    if count == 0:
        raise ValueError("row_importance: batches is empty")
    return {key: _taylor_rows(sums[key], weights[key], count) for key in weights}


# --- qm_taylor ---------------------------------------------------------------------------------


def _labels(labels, size: Optional[int] = None) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            "row_importance (qm_taylor): label_fn must return a 1-D integer tensor with one class per example, got "
            + (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__)
        )
    if size is not None and labels.numel() != size:
        raise ValueError(
            f"row_importance (qm_taylor): loss_fn returned {size} per-example losses but label_fn {labels.numel()} labels"
        )
    return labels


def _qm_taylor(model, weights, batches, loss_fn, label_fn, classes_per_pass, progress) -> dict[int, Tensor]:
    if classes_per_pass is None:
        groups: list[Optional[set]] = [None]
    else:
        if iter(batches) is batches:
            raise ValueError(
                "row_importance: classes_per_pass needs batches that can be iterated several times (a list, a "
                "DataLoader), got a one-shot iterator"
            )
        seen = sorted({int(c) for batch in batches for c in torch.unique(_labels(label_fn(batch))).tolist()})
        groups = [set(seen[i : i + classes_per_pass]) for i in range(0, len(seen), classes_per_pass)]
    per_class: dict[int, dict[int, Tensor]] = {}
    for group in groups:
        per_class.update(_class_taylor_pass(model, weights, batches, loss_fn, label_fn, group, progress))
    if not per_class:
        raise ValueError("row_importance: batches is empty (no labelled example)")
    classes = sorted(per_class)
    scores = {}
    for key, weight in weights.items():
        stacked = torch.stack([per_class[t][key] for t in classes])  # [classes, out]
        q = torch.linspace(0, 1, _QUANTILES, dtype=stacked.dtype, device=stacked.device)
        scores[key] = torch.quantile(stacked, q, dim=0).mean(dim=0)
    return scores


def _class_taylor_pass(model, weights, batches, loss_fn, label_fn, group, progress) -> dict[int, dict[int, Tensor]]:
    """Per-class Taylor scores of the classes in ``group`` (all classes if None), one pass."""
    sums: dict[int, dict[int, Tensor]] = {}
    counts: dict[int, int] = {}
    current = [None]

    def sink(param: Tensor) -> None:
        per_weight = sums.setdefault(current[0], {})
        if id(param) in per_weight:
            per_weight[id(param)].add_(param.grad)
        else:
            per_weight[id(param)] = param.grad.to(_acc(param), copy=True)

    with _scoring_mode(model, weights.values()), _accumulating(weights, sink), torch.enable_grad():
        for batch in _batches(batches, "qm_taylor", progress):
            labels = _labels(label_fn(batch))
            present = [t for t in torch.unique(labels).tolist() if group is None or t in group]
            if not present:
                continue
            losses = loss_fn(model, batch)
            if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.is_floating_point():
                raise ValueError(
                    "row_importance (qm_taylor): loss_fn must return the per-example losses, a 1-D floating-point "
                    "tensor [batch] (reduction='none'), got "
                    + (f"{losses.dtype} {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__)
                )
            _labels(labels, losses.numel())
            if not losses.requires_grad:
                raise ValueError("row_importance (qm_taylor): the losses do not depend on any target weight")
            labels = labels.to(losses.device)
            for position, label in enumerate(present):
                mask = labels == label
                current[0] = label
                losses[mask].sum().backward(retain_graph=position + 1 < len(present))
                counts[label] = counts.get(label, 0) + int(mask.sum())
    scores = {}
    for label, count in counts.items():
        per_weight = sums.get(label, {})
        scores[label] = {
            key: _taylor_rows(per_weight[key], weight, count)
            if key in per_weight
            else torch.zeros(weight.shape[0], dtype=_acc(weight), device=weight.device)
            for key, weight in weights.items()
        }
        sums.pop(label, None)  # free this class's sums before the next one's scores
    return scores


# --- zo_taylor ---------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so that every (seed, estimate, weight, block)
    gets its own reproducible stream."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + (value & _MASK64)) & _MASK64
        mixed = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = mixed ^ (mixed >> 31)
    return state >> 1


class _Directions:
    """z for estimate s, regenerated block by block from a seed (MeZO's trick: z is never stored)."""

    def __init__(self, weights: Mapping[int, Tensor], seed: int):
        self.seed = seed
        self.position = {key: position for position, key in enumerate(weights)}
        self.blocks = {key: _row_blocks(weight, ZO_BLOCK_ELEMENTS) for key, weight in weights.items()}
        self._generators: dict[torch.device, torch.Generator] = {}

    def block(self, estimate: int, key: int, block: int, weight: Tensor) -> Tensor:
        start, stop = self.blocks[key][block]
        generator = self._generators.get(weight.device)
        if generator is None:
            generator = self._generators[weight.device] = torch.Generator(device=weight.device)
        generator.manual_seed(_mix(self.seed, estimate, self.position[key], block))
        return torch.randn(
            (stop - start, weight.shape[1]), generator=generator, dtype=torch.float32, device=weight.device
        )


def _zo_taylor(model, targets, owner, weights, batches, loss_fn, num_perturbations, epsilon, seed, progress):
    directions = _Directions(weights, seed)
    state = {"estimate": 0, "scale": 0.0}

    def perturb(module, args, kwargs, output):
        # y + scale·x zᵀ == x (W + scale·z)ᵀ + b: the weight itself is never written.
        if state["scale"] == 0.0:
            return None
        x = args[0] if args else kwargs["input"]
        key = owner_of[module]
        weight = weights[key]
        for block, (start, stop) in enumerate(directions.blocks[key]):
            z = directions.block(state["estimate"], key, block, weight)
            output[..., start:stop].add_(F.linear(x, z.to(x.dtype)), alpha=state["scale"])
        return output

    owner_of = {module: owner[name] for name, module in targets.items()}
    differences = []
    with _scoring_mode(model, ()), torch.no_grad():
        handles = [module.register_forward_hook(perturb, with_kwargs=True) for module in owner_of]
        try:
            estimate = 0
            for batch in _batches(batches, "zo_taylor", progress):
                for _ in range(num_perturbations):
                    state["estimate"] = estimate
                    state["scale"] = epsilon
                    plus = _scalar_loss(loss_fn(model, batch), "zo_taylor", needs_grad=False)
                    state["scale"] = -epsilon
                    minus = _scalar_loss(loss_fn(model, batch), "zo_taylor", needs_grad=False)
                    state["scale"] = 0.0
                    differences.append(plus.detach().double() - minus.detach().double())
                    estimate += 1
        finally:
            state["scale"] = 0.0
            for handle in handles:
                handle.remove()
    if not differences:
        raise ValueError("row_importance: batches is empty")
    # One host sync for all the losses: c_s = (L(θ+εz_s) − L(θ−εz_s)) / 2ε.
    coefficients = (torch.stack(differences) / (2 * epsilon)).cpu().tolist()
    if not all(math.isfinite(c) for c in coefficients):
        raise ValueError("row_importance (zo_taylor): a perturbed loss is not finite; lower epsilon")

    scores = {}
    count = len(coefficients)
    rebuild = progress_bar(weights.items(), total=len(weights), desc="row_importance (zo_taylor): scores",
                           unit="layer", progress=progress)
    for key, weight in rebuild:
        acc = _acc(weight)
        row_scores = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        for block, (start, stop) in enumerate(directions.blocks[key]):
            estimate_sum = torch.zeros(stop - start, weight.shape[1], dtype=acc, device=weight.device)
            for s, coefficient in enumerate(coefficients):
                if coefficient != 0.0:
                    estimate_sum.add_(directions.block(s, key, block, weight), alpha=coefficient)
            row_scores[start:stop] = estimate_sum.mul_(weight[start:stop]).abs_().sum(dim=1)
        scores[key] = row_scores.div_(count)
    return scores
