"""``get_spft_model``: convert a model in place for sparse fine-tuning (choose positions with the
method's metric, swap the target linears for spft layers, freeze the rest).

Conversion shares every weight (no copy): each target ``nn.Linear`` is replaced by a layer built
on its own weight and bias, with a zero delta, so the converted model computes exactly what the
original did (a target that gets no position at all stays a plain linear, unless the mask is
dynamic). Everything else is frozen except ``modules_to_save`` (e.g. a new classification
head, which SpaRTA keeps fully trainable); those are trained in place and stored whole in the
adapter. Layers whose mode resolves to ``merged`` are merged at conversion (O(nnz)), so that a
``torch.compile`` of the converted model traces the merged forward from the start.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..masks.progress import counting
from ..masks.row_importance import row_importance, select_rows
from ..masks.salience import salience_scores
from ..masks.select import lora_equivalent_params, random_indices, select_topk
from ..masks.select_blocks import random_blocks, select_blocks
from ..masks.targets import check_materialised, find_target_linears, weight_reading_parent, weight_sharers
from ..nn.block_sparse_linear import BlockSparseLinear
from ..ops._guards import outside_inference_mode
from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from .config import SpftConfig, _method_spec
from .surgery import (
    CONFIG_ATTR,
    _finish_unload,
    prepare_for_training,
    remember_requires_grad,
    replace_linears,
    saved_module_names,
    spft_layers,
    unwrap_model,
)

# --- choosing positions ------------------------------------------------------------------------


def _budget(config: SpftConfig, targets: Mapping[str, nn.Linear]) -> dict:
    """``{"density": d}`` or ``{"num_params": n}`` for select_topk / random_indices."""
    if config.density is not None:
        return {"density": config.density}
    if config.num_params is not None:
        return {"num_params": config.num_params}
    return {"num_params": lora_equivalent_params(dict(targets), config.match_lora_rank)}


def _speft_scores(model, targets, config, batches, loss_fn, scoring_kwargs):
    generator = torch.Generator().manual_seed(config.seed) if config.metric == "random" else None
    return salience_scores(
        model,
        batches,
        loss_fn,
        config.metric,
        target_modules=list(targets),
        num_batches=config.num_calibration_batches,
        generator=generator,
        **scoring_kwargs,
    )


def _select_speft(model, targets, config, batches, loss_fn, scoring_kwargs):
    scores = _speft_scores(model, targets, config, batches, loss_fn, scoring_kwargs)
    budget = _budget(config, targets)
    return select_topk(scores, budget.get("density"), num_params=budget.get("num_params"), scope=config.scope)


def _select_sparta(model, targets, config, batches, loss_fn, scoring_kwargs):
    if scoring_kwargs:
        raise ValueError(f"get_spft_model: method 'sparta' takes no scoring options, got {sorted(scoring_kwargs)}")
    budget = _budget(config, targets)
    return random_indices(
        dict(targets),
        budget.get("density"),
        num_params=budget.get("num_params"),
        scope=config.scope,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _select_spruft(model, targets, config, batches, loss_fn, scoring_kwargs):
    if batches is not None and config.num_calibration_batches is not None:
        batches = list(itertools.islice(batches, config.num_calibration_batches))
    scores = row_importance(
        model, batches, loss_fn, config.metric, target_modules=list(targets), seed=config.seed, **scoring_kwargs
    )
    if config.match_lora_rank is not None:
        return select_rows(scores, lora_rank=config.match_lora_rank, model=model)
    if config.density is not None:
        return select_rows(scores, ratio=config.density)
    total = sum(linear.weight.numel() for linear in targets.values())
    if config.num_params > total:
        raise ValueError(f"get_spft_model: num_params={config.num_params} exceeds the {total} entries of the target weights")
    # The same fraction of rows in every layer: R_m = round(num_params * out_m / N), whole rows.
    return select_rows(scores, ratio=config.num_params / total)


def _block_budget(config: SpftConfig) -> dict:
    """The budget of ``select_blocks`` / ``random_blocks`` (``match_lora_rank`` -> ``lora_rank``)."""
    if config.match_lora_rank is not None:
        return {"lora_rank": config.match_lora_rank}
    return {"density": config.density} if config.density is not None else {"num_params": config.num_params}


def _select_speft_blocks(model, targets, config, batches, loss_fn, scoring_kwargs):
    scores = _speft_scores(model, targets, config, batches, loss_fn, scoring_kwargs)
    return select_blocks(scores, config.block_size, scope=config.scope, **_block_budget(config))


def _select_sparta_blocks(model, targets, config, batches, loss_fn, scoring_kwargs):
    if scoring_kwargs:
        raise ValueError(f"get_spft_model: method 'sparta' takes no scoring options, got {sorted(scoring_kwargs)}")
    return random_blocks(
        dict(targets), config.block_size, generator=torch.Generator().manual_seed(config.seed), scope=config.scope,
        **_block_budget(config),
    )


# How each method chooses positions and which layer trains them (pst chooses none).
_SELECTORS: dict = {
    "speft": (_select_speft, SparseDeltaLinear),
    "sparta": (_select_sparta, SparseDeltaLinear),
    "spruft": (_select_spruft, RowSparseLinear),
}
# With SpftConfig.block_size: whole blocks.
_BLOCK_SELECTORS: dict = {"speft": _select_speft_blocks, "sparta": _select_sparta_blocks}


# --- the public calls --------------------------------------------------------------------------


def get_spft_model(
    model: nn.Module,
    config: SpftConfig,
    batches: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    **scoring_kwargs,
) -> nn.Module:
    """Convert ``model`` in place for sparse fine-tuning and return it (the same object).

    The targets (``config.target_modules``) become ``SparseDeltaLinear`` (speft, sparta;
    ``BlockSparseLinear`` with ``config.block_size``),
    ``RowSparseLinear`` (spruft) or ``PSTLinear`` (pst: at sparsity 0, no data needed; raise it
    with ``set_pst_sparsity``) layers sharing the original weights, with positions chosen by
    ``config.metric`` (data metrics need ``batches`` and ``loss_fn(model, batch) -> scalar loss``);
    all other parameters are frozen except those of ``config.modules_to_save``. The converted
    model's output equals the original's exactly until the deltas change. ``scoring_kwargs`` go to
    ``salience_scores`` (speft, e.g. ``fisher_mode``) or ``row_importance`` (spruft, e.g.
    ``label_fn`` for ``qm_taylor``). The config is kept as ``model.spft_config``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"get_spft_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, SpftConfig):
        raise ValueError(f"get_spft_model: config must be an SpftConfig, got {type(config).__name__}")
    spec = _method_spec(config.method)
    root = unwrap_model(model)
    if spft_layers(root):
        raise ValueError(
            "get_spft_model: the model already has sparse fine-tuning layers; call spft.unload(model) first, "
            "or spft.load_adapter(model, path) to replace its adapter"
        )
    targets = _find_targets(root, config)
    saved = saved_module_names(root, config.modules_to_save)
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"get_spft_model: modules_to_save {saved} contain target layers {overlap[:3]}")
    shared = _check_shared_weights(root, targets, config, saved)
    if config.metric in spec.data_metrics and (batches is None or not callable(loss_fn)):
        raise ValueError(
            f"get_spft_model: metric {config.metric!r} of method {config.method!r} scores with data; pass "
            "batches=(an iterable of batches) and loss_fn=(loss_fn(model, batch) -> scalar loss)"
        )
    if config.method == "pst":
        make = _pst_maker(config, scoring_kwargs)
    else:
        targets, make = _delta_maker(root, targets, config, batches, loss_fn, scoring_kwargs)
    remember_requires_grad(root)  # before from_linear, which freezes the shared weights
    with outside_inference_mode():  # the layers' state must outlive an inference_mode block
        try:  # a bar only when building the layers takes over 2 s (masks/progress.py)
            with counting(len(targets), desc="get_spft_model: building layers", unit="layer") as counter:
                layers = replace_linears(root, counter.wrap(make), targets)
        except Exception:
            _finish_unload(root)  # the flags back; no module was replaced
            raise
        for name, other in shared.items():
            if name in layers and not isinstance(layers[name], PSTLinear):  # PST never writes W0
                layers[name].mark_weight_shared(other)
        prepare_for_training(root, saved)
    setattr(root, CONFIG_ATTR, config)
    return model


def _check_shared_weights(root: nn.Module, targets: dict, config: SpftConfig, saved: list) -> dict:
    """``{target: other module}`` for the targets whose weight another module holds too (a tied LM
    head shares the input embedding's). Such a layer computes in the split form, which never
    writes into W0; what cannot work that way is refused here, before anything changes."""
    shared = weight_sharers(root, list(targets))
    for name, other in shared.items():
        trained = [s for s in saved if other == s or other.startswith(s + ".")]
        if trained:
            raise ValueError(
                f"get_spft_model: target {name!r} shares its weight with {other!r}, which modules_to_save "
                f"({trained[0]!r}) trains fully: the delta's base W0 would change under it. Untie the weights first "
                "or leave one of them out"
            )
        if config.method == "pst":
            continue
        if config.mode == "merged":
            raise ValueError(
                f"get_spft_model: target {name!r} shares its weight with {other!r} (e.g. a tied LM head and input "
                "embedding); mode='merged' would write W0 + delta into it too. Use mode='auto' (which computes "
                "such a layer in the split form, W0 untouched) or 'split'"
            )
        if config.mask_update_interval is not None:
            raise ValueError(
                f"get_spft_model: target {name!r} shares its weight with {other!r}; a dynamic mask folds the delta "
                "into W0, which would change it too. Leave it out of target_modules or use a static mask"
            )
    return shared


def _pst_maker(config: SpftConfig, scoring_kwargs: dict) -> Callable[[str, nn.Linear], nn.Module]:
    """PSTLinear.from_linear for every target (data-free), at sparsity 0, the factors drawn from
    one generator seeded with ``config.seed`` in target order."""
    if scoring_kwargs:
        raise ValueError(f"get_spft_model: method 'pst' takes no scoring options, got {sorted(scoring_kwargs)}")
    r1, r2 = config.pst_ranks
    generator = torch.Generator().manual_seed(config.seed)
    return lambda name, linear: PSTLinear.from_linear(
        linear, 0.0, r1, r2, backend=config.backend, generator=generator, name=name
    )


def _delta_maker(root, targets, config, batches, loss_fn, scoring_kwargs):
    """The targets that get positions and the maker of their sparse-delta layers."""
    select, layer = _SELECTORS[config.method]
    build = layer.from_linear
    if config.block_size is not None:
        select = _BLOCK_SELECTORS[config.method]
        build = functools.partial(BlockSparseLinear.from_linear, block_size=config.block_size)
    positions = select(root, targets, config, batches, loss_fn, scoring_kwargs)
    if config.mask_update_interval is None:
        # A target that got no position (a global top-k can leave a layer empty) stays a plain
        # linear: it has nothing to train, and FSDP2 cannot reduce-scatter an empty gradient. A
        # dynamic mask keeps every target, since a later update may move positions there.
        targets = {name: linear for name, linear in targets.items() if positions[name].numel() > 0}
        if not targets:
            raise ValueError("get_spft_model: the budget selects no trainable position in any target")
    # Positions chosen from scores kept elsewhere (salience_scores(score_device="cpu")) move to
    # their weight's device: O(nnz) per layer.
    return targets, lambda name, linear: build(
        linear, positions[name].to(linear.weight.device), mode=config.mode, backend=config.backend, name=name
    )


def _find_targets(root: nn.Module, config: SpftConfig) -> dict[str, nn.Linear]:
    try:
        targets = find_target_linears(root, config.target_modules, exclude_attention=config.exclude_attention)
    except ValueError as error:
        conv1d = [name for name, m in root.named_modules() if type(m).__name__ == "Conv1D"]
        if conv1d:
            raise ValueError(
                f"{error}; this model uses transformers' Conv1D layers (GPT-2 style, e.g. {conv1d[0]!r}), which "
                "sparse fine-tuning does not convert: only nn.Linear layers are supported"
            ) from None
        raise
    check_materialised("get_spft_model", targets)
    for name in targets:
        reason = weight_reading_parent(root, name)
        if reason is not None:
            raise ValueError(f"get_spft_model: target {reason}; leave it out of target_modules")
    unsupported = {name: type(m).__name__ for name, m in targets.items() if type(m) is not nn.Linear}
    if unsupported:
        name, kind = next(iter(unsupported.items()))
        raise ValueError(f"get_spft_model: target {name!r} is a {kind}, not a plain nn.Linear; it cannot be converted")
    seen: dict[int, str] = {}
    for name, linear in targets.items():
        if id(linear.weight) in seen:
            raise ValueError(f"get_spft_model: targets {seen[id(linear.weight)]!r} and {name!r} share one weight")
        seen[id(linear.weight)] = name
    return targets


def set_pst_sparsity(model: nn.Module, sparsity: float) -> int:
    """Set the sparsity of every ``PSTLinear`` of the model (from its next forward on) and return
    how many there are; the schedule of a training loop, e.g. the paper's cubic one:
    ``spft.set_pst_sparsity(model, spft.cubic_sparsity(step, total_steps, config.sparsity))``."""
    layers = [m for m in spft_layers(model).values() if isinstance(m, PSTLinear)]
    if not layers:
        raise ValueError("set_pst_sparsity: the model has no PSTLinear layers (convert it with method='pst')")
    for layer in layers:
        layer.set_sparsity(sparsity)
    return len(layers)



def make_dynamic_mask(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn, **salience_kwargs):
    """A ``DynamicMask`` over a converted speft model, configured from ``model.spft_config``
    (metric, scope, budget, ``mask_update_interval``); call ``mask.step(step)`` after each
    optimizer step."""
    from ..masks.dynamic_mask import DynamicMask

    root = unwrap_model(model)
    config = getattr(root, CONFIG_ATTR, None)
    if config is None or config.method != "speft" or config.mask_update_interval is None:
        raise ValueError(
            "make_dynamic_mask: the model must come from get_spft_model with SpftConfig(method='speft', "
            "mask_update_interval=...)"
        )
    layers = {n: m for n, m in spft_layers(root).items() if isinstance(m, SparseDeltaLinear)}
    budget = _budget(config, layers)
    return DynamicMask(
        root, optimizer, batches, loss_fn,
        metric=config.metric, scope=config.scope, interval=config.mask_update_interval,
        target_modules=list(layers), num_batches=config.num_calibration_batches, **budget, **salience_kwargs,
    )
