"""The registry of position kinds: the one place that knows every kind of layer.

A kind is a subclass of ``SpftLayer`` (``base.py``) that says what trains: scattered entries,
whole rows, dense blocks, PST's structured mask, or a kind of your own. It registers itself with
``@register_kind``; ``integration/``, ``masks/`` and ``bench/`` then ask the registry and the
layer, never a concrete class or a kind's name (``python_tests/test_layering.py`` checks this).
What a kind implements is listed in ``docs/architecture.md`` ("Position kinds").
"""

from __future__ import annotations

import torch.nn as nn

from .base import SpftLayer
from .frozen_base import DenseBase, base_kind_for

_KINDS: dict = {}  # kind name -> layer class, in registration order


def register_kind(cls: type) -> type:
    """Class decorator: make ``cls`` (an ``SpftLayer`` subclass with a ``kind`` name) known to
    conversion, adapters and merging. Registering the same class again is a no-op; another class
    under a taken name is a ``ValueError``."""
    if not isinstance(cls, type) or not issubclass(cls, SpftLayer):
        raise TypeError(f"register_kind: expected a subclass of SpftLayer, got {cls!r}")
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"register_kind: {cls.__name__}.kind must be a non-empty name, got {name!r}")
    known = _KINDS.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"register_kind: kind {name!r} is taken by {known.__module__}.{known.__qualname__}")
    _KINDS[name] = cls
    return cls


def unregister_kind(cls: type) -> None:
    """Forget ``cls`` (tests that register a kind of their own clean up with this)."""
    if _KINDS.get(getattr(cls, "kind", None)) is cls:
        del _KINDS[cls.kind]


def registered_kinds() -> tuple:
    """The registered kind names, in registration order."""
    return tuple(_KINDS)


def kind_class(name, where: str = "") -> type:
    """The layer class of kind ``name``; ``ValueError`` naming the known kinds otherwise."""
    cls = _KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}unknown kind {name!r}; registered kinds: {list(_KINDS)}")
    return cls


def kind_for_config(config) -> type:
    """The kind a conversion config trains: ``config.kind`` when given, else the first registered
    kind whose ``serves(config)`` says it is the default for that method."""
    explicit = getattr(config, "kind", None)
    if explicit is not None:
        return kind_class(explicit, "SpftConfig")
    for cls in _KINDS.values():
        if cls.serves(config):
            return cls
    raise ValueError(f"SpftConfig: no registered kind trains method {getattr(config, 'method', None)!r}")


def universal_kind() -> type:
    """The kind any trained positions can be written as (scattered entries): what a merge of
    different kinds, or a folder peft wrote, becomes."""
    for cls in _KINDS.values():
        if cls.universal:
            return cls
    raise RuntimeError("no registered kind holds arbitrary entries")


def is_spft_layer(module) -> bool:
    """Whether ``module`` is a sparse fine-tuning layer (of any kind)."""
    return isinstance(module, SpftLayer)


def spft_layer_classes() -> tuple:
    """Every registered layer class (for ``isinstance`` checks that must see all kinds)."""
    return tuple(_KINDS.values())


def plain_linear_type(module) -> bool:
    """Whether ``module`` is what conversion turns into a layer: exactly ``nn.Linear``, or a linear
    whose weight a registered non-dense base kind holds (a bitsandbytes 4-bit or 8-bit layer)."""
    if type(module) is nn.Linear:
        return True
    return isinstance(module, nn.Linear) and not _is_spft(module) and base_kind_for(module) is not DenseBase


def _is_spft(module) -> bool:
    return isinstance(module, SpftLayer)
