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

from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..masks.progress import counting
from ..masks.selection import Selection
from ..masks.targets import check_materialised, find_target_linears, weight_reading_parent, weight_sharers
from ..nn.frozen_base import base_kind_for
from ..nn.registry import kind_for_config, plain_linear_type
from ..ops._guards import outside_inference_mode
from .config import SpftConfig, _method_spec
from .surgery import (
    CONFIG_ATTR,
    _finish_unload,
    finish_conversion,
    prepare_for_training,
    remember_requires_grad,
    replace_linears,
    saved_module_names,
    spft_layers,
    unwrap_model,
)


# --- the public calls --------------------------------------------------------------------------


def get_spft_model(
    model: nn.Module,
    config: SpftConfig,
    batches: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    **scoring_kwargs,
) -> nn.Module:
    """Convert ``model`` in place for sparse fine-tuning and return it (the same object).

    The targets (``config.target_modules``) become layers of the config's kind (by default
    ``SparseDeltaLinear`` for speft and sparta, ``BlockSparseLinear`` with ``config.block_size``,
    ``RowSparseLinear`` for spruft, ``PSTLinear`` for pst: at sparsity 0, no data needed; raise it
    with ``set_pst_sparsity``; ``config.kind`` names any registered kind) sharing the original
    weights, with positions chosen by
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
    kind = kind_for_config(config)
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
    shared = _check_shared_weights(root, targets, config, saved, kind)
    _check_bases(targets, config, kind)
    if config.metric in spec.data_metrics and (batches is None or not callable(loss_fn)):
        raise ValueError(
            f"get_spft_model: metric {config.metric!r} of method {config.method!r} scores with data; pass "
            "batches=(an iterable of batches) and loss_fn=(loss_fn(model, batch) -> scalar loss)"
        )
    targets, make = _layer_maker(kind, Selection(root, targets, config, batches, loss_fn, scoring_kwargs))
    remember_requires_grad(root)  # before from_linear, which freezes the shared weights
    with outside_inference_mode():  # the layers' state must outlive an inference_mode block
        try:  # a bar only when building the layers takes over 2 s (masks/progress.py)
            with counting(len(targets), desc="get_spft_model: building layers", unit="layer") as counter:
                layers = replace_linears(root, counter.wrap(make), targets)
        except Exception:
            _finish_unload(root)  # the flags back; no module was replaced
            raise
        for name, other in shared.items():
            if name in layers and kind.writes_w0:
                layers[name].mark_weight_shared(other)
        # The replaced linears still hold the weights through ``targets`` and the selection; a
        # layer merges only a weight nothing else holds (nn/frozen_base.py, ``observers``).
        del targets, make, layers
        prepare_for_training(root, saved)
    finish_conversion(root, config)
    return model


def _check_bases(targets: dict, config: SpftConfig, kind: type) -> None:
    """What a target's frozen base refuses (a quantized one: merged and fused modes, kinds that
    need a dense W0, dynamic masks, which fold the delta into W0), before any selection or change."""
    for name, linear in targets.items():
        base = base_kind_for(linear)
        refusal = base.refusal_for(linear, kind, config.mode, name)
        if refusal is None and config.mask_update_interval is not None:
            refusal = base.refusal_for(linear, kind, "merged", name)
            if refusal is not None:
                refusal = f"a dynamic mask folds the delta into W0, like merged mode: {refusal}"
        if refusal is not None:
            raise ValueError(f"get_spft_model: {refusal}")


def _check_shared_weights(root: nn.Module, targets: dict, config: SpftConfig, saved: list, kind: type) -> dict:
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
        if not kind.writes_w0:
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


def _layer_maker(kind: type, selection: Selection):
    """The targets that get layers, and the maker of their layers of ``kind``."""
    config, targets = selection.config, selection.targets
    positions = kind.select_positions(selection)
    if config.mask_update_interval is None and any(p is not None for p in positions.values()):
        # A target that got no position (a global top-k can leave a layer empty) stays a plain
        # linear: it has nothing to train, and FSDP2 cannot reduce-scatter an empty gradient. A
        # dynamic mask keeps every target, since a later update may move positions there.
        targets = {name: linear for name, linear in targets.items() if positions[name].numel() > 0}
        if not targets:
            raise ValueError("get_spft_model: the budget selects no trainable position in any target")
    options = kind.options_from_config(config)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        # Positions chosen from scores kept elsewhere (salience_scores(score_device="cpu")) move to
        # their weight's device: O(nnz) per layer.
        chosen = positions[name]
        if chosen is not None:
            chosen = chosen.to(linear.weight.device)
        return kind.from_linear(linear, chosen, mode=config.mode, backend=config.backend, name=name, **options)

    return targets, make


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
    unsupported = {name: type(m).__name__ for name, m in targets.items() if not plain_linear_type(m)}
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
    layers = [m for m in spft_layers(model).values() if callable(getattr(m, "set_sparsity", None))]
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
    layers = {n: m for n, m in spft_layers(root).items() if m.dynamic_masks}
    budget = Selection(root, layers, config, None, None, {}).budget
    return DynamicMask(
        root, optimizer, batches, loss_fn,
        metric=config.metric, scope=config.scope, interval=config.mask_update_interval,
        target_modules=list(layers), num_batches=config.num_calibration_batches, **budget, **salience_kwargs,
    )
