"""From scores to masks: exact top-k selection (global or per module), SpaRTA's random masks for a
whole model, and the parameter count of a LoRA of rank r.

Counts (always exact):

- ``density`` with ``scope="global"``: ``round(density * N)`` entries over all ``N`` target
  entries together; with ``scope="local"``: ``round(density * n_m)`` in each module of ``n_m``
  entries (rounded as ``random_index`` rounds).
- ``num_params`` with ``scope="global"``: exactly ``num_params`` in total; with ``scope="local"``:
  split in proportion to the module sizes by the largest-remainder rule (quota
  ``num_params * n_m / N``, floors first, the leftover entries to the largest fractional parts,
  ties to the earlier module), so the total is exact.

Ties (``select_topk``): among equal scores the earlier entry wins, in (module order, flat
position) order, so the result is deterministic on every device.

How the global top-k avoids concatenating the scores (which would double the memory of billions
of scores): the k-th largest score is found by a radix select over the order-preserving integer
key of the floats (16-bit digits: 2 passes for fp32). Each pass makes, module by module, a
65536-bin histogram of the next digit among the entries that share the prefix found so far;
the temporaries are a few tensors of the largest module's size. A last pass gathers, per module,
the entries above the threshold and, in order, as many tied entries as are still needed.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..ops._guards import as_float, as_int, describe
from ..ops.index import index_dtype_for, random_index
from .progress import ProgressCounter, counting
from .targets import TargetModules, find_target_linears

Tensor = torch.Tensor

SCOPES = ("global", "local")

# (integer view of the float's bits, its width in bits)
_BITS = {
    torch.float16: (torch.int16, 16),
    torch.bfloat16: (torch.int16, 16),
    torch.float32: (torch.int32, 32),
    torch.float64: (torch.int64, 64),
}
_DIGIT = 16
_BINS = 1 << _DIGIT


def _top_passes(dtype: torch.dtype) -> int:
    """Passes of ``_top`` through the modules: one per radix digit, one to gather."""
    return _BITS[dtype][1] // _DIGIT + 1


class EmptySelectionWarning(UserWarning):
    """A selection chose nothing at all: the budget rounds to zero for these modules."""


def warn_if_empty(who: str, chosen: Mapping[str, Tensor], what: str, available: int, **budget) -> None:
    """Warns when ``chosen`` (``{name: positions}``) holds no position at all, naming the budget:
    a model converted with it would have nothing to train, which is never what was meant."""
    if any(positions.numel() for positions in chosen.values()):
        return
    given = ", ".join(f"{key}={value!r}" for key, value in budget.items() if value is not None)
    warnings.warn(
        f"{who}: {given} selects no {what} of the {available} {what} in {len(chosen)} module(s), so nothing "
        "would train; raise the budget" + (" or use smaller blocks" if what == "blocks" else ""),
        EmptySelectionWarning,
        stacklevel=3,
    )


# --- counts ---------------------------------------------------------------------------------


def _check_budget(who: str, density, num_params, scope: str, total: int) -> tuple:
    """The budget checked and normalised: ``(density as float or None, num_params as int or None)``
    (numpy scalars are accepted)."""
    if scope not in SCOPES:
        raise ValueError(f"{who}: unknown scope {scope!r}; choose one of {SCOPES}")
    if (density is None) == (num_params is None):
        raise ValueError(f"{who}: give exactly one of density or num_params")
    if density is not None:
        value = as_float(density)
        if value is None or not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{who}: density must be in (0, 1], got {describe(density)}")
        return value, None
    count = as_int(num_params)
    if count is None or count < 1:
        raise ValueError(f"{who}: num_params must be a positive integer, got {describe(num_params)}")
    if count > total:
        raise ValueError(f"{who}: num_params={count} exceeds the {total} entries of the target weights")
    return None, count


def _counts(who: str, sizes: Mapping[str, int], density, num_params, scope: str) -> dict:
    """The exact counts (module docstring): ``{None: k}`` for the global scope, else
    ``{name: k_m}``. Validates the budget."""
    total = sum(sizes.values())
    density, num_params = _check_budget(who, density, num_params, scope, total)
    if scope == "global":
        return {None: _round(density * total) if density is not None else num_params}
    if density is not None:
        return {name: _round(density * size) for name, size in sizes.items()}
    counts = {name: num_params * size // total for name, size in sizes.items()}
    leftover = num_params - sum(counts.values())
    # Largest remainder first; sorted() is stable, so equal remainders go to the earlier module.
    by_remainder = sorted(sizes, key=lambda name: -(num_params * sizes[name] % total))
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


def _round(value: float) -> int:
    return int(round(value))  # as random_index rounds


def lora_equivalent_params(model_or_modules, rank: int, *, target_modules: TargetModules = None) -> int:
    """``Σ rank * (in + out)`` over the target linears: the trainable parameters of a LoRA of this
    rank on them, to pass as ``num_params`` (SPEFT and SpaRTA compare at equal parameter counts).

    ``model_or_modules``: a model (targets found with ``find_target_linears(model, target_modules)``)
    or a mapping ``{name: nn.Linear | score tensor [out, in]}``, e.g. the output of
    ``salience_scores``."""
    value = as_int(rank)
    if value is None or value < 1:
        raise ValueError(f"lora_equivalent_params: rank must be a positive integer, got {describe(rank)}")
    rank = value
    return sum(rank * (out_f + in_f) for out_f, in_f, _ in _shapes(model_or_modules, target_modules).values())


def _shapes(model_or_modules, target_modules: TargetModules) -> dict[str, tuple[int, int, torch.device]]:
    """``{name: (out, in, device)}`` of a model's targets or of a mapping of linears / 2-D tensors."""
    if isinstance(model_or_modules, nn.Module):
        modules = find_target_linears(model_or_modules, target_modules)
    elif isinstance(model_or_modules, Mapping):
        if target_modules is not None:
            raise ValueError("target_modules applies to a model, not to a mapping of modules or scores")
        modules = model_or_modules
    else:
        raise ValueError(
            f"expected a model or a mapping {{name: nn.Linear | tensor}}, got {type(model_or_modules).__name__}"
        )
    if not modules:
        raise ValueError("no target modules given")
    shapes = {}
    for name, item in modules.items():
        if isinstance(item, nn.Linear):
            shapes[name] = (item.out_features, item.in_features, item.weight.device)
        elif isinstance(item, Tensor) and item.dim() == 2:
            shapes[name] = (item.shape[0], item.shape[1], item.device)
        else:
            raise ValueError(f"{name}: expected an nn.Linear or a 2-D tensor [out, in], got {_describe(item)}")
    return shapes


def _describe(item) -> str:
    return f"a tensor of shape {tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__


# --- top-k ----------------------------------------------------------------------------------


def select_topk(
    scores: Mapping[str, Tensor],
    density: Optional[float] = None,
    *,
    num_params: Optional[int] = None,
    scope: str = "global",
    progress: Optional[bool] = None,
) -> dict[str, Tensor]:
    """Keep the highest scores: ``{module_name: index}`` with canonical indices (1-D sorted unique
    flat positions ``row * in + col``, dtype ``index_dtype_for(out, in)``, on the score's device),
    ready for ``SparseDeltaLinear.from_linear``.

    ``scope="global"`` ranks all entries of all modules together (SPEFT's default); ``"local"``
    gives every module the same density. Exactly one of ``density`` (in (0, 1]) and
    ``num_params`` (e.g. ``lora_equivalent_params(scores, 8)``); counts and tie-breaking are
    described in the module docstring. All scores must share one floating dtype; NaN is rejected.
    ``progress``: a bar over the passes through the modules (default: as ``salience_scores``).
    A budget that selects nothing warns (``EmptySelectionWarning``).
    """
    _check_scores(scores)
    sizes = {name: score.numel() for name, score in scores.items()}
    counts = _counts("select_topk", sizes, density, num_params, scope)
    passes = _top_passes(next(iter(scores.values())).dtype)
    with counting(passes * len(scores), desc="select_topk", unit="module", progress=progress) as counter:
        if scope == "global":
            chosen = _top(scores, counts[None], counter)
        else:
            chosen = {name: _top({name: scores[name]}, counts[name], counter)[name] for name in scores}
    warn_if_empty("select_topk", chosen, "entries", sum(sizes.values()), density=density, num_params=num_params,
                  scope=scope)
    return chosen


def _check_scores(scores, who: str = "select_topk") -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{who}: scores must be a non-empty mapping {{module_name: score[out, in]}}")
    dtypes = set()
    for name, score in scores.items():
        if not isinstance(score, Tensor) or score.dim() != 2 or score.dtype not in _BITS:
            dtype = f" of dtype {score.dtype}" if isinstance(score, Tensor) else ""
            raise ValueError(f"{who}: {name}: expected a 2-D floating score [out, in], got {_describe(score)}{dtype}")
        if score.device.type == "meta":
            raise ValueError(
                f"{who}: {name}: the score is on the meta device (it has no values); score a materialised model"
            )
        if bool(torch.isnan(score).any()):
            raise ValueError(f"{who}: {name}: the scores contain NaN")
        dtypes.add(score.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"{who}: all scores must share one dtype, got {sorted(map(str, dtypes))}")


def _top(scores: Mapping[str, Tensor], k: int, counter: Optional[ProgressCounter] = None) -> dict[str, Tensor]:
    """The ``k`` largest entries over ``scores`` (ties: earlier module, then lower position);
    ``counter`` ticks once per module and pass (``_top_passes``)."""
    counter = counter or ProgressCounter()
    dtypes = {name: index_dtype_for(*score.shape) for name, score in scores.items()}
    if k == 0:
        counter.tick(_top_passes(next(iter(scores.values())).dtype) * len(scores))
        return {name: torch.empty(0, dtype=dtypes[name], device=s.device) for name, s in scores.items()}
    threshold = _kth_largest([s.reshape(-1) for s in scores.values()], k, counter)
    above = {}
    for name, score in scores.items():
        above[name] = torch.nonzero(score.reshape(-1) > threshold.to(score.device)).squeeze(1)
        counter.tick()
    need = k - sum(a.numel() for a in above.values())
    chosen = {}
    for name, score in scores.items():
        picked = above[name]
        if need > 0:
            ties = torch.nonzero(score.reshape(-1) == threshold.to(score.device)).squeeze(1)[:need]
            need -= ties.numel()
            picked = torch.cat([picked, ties]).sort().values
        chosen[name] = picked.to(dtypes[name])
    if need != 0:  # the threshold search guarantees this; a failure is a bug, not bad input
        raise RuntimeError(f"select_topk: internal error, {need} entries short of k={k}")
    return chosen


def _sortable_keys(flat: Tensor) -> Tensor:
    """Signed integers ordered like the floats (-0.0 just below +0.0): the bits of a non-negative
    float, the bits with all but the sign flipped for a negative one. int32 (int64 for fp64)."""
    bits_dtype, width = _BITS[flat.dtype]
    bits = flat.contiguous().view(bits_dtype)
    if width == 16:
        bits = bits.to(torch.int32)  # sign-extended: the order is kept
    keys = bits >> (bits.element_size() * 8 - 1)  # -1 for negative floats, 0 otherwise
    keys &= (1 << (width - 1)) - 1
    keys ^= bits
    return keys


def _kth_largest(flats: list[Tensor], k: int, counter: Optional[ProgressCounter] = None) -> Tensor:
    """The k-th largest value over 1-D tensors (one dtype), as a 0-d tensor, by radix select;
    ``counter`` ticks once per tensor and digit."""
    counter = counter or ProgressCounter()
    dtype = flats[0].dtype
    bits_dtype, width = _BITS[dtype]
    prefix = None  # the digits found so far, as the arithmetic right shift of the key
    remaining = k  # rank of the target among the entries sharing the prefix
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        histogram = torch.zeros(_BINS, dtype=torch.int64)
        for flat in flats:
            keys = _sortable_keys(flat)
            if prefix is not None:
                keys = keys[(keys >> (shift + _DIGIT)) == prefix]
            digits = keys >> shift
            if prefix is None:
                digits += _BINS // 2  # the top digit is signed
            else:
                digits &= _BINS - 1
            histogram += torch.bincount(digits, minlength=_BINS).cpu()
            del keys, digits
            counter.tick()
        from_top = histogram.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, remaining))  # first j with from_top[j] >= remaining
        digit = _BINS - 1 - j
        remaining -= int(from_top[j - 1]) if j else 0
        prefix = digit - _BINS // 2 if prefix is None else (prefix << _DIGIT) | digit
    bits = prefix if prefix >= 0 else prefix ^ ((1 << (width - 1)) - 1)
    return torch.tensor(bits, dtype=bits_dtype).view(dtype)


# --- SpaRTA ---------------------------------------------------------------------------------


def random_indices(
    model_or_modules,
    density: Optional[float] = None,
    *,
    num_params: Optional[int] = None,
    scope: str = "global",
    target_modules: TargetModules = None,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """SpaRTA's mask for a whole model: ``{module_name: index}`` of uniformly random entries, with
    canonical indices on each weight's device.

    ``scope="global"``: one uniformly random subset of the exact total size over all target entries
    together (SpaRTA draws every parameter with the same probability, so module counts vary like
    a hypergeometric draw); ``"local"``: ``random_index`` per module with the exact per-module
    count. Counts as in ``select_topk``. Sampling never materialises a permutation of all entries
    (``random_index``'s sampler over the concatenated positions, split by module offsets).
    """
    shapes = _shapes(model_or_modules, target_modules)
    sizes = {name: out_f * in_f for name, (out_f, in_f, _) in shapes.items()}
    counts = _counts("random_indices", sizes, density, num_params, scope)
    chosen = _random_indices(shapes, sizes, counts, scope, generator)
    warn_if_empty("random_indices", chosen, "entries", sum(sizes.values()), density=density, num_params=num_params,
                  scope=scope)
    return chosen


def _random_indices(shapes, sizes, counts, scope, generator) -> dict[str, Tensor]:
    if scope == "local":
        return {
            name: _random_exact(out_f, in_f, counts[name], generator, device)
            for name, (out_f, in_f, device) in shapes.items()
        }
    total = sum(sizes.values())
    positions = _random_exact(1, total, counts[None], generator, "cpu").long()
    chosen, start = {}, 0
    for name, (out_f, in_f, device) in shapes.items():
        low, high = torch.searchsorted(positions, torch.tensor([start, start + sizes[name]])).tolist()
        chosen[name] = (positions[low:high] - start).to(dtype=index_dtype_for(out_f, in_f), device=device)
        start += sizes[name]
    return chosen


def _random_exact(out_f: int, in_f: int, count: int, generator, device) -> Tensor:
    total = out_f * in_f
    # round((count / total) * total) == count for any count < 2**51, so random_index draws exactly count.
    index = random_index(out_f, in_f, count / total if total else 0.0, generator, device=device)
    assert index.numel() == count
    return index
