"""``merge_adapters``: SpaRTA's model merging, several sparse adapters summed onto one base as one
adapter (union of positions, fp64 sums rounded once)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..ops.index import index_dtype_for
from ..ops.block_index import block_entries
from .adapter_format import PathLike
from .adapter_load import _check_against, _install, _Plan
from .adapter_folder import read_any_adapter
from .surgery import unwrap_model


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
        if any(record.kind == "pst" for record in adapter.layers.values()):
            raise ValueError(
                f"merge_adapters: {adapter.path} is a PST adapter; PST adapters are not additive (each prunes W0 "
                "with its own learned mask), so they cannot be merged: load one with load_adapter"
            )
    checked = [_check_against(root, adapter, check_base) for adapter in adapters]
    order = {name: position for position, (name, _) in enumerate(root.named_modules())}
    names = sorted({name for plans in checked for name in plans}, key=order.__getitem__)
    merged = {}
    for name in names:
        parts = [(plans[name], float(w)) for plans, w in zip(checked, weights) if name in plans]
        merged[name] = _merge_layer(root.get_submodule(name), parts)
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
    total = sum(plan.values.numel() for plan in merged.values())
    config = adapters[0].config
    method = config.method
    if method == "spruft" and any(plan.kind != "rows" for plan in merged.values()):
        method = "speft"
    block_sizes = {plan.block_size for plan in merged.values()}
    config = dataclasses.replace(
        config,
        method=method,
        block_size=block_sizes.pop() if len(block_sizes) == 1 else None,
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


def _merge_layer(module: nn.Linear, parts: list) -> _Plan:
    """The union of the parts' positions with the weighted values summed (fp64, rounded once)."""
    in_features = module.in_features
    master = parts[0][0].values.dtype
    kinds = {plan.kind for plan, _ in parts}
    block_sizes = {plan.block_size for plan, _ in parts}
    if len(kinds) == 1 and kinds <= {"rows", "blocks"} and len(block_sizes) == 1:
        # Whole rows (or blocks of one size) everywhere: the union of rows (blocks), summed.
        union = torch.unique(torch.cat([plan.positions for plan, _ in parts]))
        acc = torch.zeros(union.numel(), *parts[0][0].values.shape[1:], dtype=torch.float64, device=union.device)
        for plan, w in parts:
            acc.index_add_(0, torch.searchsorted(union, plan.positions), plan.values.to(torch.float64) * w)
        return _Plan(kinds.pop(), union, acc.to(master), block_size=block_sizes.pop())
    flats, values = [], []
    for plan, w in parts:
        if plan.kind == "blocks":  # mixed with other kinds or block sizes: as its live entries
            flat, where = block_entries(plan.positions, (module.out_features, in_features), plan.block_size)
            flats.append(flat)
            values.append(plan.values.reshape(-1)[where].to(torch.float64) * w)
        elif plan.kind == "rows":
            columns = torch.arange(in_features, device=plan.positions.device)
            flats.append((plan.positions[:, None] * in_features + columns).reshape(-1))
            values.append(plan.values.reshape(-1).to(torch.float64) * w)
        else:
            flats.append(plan.positions.long())
            values.append(plan.values.to(torch.float64) * w)
    union = torch.unique(torch.cat(flats))
    acc = torch.zeros(union.numel(), dtype=torch.float64, device=union.device)
    for flat, value in zip(flats, values):
        acc.index_add_(0, torch.searchsorted(union, flat), value)
    index = union.to(index_dtype_for(module.out_features, in_features))
    return _Plan("entries", index, acc.to(master))
