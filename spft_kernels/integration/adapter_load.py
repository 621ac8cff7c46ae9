"""``load_adapter``: check an adapter against a model's base weights, then install it, all or
nothing."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn as nn

from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from ..ops.index import SparseIndex, canonical_rows
from .adapter_format import _dtype_name, _is_dtensor, fingerprint, _KINDS, PathLike, _PST_FACTORS
from .adapter_folder import read_any_adapter
from .adapter_read import _Adapter
from .config import SpftConfig
from .surgery import (
    CONFIG_ATTR,
    plain_linear,
    prepare_for_training,
    remember_requires_grad,
    set_submodule,
    SPFT_LAYER_TYPES,
    spft_layers,
    unwrap_model,
)


@dataclasses.dataclass
class _Plan:
    """One layer, checked against the model and ready to install."""

    kind: str
    positions: Optional[torch.Tensor]  # canonical, on the weight's device; None for pst
    values: Union[torch.Tensor, dict]  # sorted like the positions, master dtype, on the weight's device
    pst: Optional[dict] = None


_BASE_DIFFERS = (
    "{where}: the model's base weight differs from the one the adapter was trained on (fingerprint "
    "mismatch: same shape and dtype, different values); load it onto the base model it was trained on"
)


def _check_against(root: nn.Module, adapter: _Adapter, check_base: bool) -> dict:
    """``{name: _Plan}``: every layer of the adapter checked against the model (module, shape,
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
        shape = (module.out_features, module.in_features)
        if shape != record.shape:
            raise ValueError(f"{where}: the adapter is for a weight of shape {record.shape}, the model's is {shape}")
        weight = module.weight
        if _is_dtensor(weight):
            raise ValueError(f"{where}: the model is sharded (FSDP2); load the adapter before fully_shard")
        if weight.device.type == "meta":
            raise ValueError(f"{where}: the model's weight is on the meta device; materialise the model first")
        if check_base and _dtype_name(weight.dtype) != record.weight_dtype:
            raise ValueError(
                f"{where}: the adapter was trained on a {record.weight_dtype} base, the model's weight is "
                f"{_dtype_name(weight.dtype)}; load onto a {record.weight_dtype} model and cast afterwards, or pass "
                "check_base=False"
            )
        device = weight.device
        master = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if record.kind == "pst":
            if check_base and fingerprint(module, "pst", None) != record.fingerprint:
                raise ValueError(_BASE_DIFFERS.format(where=where))
            values = {label: t.to(device, master) for label, t in record.values.items()}
            plans[name] = _Plan("pst", None, values, record.pst)
            continue
        positions = record.positions.to(device)
        if record.kind == "entries":
            if not weight.is_contiguous() and _layer_mode(module, adapter.config) == "merged":
                raise ValueError(f"{where}: mode 'merged' needs a contiguous weight")
            sparse_index, order = SparseIndex.build(positions, *shape, device=device, name=where)
            positions = sparse_index.flat
        else:
            positions, order = canonical_rows(positions, shape[0], device=device, name=where)
        values = record.values.to(device)
        if order is not None:
            values = values[order]
        # A folder peft wrote has no fingerprint (None): nothing to check the base against.
        if check_base and record.fingerprint is not None and fingerprint(module, record.kind, positions) != record.fingerprint:
            raise ValueError(_BASE_DIFFERS.format(where=where))
        plans[name] = _Plan(record.kind, positions, values.to(master))
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


def _layer_mode(module: nn.Module, config: SpftConfig) -> str:
    return module.mode if isinstance(module, (SparseDeltaLinear, RowSparseLinear)) else config.mode


# --- installing --------------------------------------------------------------------------------


def _install(root: nn.Module, plans: dict, saved: dict, config: SpftConfig) -> None:
    """Write checked plans into the model (nothing here can fail on checked input): each planned
    layer is rebuilt on its W0 with the new positions and values, spft layers the adapter does not
    have become plain linears again, saved modules get their state, and the model is frozen for
    training as get_spft_model leaves it."""
    remember_requires_grad(root)
    modules = dict(root.named_modules())
    for name, layer in spft_layers(root).items():
        if name not in plans:
            set_submodule(root, name, plain_linear(layer))
    for name, plan in plans.items():
        current = modules[name]
        backend = current.backend if isinstance(current, SPFT_LAYER_TYPES) else config.backend
        if plan.kind == "pst":
            set_submodule(root, name, _pst_layer(plain_linear(current), plan, backend, name))
            continue
        mode = _layer_mode(current, config)
        layer = _KINDS[plan.kind].from_linear(plain_linear(current), plan.positions, mode=mode, backend=backend, name=name)
        with torch.no_grad():
            layer.delta.copy_(plan.values)
        set_submodule(root, name, layer)
    for module_name, state in saved.items():
        root.get_submodule(module_name).load_state_dict(state)
    prepare_for_training(root, list(saved))
    setattr(root, CONFIG_ATTR, config)


def _pst_layer(linear: nn.Linear, plan: _Plan, backend: str, name: str) -> PSTLinear:
    options = plan.pst
    layer = PSTLinear.from_linear(
        linear, options["sparsity"], options["r1"], options["r2"], beta=options["beta"], alpha1=options["alpha1"],
        alpha2=options["alpha2"], abs_score_grad=options["abs_score_grad"], backend=backend, name=name,
    )
    with torch.no_grad():
        for label, factor in zip(_PST_FACTORS, layer.factors()):
            factor.copy_(plan.values[label])
    return layer


def load_adapter(model: nn.Module, path: PathLike, *, check_base: bool = True) -> nn.Module:
    """Load an adapter into ``model`` and return it (the same object). ``path``: an adapter file,
    a folder ``save_adapter`` wrote, or a SHiRA adapter folder peft saved (``adapter_folder.py``).

    A plain model is converted (its linears become spft layers at the stored positions, as
    ``PeftModel.from_pretrained`` does for LoRA); a converted model gets its adapter replaced
    (spft layers the file does not have become plain linears again). The deltas and the
    ``modules_to_save`` are trainable afterwards, everything else frozen. Everything is checked
    before anything is written (see the module docstring), so a ``ValueError`` leaves the model
    unchanged. ``check_base=False`` skips the base-weight fingerprint and dtype check (shapes are
    still checked)."""
    root = unwrap_model(model)
    adapter = read_any_adapter(path, root)
    plans = _check_against(root, adapter, check_base)
    _install(root, plans, adapter.saved, adapter.config)
    return model
