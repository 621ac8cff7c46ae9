"""``load_adapter``: check an adapter against a model's base weights, then install it, all or
nothing."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from ...masks.targets import weight_reading_parent, weight_sharers
from ...nn.frozen_base import base_kind_for, contiguity_refusal, sharding
from ...nn.registry import is_spft_layer, kind_class, plain_linear_type
from ...nn.stored import dtype_name, StoredLayer
from ...ops._guards import is_inference, outside_inference_mode
from ..config import MODES, SpftConfig
from ..surgery import (
    _FLAGS_ATTR,
    CONFIG_ATTR,
    merge_wanted,
    finish_conversion,
    plain_linear,
    prepare_for_training,
    remember_requires_grad,
    set_submodule,
    spft_layers,
    unwrap_model,
)
from .files import PathLike
from .folder import read_any_adapter
from .format import fingerprint
from .read import _Adapter

_BASE_DIFFERS = (
    "{where}: the model's base weight differs from the one the adapter was trained on (fingerprint "
    "mismatch: same shape and dtype, different values); load it onto the base model it was trained on"
)


def _check_against(root: nn.Module, adapter: _Adapter, check_base: bool, mode: Optional[str] = None) -> dict:
    """``{name: StoredLayer}`` ready to install (canonical positions and master-dtype values on the
    weight's device): every layer of the adapter checked against the model (module, shape,
    dtype, positions, fingerprint) and its saved modules' state dict keys and shapes. Reads the
    model only."""
    modules = dict(root.named_modules())
    plans = {}
    for name, record in adapter.layers.items():
        where = f"{adapter.path}: layer {name!r}"
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{where} is not in the model ({type(root).__name__}); the adapter was made for another architecture")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{where}: the model's module is a {type(module).__name__}, not a linear layer")
        if not plain_linear_type(module) and not is_spft_layer(module):
            raise ValueError(
                f"{where}: the model's module is a {type(module).__name__}, not a plain nn.Linear; it cannot be "
                "converted (as in get_spft_model)"
            )
        reason = weight_reading_parent(root, name)
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        shape = (module.out_features, module.in_features)
        if shape != record.shape:
            raise ValueError(f"{where}: the adapter is for a weight of shape {record.shape}, the model's is {shape}")
        weight = module.weight
        how = sharding(weight)
        if how is not None:
            raise ValueError(
                f"{where}: the model's weight is sharded ({how}); load the adapter before sharding (fully_shard, "
                "deepspeed.initialize), with mode='split' or 'auto'"
            )
        if weight.device.type == "meta":
            raise ValueError(f"{where}: the model's weight is on the meta device; materialise the model first")
        base_kind = module.base_kind if is_spft_layer(module) else base_kind_for(module)
        problem = base_kind.check_compatible(module, record.base) if check_base else None
        if problem is not None:
            raise ValueError(
                f"{where}: {problem}; the adapter's deltas are relative to the base it trained on. Load the base "
                "quantized as the adapter records, or pass check_base=False to load it anyway"
            )
        if check_base and dtype_name(weight.dtype) != record.weight_dtype:
            raise ValueError(
                f"{where}: the adapter was trained on a {record.weight_dtype} base, the model's weight is "
                f"{dtype_name(weight.dtype)}; load onto a {record.weight_dtype} model and cast afterwards, or pass "
                "check_base=False"
            )
        device = weight.device
        master = torch.float64 if weight.dtype == torch.float64 else torch.float32
        cls = kind_class(record.kind, where)
        positions = record.positions
        values = {label: value.to(device) for label, value in record.values.items()}
        if positions is not None:
            if cls._MERGE_NEEDS_CONTIGUOUS_WEIGHT and _layer_mode(module, adapter.config, mode) == "merged":
                refusal = contiguity_refusal(weight, True, where)
                if refusal is not None:
                    raise ValueError(f"{where}: mode 'merged' needs a contiguous weight")
            positions, order = cls.check_positions(positions.to(device), shape, device, where, record.options)
            if order is not None:
                values = {label: value[order] for label, value in values.items()}
        trained = cls.flat_positions(positions, shape, record.options) if positions is not None else None
        # A folder peft wrote has no fingerprint (None): nothing to check the base against.
        if check_base and record.fingerprint is not None:
            covered = torch.empty(0, dtype=torch.int64) if trained is None else trained
            if fingerprint(module, covered) != record.fingerprint:
                raise ValueError(_BASE_DIFFERS.format(where=where))
        values = {label: value.to(master) for label, value in values.items()}
        plans[name] = record.replace(positions=positions, values=values)
    _check_sharing(root, adapter, plans, mode)
    for module_name, state in adapter.saved.items():
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"{adapter.path}: saved module {module_name!r} is not in the model")
        own = module.state_dict()
        if set(own) != set(state):
            raise ValueError(
                f"{adapter.path}: saved module {module_name!r} has keys {sorted(state)}, the model's has {sorted(own)}"
            )
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise ValueError(
                    f"{adapter.path}: saved {module_name}.{key} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(own[key].shape)}"
                )
    return plans


def _check_sharing(root: nn.Module, adapter: _Adapter, plans: dict, mode: Optional[str] = None) -> None:
    """Layers whose weight another module holds too (a tied LM head) are planned in the split form,
    which never writes into W0; mode 'merged', a saved module that trains that weight, and
    merging into an inference tensor weight are refused (as in get_spft_model)."""
    modules = dict(root.named_modules())
    for name, other in weight_sharers(root, list(plans)).items():
        where = f"{adapter.path}: layer {name!r}"
        trained = [s for s in adapter.saved if other == s or other.startswith(s + ".")]
        if trained:
            raise ValueError(
                f"{where} shares its weight with {other!r}, which the adapter's saved module {trained[0]!r} would "
                "overwrite: the delta's base W0 would change under it"
            )
        if kind_class(plans[name].kind).writes_w0:
            if _layer_mode(modules[name], adapter.config, mode) == "merged":
                raise ValueError(
                    f"{where} shares its weight with {other!r} (e.g. a tied LM head and input embedding); mode "
                    "'merged' would write W0 + delta into it too. Load with mode 'auto' or 'split' (set the "
                    "layer's mode, or the config's)"
                )
            plans[name].shared_with = other
    for name, plan in plans.items():
        module = modules[name]
        writes = kind_class(plan.kind).writes_w0
        if writes and is_inference(module.weight) and _layer_mode(module, adapter.config, mode) == "merged":
            raise ValueError(
                f"{adapter.path}: layer {name!r}: the model's weight is an inference tensor (made under "
                "torch.inference_mode), which cannot be merged into outside inference mode; use mode 'auto' or "
                "'split', or build the model outside inference_mode"
            )


def _layer_mode(module: nn.Module, config: SpftConfig, given: Optional[str] = None) -> str:
    """The mode ``load_adapter`` was given; else a converted layer keeps its own mode and a plain
    linear takes the config's."""
    if given is not None:
        return given
    mode = getattr(module, "mode", None) if is_spft_layer(module) else None
    return mode if isinstance(mode, str) else config.mode


# --- installing --------------------------------------------------------------------------------


def _install(root: nn.Module, plans: dict, saved: dict, config: SpftConfig, mode: Optional[str] = None) -> None:
    """Write checked plans into the model, all or nothing: if anything fails on the way (memory,
    an interrupt), the model is put back as it was (the modules, their merged state, the saved
    modules' values, the flags) and the error is raised again."""
    snapshot = _Snapshot(root, list(plans) + list(spft_layers(root)), list(saved))
    try:
        with outside_inference_mode():  # the new layers' state must outlive an inference_mode block
            _install_checked(root, plans, saved, config, mode)
    except BaseException:
        snapshot.restore()
        raise
    # The new layers merge only now: until the snapshot is gone, the layers it keeps for a rollback
    # hold the same weights, and a layer merges only into a weight nothing else holds (observers).
    # Mode 'auto' merges at the first forward instead: a loaded delta is not zero, and a model
    # sharded before that forward (FSDP2, ZeRO-3) must shard W0, not W0 + delta.
    del snapshot
    with outside_inference_mode():
        merge_wanted(root, explicit_only=True)


class _Snapshot:
    """What ``_install`` changes, to put back on failure: the modules at the touched names (an spft
    layer's merged weight is restored by merging it again: O(nnz), bitwise the same W0 + Δ), the
    saved modules' state (a copy: they are small, e.g. a classification head), the
    ``requires_grad`` flags and the attributes get_spft_model leaves on the model."""

    def __init__(self, root: nn.Module, names: list, saved: list) -> None:
        self.root = root
        self.modules = {name: root.get_submodule(name) for name in dict.fromkeys(names)}
        self.merged = [m for m in self.modules.values() if is_spft_layer(m) and getattr(m, "merged", False)]
        with torch.no_grad(), outside_inference_mode():
            self.saved = {n: {k: t.detach().clone() for k, t in root.get_submodule(n).state_dict().items()} for n in saved}
        # By name: a list holding the Parameters would be one more holder of every weight, and a
        # layer merges only into a weight nothing else holds (nn/frozen_base.py, observers).
        self.flags = {name: p.requires_grad for name, p in root.named_parameters(remove_duplicate=False)}
        self.attributes = {a: root.__dict__[a] for a in (CONFIG_ATTR, _FLAGS_ATTR) if a in root.__dict__}

    def restore(self) -> None:
        root = self.root
        with torch.no_grad(), outside_inference_mode():
            for name, original in self.modules.items():
                current = root.get_submodule(name)
                if current is not original:
                    if is_spft_layer(current):
                        current.unmerge()  # W0 back in the shared weight (a no-op for a kind that never writes it)
                    set_submodule(root, name, original)
            current = None  # the replaced layer holds the weight too: a layer merges only into a weight it alone holds
            for module_name, state in self.saved.items():
                module_state = root.get_submodule(module_name).state_dict(keep_vars=True)
                for key, value in state.items():
                    module_state[key].copy_(value)
            module_state = None
            for name, parameter in root.named_parameters(remove_duplicate=False):
                if name in self.flags:
                    parameter.requires_grad_(self.flags[name])
            parameter = None
            for layer in self.merged:
                layer.merge()
        for attribute in (CONFIG_ATTR, _FLAGS_ATTR):
            root.__dict__.pop(attribute, None)
        root.__dict__.update(self.attributes)


def _install_checked(root: nn.Module, plans: dict, saved: dict, config: SpftConfig, mode_given: Optional[str] = None) -> None:
    """Each planned layer is rebuilt on its W0 with the new positions and values, spft layers the
    adapter does not have become plain linears again, saved modules get their state, and the
    model is frozen for training as get_spft_model leaves it."""
    remember_requires_grad(root)
    modules = dict(root.named_modules())
    for name, layer in spft_layers(root).items():
        if name not in plans:
            set_submodule(root, name, plain_linear(layer))
    for name, plan in plans.items():
        current = modules[name]
        backend = current.backend if is_spft_layer(current) else config.backend
        mode = _layer_mode(current, config, mode_given)
        cls = kind_class(plan.kind)
        if not cls.writes_w0:
            mode = "auto"  # (a kind that never writes into W0 has one way to compute)
        layer = cls.build_stored(plain_linear(current), plan, mode=mode, backend=backend, name=name)
        set_submodule(root, name, layer)
    for module_name, state in saved.items():
        root.get_submodule(module_name).load_state_dict(state)
    prepare_for_training(root, list(saved), merge=False)  # merged by _install, once the snapshot is gone
    finish_conversion(root, config)


def load_adapter(
    model: nn.Module, path: PathLike, *, check_base: bool = True, mode: Optional[str] = None
) -> nn.Module:
    """Load an adapter into ``model`` and return it (the same object). ``path``: an adapter file,
    a folder ``save_adapter`` wrote, or a SHiRA adapter folder peft saved (``folder.py``).

    A plain model is converted (its linears become spft layers at the stored positions, as
    ``PeftModel.from_pretrained`` does for LoRA); a converted model gets its adapter replaced
    (spft layers the file does not have become plain linears again). The deltas and the
    ``modules_to_save`` are trainable afterwards, everything else frozen. Everything is checked
    before anything is written (see the module docstring), so a ``ValueError`` leaves the model
    unchanged; a failure while installing (memory, an interrupt) puts the model back bitwise as
    it was and re-raises. Layers whose weight another module shares (a tied LM head) are built in
    the split form; containers that read a linear's weight themselves are refused. Works under
    ``torch.inference_mode``. ``check_base=False`` skips the base-weight fingerprint and dtype
    check (shapes are still checked). ``mode``: the layers' mode (default: a converted layer
    keeps its own, a plain linear takes the adapter config's); load with ``mode='split'`` (or
    call ``spft.set_mode(model, 'split')``) before sharding with FSDP2 or ZeRO-3: a layer that
    merged before sharding leaves W0 + Δ in the shards."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"load_adapter: unknown mode {mode!r}; choose one of {MODES}")
    root = unwrap_model(model)
    adapter = read_any_adapter(path, root)
    plans = _check_against(root, adapter, check_base, mode)
    if mode is not None:
        for name, plan in plans.items():
            cls = kind_class(plan.kind)
            if cls.writes_w0 and hasattr(cls, "check_mode"):  # (a kind that never writes W0 computes one way)
                cls.check_mode(mode, f"{adapter.path}: layer {name!r}")
        adapter.config = dataclasses.replace(adapter.config, mode=mode)
    _install(root, plans, adapter.saved, adapter.config, mode)
    return model
