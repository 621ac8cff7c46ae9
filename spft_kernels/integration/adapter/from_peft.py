"""``from_peft``: a peft model with SHiRA adapters becomes a converted model of this package, with
``SparseDeltaLinear`` layers holding the same values at the same positions.

peft's SHiRA layer computes ``F.linear(x, W0 + sparse(values * scaling), b)``, its weight copy
summed in the weight's dtype; the merged mode (``auto`` for a contiguous weight) writes the
same ``W0 + delta`` into the weight, so the outputs are bitwise equal (fp32, fp64, and bf16/fp16
when the SHiRA values are in the weight's dtype; fp32 values on a bf16/fp16 weight are rounded
once here, by peft after a first rounding, so the two may differ by one unit in the last place
of a weight entry). ``split`` and ``fused`` compute ``x W0ᵀ + x Δᵀ``: within the error budget of
the layers (docs/architecture.md), not bitwise. Any rank and any mask function: only the stored positions
matter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...masks.targets import weight_sharers
from ...nn.registry import plain_linear_type, universal_kind
from ...ops.index import canonical_flat_index
from ..config import SpftConfig
from ..surgery import finish_conversion, prepare_for_training, remember_requires_grad, set_submodule
from .peft_shira import shira_flat


def from_peft(peft_model: nn.Module, *, mode: str = "auto", backend: str = "auto") -> nn.Module:
    """Convert a peft model whose active adapter is SHiRA (``peft.get_peft_model(model,
    ShiraConfig(...))``, or ``PeftModel.from_pretrained`` of a SHiRA folder) and return its base
    model with ``SparseDeltaLinear`` layers at the SHiRA positions, holding ``shira_weight *
    scaling``. The adapter's ``modules_to_save`` keep their trained copies and stay trainable;
    the deltas are trainable, everything else frozen, and the model carries an ``SpftConfig``
    (``sparta`` for peft's random masks, else ``speft``), so ``save_adapter``, ``merge_and_unload``
    and training continue as for ``get_spft_model``.

    The peft model is consumed, as by peft's ``unload()``: use the returned model from then on.
    Everything is checked before anything changes: a non-SHiRA adapter, several active adapters,
    a layer merged into its base weight (W0 is not recoverable exactly), disabled adapters, a
    non-``nn.Linear`` base layer or bad indices raise ``ValueError`` naming the layer."""
    tuner = _tuner(peft_model)
    adapters = list(tuner.active_adapters)
    if len(adapters) != 1:
        raise ValueError(
            f"from_peft: the peft model has {len(adapters)} active adapters {adapters}; activate one with "
            "set_adapter (spft layers hold one delta)"
        )
    adapter = adapters[0]
    peft_config = tuner.peft_config[adapter]
    peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
    if peft_type != "SHIRA":
        raise ValueError(
            f"from_peft: adapter {adapter!r} is a peft {peft_type} adapter; from_peft converts SHiRA (sparse) "
            "adapters only (for LoRA, merge it with peft's merge_and_unload and convert with get_spft_model)"
        )
    base = tuner.model
    layers, saved = {}, []
    for name, module in base.named_modules():
        if _is_modules_to_save(module) and adapter in module.modules_to_save:
            saved.append(name)
        if not hasattr(module, "shira_weight") or adapter not in module.shira_weight:
            continue
        layers[name] = _layer(name, module, adapter, mode, backend)
    if not layers:
        raise ValueError(f"from_peft: adapter {adapter!r} has no SHiRA layer")
    shared = _shared_weights(base, layers, mode)
    config = SpftConfig(
        method="sparta" if getattr(peft_config, "mask_type", None) == "random" else "speft",
        num_params=max(1, sum(layer.delta.numel() for layer in layers.values())),
        target_modules=list(layers), modules_to_save=saved or None, mode=mode, backend=backend,
    )
    wrappers = [base.get_submodule(name) for name in layers]
    tuner.unload()  # peft's own way back: base layers and the trained modules_to_save copies in place
    for wrapper in wrappers:
        # The peft model is consumed: its SHiRA wrappers let go of the base layers (peft keeps every
        # wrapper that ran a forward in an lru_cache for good, which would hold the weights and so
        # keep mode 'auto' from merging: nn/frozen_base.py, ``observers``).
        wrapper._modules.pop("base_layer", None)
    del wrappers
    for name, layer in layers.items():
        set_submodule(base, name, layer)
        if name in shared:
            layer.mark_weight_shared(shared[name])  # split form: W0 is never written
    remember_requires_grad(base)
    prepare_for_training(base, saved)
    finish_conversion(base, config)
    return base


def _shared_weights(base: nn.Module, layers: dict, mode: str) -> dict:
    """``{layer: other module}`` for the SHiRA layers whose base weight another module holds too
    (a tied LM head and input embedding), as ``get_spft_model`` finds them; checked before the peft
    model is unloaded. Such a layer computes in the split form; mode 'merged' is refused."""
    suffix = ".base_layer"
    found = weight_sharers(base, [f"{name}{suffix}" for name in layers])
    shared = {}
    for holder, other in found.items():
        name = holder[: -len(suffix)]
        if other == name:  # the SHiRA wrapper around its own base layer
            continue
        if mode == "merged":
            raise ValueError(
                f"from_peft: layer {name!r} shares its weight with {other!r} (e.g. a tied LM head and input "
                "embedding); mode='merged' would write W0 + delta into it too. Use mode='auto' (the split form "
                "for such a layer, W0 untouched) or 'split'"
            )
        shared[name] = other.removesuffix(suffix)
    return shared


def _tuner(peft_model: nn.Module):
    """The peft tuner (``PeftModel.base_model``, a ``BaseTuner`` holding ``.model`` and
    ``.peft_config``) of a PeftModel, or the tuner itself."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        raise ValueError("from_peft: peft is not installed") from None
    tuner = getattr(peft_model, "base_model", None) if not isinstance(peft_model, BaseTuner) else peft_model
    if not isinstance(tuner, BaseTuner):
        raise ValueError(f"from_peft expects a peft model (PeftModel or a SHiRA tuner), got {type(peft_model).__name__}")
    return tuner


def _is_modules_to_save(module: nn.Module) -> bool:
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


def _layer(name: str, module: nn.Module, adapter: str, mode: str, backend: str) -> nn.Module:
    """The SparseDeltaLinear equivalent of one peft SHiRA layer, built on its base linear (shared
    weight, nothing written yet)."""
    if getattr(module, "merged", False):
        raise ValueError(
            f"from_peft: layer {name!r} has its SHiRA delta merged into the base weight, so W0 cannot be recovered "
            "exactly; convert the unmerged peft model"
        )
    if getattr(module, "disable_adapters", False):
        raise ValueError(f"from_peft: layer {name!r} has its adapters disabled; enable them (or use the base model)")
    linear = module.get_base_layer()
    if not plain_linear_type(linear):
        raise ValueError(f"from_peft: layer {name!r} has a {type(linear).__name__} base, not an nn.Linear")
    with torch.no_grad():
        values = module.shira_weight[adapter] * module.scaling[adapter]  # peft's own product, bit for bit
    where = f"from_peft: layer {name!r}"
    indices = module.shira_indices[adapter].to(linear.weight.device)
    flat = shira_flat(where, indices, linear.out_features, linear.in_features)
    flat, order = canonical_flat_index(flat, linear.out_features, linear.in_features, device=flat.device, name=where)
    if order is not None:
        values = values[order]
    master = torch.float64 if linear.weight.dtype == torch.float64 else torch.float32
    layer = universal_kind().from_linear(linear, flat, mode=mode, backend=backend, delta_dtype=master, name=name)
    with torch.no_grad():
        layer.delta.copy_(values.detach())
    return layer
