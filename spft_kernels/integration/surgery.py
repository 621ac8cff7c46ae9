"""Module surgery shared by conversion, merging and adapter loading: finding the spft layers of a
model, swapping modules by qualified name, freezing for training and restoring the original
``requires_grad`` flags, counting trainable parameters."""

from __future__ import annotations

import contextlib

from typing import Callable, Mapping, Optional, Sequence

import torch.nn as nn

from ..masks.targets import find_target_linears, matches_target
from ..nn.registry import is_spft_layer

# Attributes get_spft_model leaves on the converted model (removed again by unload/merge_and_unload).
CONFIG_ATTR = "spft_config"
_FLAGS_ATTR = "_spft_original_requires_grad"

# ``(on_convert, on_unload)`` pairs called with the root model when a conversion finishes and when
# unload/merge_and_unload turn it back: integration/model_methods.py registers the peft-style
# methods here (it imports the modules that convert, so they cannot import it).
_CONVERSION_HOOKS: list = []


def add_conversion_hooks(on_convert, on_unload) -> None:
    """Register ``on_convert(root)`` and ``on_unload(root)`` (once per pair)."""
    if (on_convert, on_unload) not in _CONVERSION_HOOKS:
        _CONVERSION_HOOKS.append((on_convert, on_unload))


def finish_conversion(root: nn.Module, config) -> None:
    """What every conversion does last (get_spft_model, load_adapter, from_peft): keep the config on
    the model and run the conversion hooks."""
    setattr(root, CONFIG_ATTR, config)
    for on_convert, _ in _CONVERSION_HOOKS:
        on_convert(root)


# Wrappers whose parameters' names carry a prefix the model's own do not: DDP, DataParallel,
# FSDP1 and DeepSpeed's engine (``.module``), torch.compile's OptimizedModule (``._orig_mod``).
# FSDP2 (``fully_shard``) and accelerate keep the model itself.
_WRAPPER_ATTRIBUTES = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",
    "DeepSpeedEngine": "module",
    "PipelineEngine": "module",
    "OptimizedModule": "_orig_mod",
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP1 / DeepSpeed / torch.compile wrappers (by class
    name, so that none of those libraries is imported to ask)."""
    while True:
        attribute = next(
            (a for cls, a in _WRAPPER_ATTRIBUTES.items() if any(c.__name__ == cls for c in type(model).__mro__)), None
        )
        inner = getattr(model, attribute, None) if attribute else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    targets: Optional[Mapping[str, nn.Linear]] = None,
) -> dict[str, nn.Module]:
    """Swap each target linear (default: ``find_target_linears(model)``, every ``nn.Linear`` inside
    the transformer blocks) for ``make(name, linear)``; returns ``{name: new module}``. Every new
    module is made before the first is put in, so a ``make`` that raises leaves the model as it was."""
    targets = find_target_linears(model) if targets is None else targets
    replaced = {name: make(name, linear) for name, linear in targets.items()}
    for name, module in replaced.items():
        set_submodule(model, name, module)
    return replaced


def spft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified_name: layer}`` of the model's sparse fine-tuning layers, in module order."""
    return {name: m for name, m in unwrap_model(model).named_modules() if is_spft_layer(m)}


def plain_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s weight and bias tensors; an spft layer is unmerged first,
    so the weight holds W0 exactly. A plain linear is returned as it is."""
    if not is_spft_layer(layer):
        return layer
    layer.unmerge()  # (a kind that never writes into W0 has nothing to undo)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def saved_module_names(model: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    """The modules ``modules_to_save`` names (exact names or suffixes, as peft matches them),
    outermost only; each pattern must match something and no match may hold an spft layer."""
    if not patterns:
        return []
    root = unwrap_model(model)
    names = []
    for pattern in patterns:
        found = [name for name, _ in root.named_modules() if name and matches_target(name, [pattern])]
        if not found:
            raise ValueError(f"modules_to_save: no module of {type(root).__name__} matches {pattern!r}")
        names.extend(found)
    outermost = [n for n in dict.fromkeys(names) if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in outermost:
        if any(is_spft_layer(m) for m in root.get_submodule(name).modules()):
            raise ValueError(f"modules_to_save: {name!r} is (or contains) a sparse fine-tuning layer; it cannot also be trained fully")
    return outermost


def remember_requires_grad(model: nn.Module) -> None:
    """Record the ``requires_grad`` flags of a model about to be converted (once: a converted
    model keeps the flags of its plain form), so that unloading restores them."""
    root = unwrap_model(model)
    if not hasattr(root, _FLAGS_ATTR):
        setattr(root, _FLAGS_ATTR, {n: p.requires_grad for n, p in root.named_parameters()})


# Nonzero while merges are deferred (``deferred_merges``): layers built only to be captured and
# replaced again (named adapters) must not merge, since the layers they replace still hold the
# same weights, so a merge would go into a private copy of each weight.
_merges_deferred = 0


@contextlib.contextmanager
def deferred_merges():
    """Within the block, conversions and loads leave their layers unmerged (they merge at their
    first forward, or with ``merge_wanted``)."""
    global _merges_deferred
    _merges_deferred += 1
    try:
        yield
    finally:
        _merges_deferred -= 1


def merge_wanted(model: nn.Module, *, explicit_only: bool = False) -> None:
    """Merge every layer whose mode resolves to merged (unless merges are deferred); with
    ``explicit_only``, only the layers whose mode is ``'merged'`` (``auto`` ones merge at their
    first forward)."""
    if _merges_deferred:
        return
    for layer in spft_layers(model).values():
        layer.prepare_for_training(merge=not explicit_only or getattr(layer, "mode", None) == "merged")


def prepare_for_training(model: nn.Module, saved: Sequence[str], *, merge: bool = True) -> None:
    """Freeze everything except the spft deltas and the parameters of the ``saved`` modules, and
    (``merge``) merge the layers whose mode resolves to merged (O(nnz) each), so compiled graphs
    trace merged."""
    root = unwrap_model(model)
    for parameter in root.parameters():
        parameter.requires_grad_(False)
    for name in saved:
        for parameter in root.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    for layer in spft_layers(root).values():
        layer.prepare_for_training(merge=merge and not _merges_deferred)


def _finish_unload(root: nn.Module) -> None:
    flags = root.__dict__.pop(_FLAGS_ATTR, None) or {}
    for name, parameter in root.named_parameters():
        if name in flags:
            parameter.requires_grad_(flags[name])
    root.__dict__.pop(CONFIG_ATTR, None)
    for _, on_unload in _CONVERSION_HOOKS:
        on_unload(root)



def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: T || all params: N || trainable%: P`` as peft does; returns (T, N)."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
    return trainable, total


