"""Named adapters, peft-style: several adapters on one base, one active, switched in and out
(``add_adapter``, ``load_adapter(path, adapter_name)``, ``set_adapter``, ``delete_adapter``), and
``disable_adapter()`` (``disabled_adapter.py``).

The active adapter is the model's spft layers, as after ``get_spft_model`` ("default" unless it
was switched). An inactive adapter is kept aside as the content of its adapter file
(``adapter/format.py``: tensors on the CPU, metadata with the base fingerprints and the
checksum), the same bytes ``save_adapter`` would write; ``set_adapter`` writes the active one
aside that way and installs the other with ``load_adapter``'s checked, all-or-nothing install.
Every layer is built on the model's own W0 (the weight Parameter the base linear had), so no
adapter ever holds a copy of the base, and each kind's mode (merged or split) is kept by layer.

What is kept and what is rebuilt:

- ``set_adapter`` and ``delete_adapter`` of the active one rebuild the layers: their deltas are new
  Parameters holding the adapter's values (bitwise), so make the optimizer after choosing the
  adapter to train (a ``Trainer`` makes its optimizer when training starts);
- ``add_adapter`` and ``load_adapter(path, adapter_name=...)`` build the new adapter on the model,
  write it aside and put the active adapter's own layer objects back (``_Snapshot``): its deltas,
  their gradients and an optimizer over them are untouched;
- ``disable_adapter()`` changes nothing at all (``disabled_adapter.py``).

``modules_to_save`` are trained in place (their base values are not kept): adapters can be switched
only between adapters that save the same modules, ``add_adapter`` needs a config without
``modules_to_save`` and an active adapter without them, and ``disable_adapter`` refuses an adapter
with saved modules (the model without it would not be the base model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import warnings
from typing import Callable, Iterable, Optional

import torch.nn as nn

from .adapter.files import PathLike
from .adapter.folder import read_any_adapter
from .adapter.load import _check_against, _install, _Snapshot, load_adapter
from .adapter.read import parse_adapter
from .adapter.save import adapter_contents, model_config
from .config import SpftConfig
from .conversion import get_spft_model
from .disabled_adapter import layers_disabled
from .surgery import (
    CONFIG_ATTR,
    deferred_merges,
    finish_conversion,
    plain_linear,
    saved_module_names,
    set_submodule,
    spft_layers,
    unwrap_model,
)

DEFAULT_ADAPTER = "default"
STORE_ATTR = "_spft_adapters"


@dataclasses.dataclass
class AsideAdapter:
    """An inactive adapter: its adapter file's ``tensors`` (CPU) and ``metadata``."""

    tensors: dict
    metadata: dict

    @property
    def config(self) -> SpftConfig:
        return SpftConfig.from_json(self.metadata["config"])

    @property
    def saved_modules(self) -> set:
        return set(json.loads(self.metadata["saved_modules"]))


@dataclasses.dataclass
class AdapterStore:
    """What a converted model keeps about its named adapters (``model._spft_adapters``)."""

    active: str = DEFAULT_ADAPTER
    aside: dict = dataclasses.field(default_factory=dict)  # name -> AsideAdapter, in the order added
    disabled: int = 0  # open disable_adapter() contexts

    @property
    def names(self) -> list:
        return [self.active, *self.aside]


def adapter_store(model: nn.Module) -> AdapterStore:
    root = unwrap_model(model)
    if not spft_layers(root):
        raise ValueError("the model has no sparse fine-tuning layers (convert it with get_spft_model)")
    store = root.__dict__.get(STORE_ATTR)
    if store is None:
        store = root.__dict__[STORE_ATTR] = AdapterStore()
    return store


def forget_adapters(root: nn.Module) -> None:
    """Drop the named adapters (unload and merge_and_unload keep only the active one's result)."""
    root.__dict__.pop(STORE_ATTR, None)


def adapter_names(model: nn.Module) -> list:
    """The model's adapters, the active one first."""
    return adapter_store(model).names


def active_adapters(model: nn.Module) -> list:
    """``[name of the active adapter]`` (transformers' ``active_adapters()``)."""
    return [adapter_store(model).active]


def aside_adapter(model: nn.Module, name: str) -> AsideAdapter:
    """The inactive adapter ``name`` (``KeyError`` if it is not one)."""
    return adapter_store(model).aside[name]


# --- switching -------------------------------------------------------------------------------------


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter; the active one is kept aside (bitwise). The layers
    are rebuilt on the same W0 (module docstring: make the optimizer afterwards)."""
    root = unwrap_model(model)
    store = adapter_store(root)
    _refuse_while_disabled(store, "set_adapter")
    _check_name(store, adapter_name, "set_adapter", exists=True)
    if adapter_name == store.active:
        return
    target = store.aside[adapter_name]
    current = _capture(root, "set_adapter")
    if current.saved_modules != target.saved_modules:
        raise ValueError(
            f"set_adapter: adapter {store.active!r} trains modules_to_save {sorted(current.saved_modules)} and "
            f"{adapter_name!r} trains {sorted(target.saved_modules)}; those modules are trained in place (their base "
            "values are not kept), so the model cannot switch between them"
        )
    _install_aside(root, adapter_name, target)
    del store.aside[adapter_name]
    store.aside[store.active] = current
    store.active = adapter_name


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    config: SpftConfig,
    batches: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    **scoring_kwargs,
) -> None:
    """A new adapter ``adapter_name`` from ``config``, its positions chosen on the base model as
    ``get_spft_model`` chooses them (data metrics need ``batches`` and ``loss_fn``), with zero
    deltas; kept aside until ``set_adapter(adapter_name)``. The active adapter stays as it is."""
    root = unwrap_model(model)
    store = adapter_store(root)
    _refuse_while_disabled(store, "add_adapter")
    _check_name(store, adapter_name, "add_adapter", exists=False)
    if not isinstance(config, SpftConfig):
        raise ValueError(f"add_adapter: config must be an SpftConfig, got {type(config).__name__}")
    current_saved = _saved_names(root)
    if config.modules_to_save or current_saved:
        raise ValueError(
            f"add_adapter: modules_to_save (the new config's {config.modules_to_save}, the active adapter's "
            f"{current_saved}) are trained in place and their base values are not kept, so a new adapter cannot "
            "start from them; save each adapter with its modules and add it with load_adapter(path, adapter_name=...)"
        )
    store.aside[adapter_name] = _build_aside(
        root, "add_adapter", lambda: (_to_plain(root), get_spft_model(root, config, batches, loss_fn, **scoring_kwargs))
    )


def load_named_adapter(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None, *,
                       check_base: bool = True) -> None:
    """``model.load_adapter(path, adapter_name)``: the adapter at ``path`` (any form ``load_adapter``
    reads), checked against the base and kept aside as ``adapter_name`` (an inactive adapter of
    that name is replaced); ``adapter_name`` None or the active one's name replaces the active
    adapter, as ``spft.load_adapter`` does."""
    root = unwrap_model(model)
    store = adapter_store(root)
    _refuse_while_disabled(store, "load_adapter")
    if adapter_name is None or adapter_name == store.active:
        load_adapter(root, path, check_base=check_base)
        return
    _check_name(store, adapter_name, "load_adapter", exists=None)
    adapter = read_any_adapter(path, root)
    plans = _check_against(root, adapter, check_base)  # everything checked before the model changes
    current_saved = set(_saved_names(root))
    if set(adapter.saved) != current_saved:
        raise ValueError(
            f"load_adapter: {adapter.path} trains modules_to_save {sorted(adapter.saved)} and the active adapter "
            f"{store.active!r} trains {sorted(current_saved)}; those modules are trained in place, so the model "
            "could not switch between them"
        )
    store.aside[adapter_name] = _build_aside(
        root, "load_adapter", lambda: _install(root, plans, adapter.saved, adapter.config)
    )


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete an adapter. Deleting the active one activates the first other adapter (with a warning,
    as peft does); the model's only adapter is removed with ``unload`` instead."""
    root = unwrap_model(model)
    store = adapter_store(root)
    _refuse_while_disabled(store, "delete_adapter")
    _check_name(store, adapter_name, "delete_adapter", exists=True)
    if adapter_name != store.active:
        del store.aside[adapter_name]
        return
    if not store.aside:
        raise ValueError(
            f"delete_adapter: {adapter_name!r} is the model's only adapter; spft.unload(model) (or "
            "model.unload()) removes it and gives the plain model back"
        )
    successor = next(iter(store.aside))
    warnings.warn(f"delete_adapter: adapter {adapter_name!r} was active; {successor!r} is active now", stacklevel=2)
    set_adapter(root, successor)
    del store.aside[adapter_name]


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """A context in which the model computes its base model, bitwise (``disabled_adapter.py``);
    nothing of the adapter or its training changes. Refused for an adapter with
    ``modules_to_save`` (trained in place: the base values are gone)."""
    root = unwrap_model(model)
    store = adapter_store(root)
    saved = _saved_names(root)
    if saved:
        raise ValueError(
            f"disable_adapter: the active adapter trains modules_to_save {saved} in place, so their base values "
            "are not kept and the model without its adapter is not the base model"
        )
    store.disabled += 1
    try:
        with layers_disabled(root):
            yield model
    finally:
        store.disabled -= 1


# --- helpers ---------------------------------------------------------------------------------------


def _check_name(store: AdapterStore, name, action: str, *, exists: Optional[bool]) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{action}: an adapter name must be a non-empty string usable as a folder name, got {name!r}")
    if exists and name not in store.names:
        raise ValueError(f"{action}: no adapter named {name!r}; the model has {store.names}")
    if exists is False and name in store.names:
        raise ValueError(f"{action}: the model already has an adapter named {name!r} (delete_adapter it first)")


def _refuse_while_disabled(store: AdapterStore, action: str) -> None:
    if store.disabled:
        raise RuntimeError(f"{action}: not inside disable_adapter(); leave the context first")


def _saved_names(root: nn.Module) -> list:
    config = getattr(root, CONFIG_ATTR, None)
    return saved_module_names(root, config.modules_to_save) if config is not None else []


def _capture(root: nn.Module, action: str) -> AsideAdapter:
    """The active adapter as its adapter file's content (copies: the layers may live on)."""
    layers = spft_layers(root)
    _refuse_folded(layers, action)
    tensors, metadata = adapter_contents(root, layers, model_config(root, layers))
    return AsideAdapter({key: tensor.clone() for key, tensor in tensors.items()}, metadata)


def _refuse_folded(layers: dict, action: str) -> None:
    folded = [name for name, layer in layers.items() if layer.folded_w0() is not None]
    if folded:
        raise ValueError(
            f"{action}: layer {folded[0]!r} had dynamic-mask updates folded into its W0, so the base is no longer "
            "the one every adapter shares; save the adapter (save_adapter writes it for the original base), "
            "unload and load it back first"
        )


def _refuse_lent(root: nn.Module, action: str) -> None:
    """A merged layer whose W0 a live state dict holds cannot merge again after the new adapter was
    built on its weight (``nn/w0_loan.py``): refused before anything changes."""
    layers = spft_layers(root)
    if any(layer.w0_lent for layer in layers.values()):
        gc.collect()  # a state dict caught in a reference cycle
    lent = [name for name, layer in layers.items() if layer.w0_lent]
    if lent:
        raise RuntimeError(
            f"{action}: a state dict of layer {lent[0]!r} is still alive and shares its weight, which holds W0 for "
            "it; delete it (or copy its tensors) first; nothing was changed"
        )


def _install_aside(root: nn.Module, name: str, aside: AsideAdapter) -> None:
    adapter = parse_adapter(f"adapter {name!r}", aside.metadata, aside.tensors)
    plans = _check_against(root, adapter, check_base=True)
    _install(root, plans, adapter.saved, adapter.config)


def _to_plain(root: nn.Module) -> None:
    """Every spft layer back to its plain linear (W0 in the weight), the model's other state kept."""
    for name, layer in spft_layers(root).items():
        set_submodule(root, name, plain_linear(layer))
    root.__dict__.pop(CONFIG_ATTR, None)


def _build_aside(root: nn.Module, action: str, build: Callable[[], object]) -> AsideAdapter:
    """Run ``build`` (which puts another adapter on the model), capture that adapter, and put the
    active adapter back exactly: its own layer objects (deltas, gradients, merged state), its
    saved modules' values, the flags and the model's attributes, whether ``build`` succeeded or
    not."""
    _refuse_folded(spft_layers(root), action)
    _refuse_lent(root, action)
    store, config = root.__dict__.get(STORE_ATTR), getattr(root, CONFIG_ATTR)
    linears = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    snapshot = _Snapshot(root, linears, _saved_names(root))
    try:
        with deferred_merges():  # the active layers, kept to be put back, hold the same weights
            build()
        return _capture(root, action)
    finally:
        snapshot.restore()
        finish_conversion(root, config)  # (a failed get_spft_model unloads: the methods come back)
        root.__dict__[STORE_ATTR] = store
