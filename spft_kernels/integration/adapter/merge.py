"""``merge_adapters``: SpaRTA's model merging, several sparse adapters summed onto one base as one
adapter (union of positions, fp64 sums rounded once)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...nn.registry import kind_class, universal_kind
from ...nn.stored import StoredLayer
from ..surgery import unwrap_model
from .files import PathLike
from .folder import read_any_adapter
from .load import _check_against, _install


def merge_adapters(
    model: nn.Module,
    paths: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    saved_modules: str = "error",
    check_base: bool = True,
) -> nn.Module:
    """SpaRTA's model merging: put ``Σ_i weights[i] · Δ_i`` of several sparse adapters onto one
    base and return the model (the same object).

    Every adapter is checked against the model's W0 (as ``load_adapter`` does) before anything is
    written. Per layer the positions are the union of the adapters' positions and overlapping
    entries are summed (in fp64, rounded once to fp32). The result is a converted model with one
    adapter (new SparseDeltaLinear layers, or RowSparseLinear where every adapter trained rows of
    that layer, or BlockSparseLinear where every adapter trained blocks of one size there; rows
    and blocks count as their entries when mixed with other kinds), so W0 stays
    intact: save it with ``save_adapter``, or fold it into plain linears with ``merge_and_unload``.
    A model that already has an adapter gets it replaced, as ``load_adapter`` does.

    ``saved_modules``: the adapters' fully trained modules (e.g. classification heads) cannot be
    summed without interference (SpaRTA keeps one head per task); ``"error"`` loads a module saved
    by exactly one adapter and refuses one saved by several, ``"skip"`` loads none of them.
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or not paths:
        raise ValueError("merge_adapters: paths must be a non-empty list of adapter files")
    if weights is None:
        weights = [1.0] * len(paths)
    if isinstance(weights, (str, bytes)) or len(weights) != len(paths):
        raise ValueError(f"merge_adapters: weights must give one number per adapter ({len(paths)})")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"merge_adapters: weights must be finite numbers, got {w!r}")
    if saved_modules not in ("error", "skip"):
        raise ValueError(f"merge_adapters: saved_modules must be 'error' or 'skip', got {saved_modules!r}")
    root = unwrap_model(model)
    adapters = [read_any_adapter(p, root) for p in paths]
    for adapter in adapters:
        odd = sorted({record.kind for record in adapter.layers.values() if not kind_class(record.kind).additive})
        if odd:
            raise ValueError(
                f"merge_adapters: {adapter.path} holds {odd[0]!r} layers, which are not additive (PST: each prunes "
                "W0 with its own learned mask), so they cannot be merged: load one with load_adapter"
            )
    checked = [_check_against(root, adapter, check_base) for adapter in adapters]
    order = {name: position for position, (name, _) in enumerate(root.named_modules())}
    names = sorted({name for plans in checked for name in plans}, key=order.__getitem__)
    merged = {}
    for name in names:
        parts = [(plans[name], float(w)) for plans, w in zip(checked, weights) if name in plans]
        merged[name] = _merge_layer(parts)
    saved = {}
    if saved_modules == "error":
        owners: dict = {}
        for adapter in adapters:
            for module_name, state in adapter.saved.items():
                owners.setdefault(module_name, []).append(adapter.path)
                saved[module_name] = state
        shared = {m: p for m, p in owners.items() if len(p) > 1}
        if shared:
            module_name, owner_paths = next(iter(shared.items()))
            raise ValueError(
                f"merge_adapters: module {module_name!r} is saved whole by several adapters ({owner_paths}); it "
                "cannot be merged without interference. Pass saved_modules='skip' and attach each head yourself"
            )
    total = sum(plan.count for plan in merged.values())
    config = adapters[0].config
    method = config.method
    kinds = {plan.kind for plan in merged.values()}
    if len(kinds) > 1 or kind_class(kinds.pop()).universal:
        method = "speft" if method == "spruft" else method  # (rows merged as entries are no longer rows)
    block_sizes = {tuple(plan.options.get("block_size") or ()) or None for plan in merged.values()}
    config = dataclasses.replace(
        config,
        method=method,
        block_size=block_sizes.pop() if len(block_sizes) == 1 else None,
        kind=config.kind if {plan.kind for plan in merged.values()} == {config.kind} else None,
        metric=config.metric if method == config.method else None,
        scope=config.scope if method == config.method else None,
        density=None,
        num_params=max(total, 1),
        match_lora_rank=None,
        mask_update_interval=None,
        modules_to_save=sorted(saved) or None,
    )
    _install(root, merged, saved, config)
    return model


def _merge_layer(parts: list) -> StoredLayer:
    """``Σ w · part`` of one layer's parts: as their kind where it can sum them (rows, blocks of one
    size, entries), else as scattered entries (mixed kinds or block sizes)."""
    kinds = {plan.kind for plan, _ in parts}
    if len(kinds) == 1:
        summed = kind_class(kinds.pop()).sum_stored(parts)
        if summed is not None:
            return summed
    return universal_kind().sum_stored(parts)
