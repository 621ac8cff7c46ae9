"""What W0 is, and what a layer may do with it: the second axis beside the position kinds
(``docs/architecture.md``, "Two axes").

A layer keeps its frozen base as ``layer.weight`` (so that it stays a drop-in ``nn.Linear``) and
asks its base kind, a ``FrozenBase`` subclass, everything that depends on what that weight is:

- ``merge_refusal(layer)``: why merged mode (writing ``W0 + Δ`` into the weight) is impossible
  for this layer, or None. Merged mode is a property of the base: a dense float weight the
  layer may write into allows it; a quantized weight cannot hold ``W0 + Δ``, nor can a weight
  that FSDP2 or DeepSpeed ZeRO-3 shards (they gather it again for backward, without Δ);
- ``observers(layer, parameter=...)``: who else can see the weight now, or None when the layer
  owns it exclusively. The layer writes into its weight only then (merging, re-syncing, writing
  W0 back for a state dict): anything else holding the storage (another model built on the same
  tensors, a state dict or a view of it, a numpy array, ``untyped_storage()``, FSDP2's gathered
  buffer) or the Parameter itself (another module, the linear it was built from) would see the
  write. Mode 'merged' then gives the layer a private copy of the weight, mode 'auto' computes
  the split form;
- ``weight_for_ops(layer)``: the dense W0 the layer's ops read, or None when the base computes
  its own term (``base_forward``) and the ops add the delta term only;
- ``read(layer, flat)``: W0 at flat positions (adapter fingerprints); ``dense(layer)``: the whole
  W0 as a new dense tensor (export);
- ``describe(layer)``: what an adapter records about the base beyond shape and dtype.

A base that stores W0 in another form (``weight_for_ops`` None: a quantized weight,
``bnb_base.py``) makes a dense W0 on request (``dense``), into which a delta layer adds Δ for one
GEMM, and gives its own matmul (``base_forward``: bias included, a gradient for x only); it may
refuse a layer kind or mode before anything is built (``refusal_for``), keep per-layer state on the
layer when it is built (``adopt``), add its own keys to the layer's state dict
(``state_dict_extras``, ``load_problem``), check an adapter's recorded base (``check_compatible``)
and store a merged dense weight its own way again (``requantize``).

Base kinds register with ``@register_base_kind``; ``base_kind_for(linear)`` picks the last
registered kind that ``matches`` it, so a specific kind (a quantized weight) wins over the dense
default.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from ..ops._guards import is_inference

SHARED_WEIGHT = (
    "{layer}: the weight is shared with {other!r} (e.g. a tied LM head and input embedding); merging would "
    "write W0 + delta into {other!r} too, so this layer never merges: use mode 'auto' or 'split' (exact, W0 "
    "never modified)"
)
INFERENCE_WEIGHT = (
    "{layer}: the weight is an inference tensor (made under torch.inference_mode), which torch forbids writing "
    "in place outside inference mode, so it cannot be merged; use mode 'auto' or 'split', or rebuild the linear "
    "outside inference_mode (or clone its weight there)"
)
_NOT_CONTIGUOUS = "{layer}: mode='merged' needs a contiguous weight; use mode='split'"
SHARDED_WEIGHT = (
    "{layer}: the weight is sharded ({how}), which gathers it again from the shards for backward, without "
    "W0 + delta, so it cannot be merged; use mode 'auto' or 'split' (exact, W0 never modified)"
)

# What ``observers`` counts for a weight only the layer holds, measured once on a fresh module
# (``_own_counts``) rather than written down: they depend on CPython and torch internals (torch
# 2.14, CPython 3.11: 2 references to the Parameter, 2 uses of the storage, 3 references to
# the Python storage object, which torch keeps one of per storage).
_OWN_COUNTS: list = []


def _parameter_refs(module: nn.Module) -> int:
    return sys.getrefcount(module._parameters.get("weight"))


def _storage_counts(weight: torch.Tensor) -> tuple[int, int]:
    """(uses of ``weight``'s storage by tensors and storage objects, Python references to the storage object)."""
    storage = weight.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


def _own_counts() -> tuple[int, int, int]:
    if not _OWN_COUNTS:
        fresh = nn.Linear(1, 1)
        _OWN_COUNTS.extend((_parameter_refs(fresh), *_storage_counts(fresh.weight)))
    return tuple(_OWN_COUNTS)


_DTENSOR: list = []


def _dtensor_class():
    """torch's DTensor class (imported once: the import statement alone costs microseconds per
    forward), or None for a torch built without distributed support."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def sharding(weight) -> Optional[str]:
    """How ``weight`` is sharded across ranks (FSDP2's DTensor, DeepSpeed ZeRO-3's partition), or None."""
    # (DeepSpeed sets Python attributes on the Parameter; a dict lookup, not a failing getattr: ~1 us)
    if "ds_id" in getattr(weight, "__dict__", ()):
        return "DeepSpeed ZeRO-3 partitions it"
    dtensor = _dtensor_class()
    return "a DTensor: FSDP2 or tensor parallel" if dtensor is not None and isinstance(weight, dtensor) else None


def storage_observers(weight: torch.Tensor) -> Optional[str]:
    """Whether anything besides ``weight`` itself holds its storage: another tensor on it (a view,
    a state dict's tensor, another Parameter built on the same tensor, a numpy array's tensor, a
    gathered buffer the weight is a view of) or the storage object (``untyped_storage()``). Two C
    calls and a Python reference count: about 0.6 us."""
    _, own_uses, own_refs = _own_counts()
    uses, refs = _storage_counts(weight)
    if uses > own_uses or refs > own_refs:
        return "its storage is shared (another tensor or view of it is alive: a state dict, another model, a numpy array)"
    return None


class FrozenBase:
    """A kind of frozen base weight (module docstring). Stateless: every method takes the layer."""

    name = ""

    @classmethod
    def matches(cls, linear: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def merge_refusal(cls, layer) -> Optional[str]:
        raise NotImplementedError

    @classmethod
    def observers(cls, layer, parameter: bool = True) -> Optional[str]:
        """Who else can see the weight now (module docstring), or None: the layer owns it exclusively."""
        return None

    @classmethod
    def weight_for_ops(cls, layer) -> Optional[torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def read(cls, layer, flat: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W0 at flat positions; ``weight``: the layer's weight as a plain tensor (gathered shards)."""
        raise NotImplementedError

    @classmethod
    def dense(cls, layer) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def describe(cls, layer) -> dict:
        return {}

    @classmethod
    def check_compatible(cls, layer, described: Optional[dict]) -> Optional[str]:
        """Why an adapter layer whose base was ``described`` (its ``describe``, None when it recorded
        none) does not fit this base (None: it fits)."""
        if described:
            summary = ", ".join(f"{k}={v}" for k, v in described.items())
            return f"the adapter was trained on a quantized base ({summary}), this base is {cls.name}"
        return None

    @classmethod
    def refusal_for(cls, linear: nn.Module, layer_cls: type, mode: str, layer_name: str) -> Optional[str]:
        """Why a ``layer_cls`` layer in ``mode`` cannot be built on ``linear``'s weight, or None
        (asked before the linear is touched)."""
        return None

    @classmethod
    def adopt(cls, layer, linear: nn.Module) -> None:
        """Keep what the base needs from ``linear`` on ``layer`` (a dense weight needs nothing)."""

    @classmethod
    def base_forward(cls, layer, x: torch.Tensor) -> torch.Tensor:
        """``x W0ᵀ + b`` computed by the base itself (when ``weight_for_ops`` is None)."""
        raise NotImplementedError(f"frozen base {cls.name!r} has a dense weight: the layer's ops compute x W0ᵀ")

    @classmethod
    def requantize(cls, layer, linear: nn.Linear) -> nn.Module:
        """``linear`` (a dense export of ``layer``) stored as this base stores its weight."""
        raise NotImplementedError(f"frozen base {cls.name!r} is dense: there is nothing to quantize again")

    @classmethod
    def state_dict_extras(cls, layer, prefix: str, keep_vars: bool) -> dict:
        """Keys the base adds to the layer's state dict beside ``weight`` and ``bias``."""
        return {}

    @classmethod
    def load_problem(cls, layer, state_dict: dict, prefix: str) -> Optional[str]:
        """Why ``state_dict`` cannot load into the layer's base (None: it can)."""
        return None


_BASE_KINDS: list = []


def register_base_kind(cls: type) -> type:
    """Class decorator: make a ``FrozenBase`` subclass available to ``base_kind_for``."""
    if not isinstance(cls, type) or not issubclass(cls, FrozenBase) or not cls.name:
        raise TypeError(f"register_base_kind: expected a named FrozenBase subclass, got {cls!r}")
    if cls not in _BASE_KINDS:
        _BASE_KINDS.append(cls)
    return cls


def base_kind_for(linear: nn.Module) -> type:
    """The base kind of ``linear``'s weight: the last registered kind that matches it."""
    for cls in reversed(_BASE_KINDS):
        if cls.matches(linear):
            return cls
    raise ValueError(f"no frozen-base kind handles a {type(linear).__name__} weight")


def contiguity_refusal(weight: torch.Tensor, needs_contiguous: bool, layer_name: str) -> Optional[str]:
    """Merged positions that are flat offsets need a contiguous weight."""
    return _NOT_CONTIGUOUS.format(layer=layer_name) if needs_contiguous and not weight.is_contiguous() else None


@register_base_kind
class DenseBase(FrozenBase):
    """A dense float weight the layer shares with the linear it was built on. Merged mode may
    write ``W0 + Δ`` into it unless another module of the model holds it too
    (``layer.weight_shared_with``: a tied head), it is an inference tensor (torch forbids the
    write), it is sharded, or the kind's merged positions are flat offsets and the weight is not
    contiguous; and only while nothing else observes it (``observers``)."""

    name = "dense"

    @classmethod
    def matches(cls, linear: nn.Module) -> bool:
        weight = getattr(linear, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.is_floating_point()

    @classmethod
    def merge_refusal(cls, layer) -> Optional[str]:
        shared = getattr(layer, "weight_shared_with", None)
        if shared is not None:
            return SHARED_WEIGHT.format(layer=layer.layer_name, other=shared)
        if is_inference(layer.weight):
            return INFERENCE_WEIGHT.format(layer=layer.layer_name)
        how = sharding(layer.weight)
        if how is not None:
            return SHARDED_WEIGHT.format(layer=layer.layer_name, how=how)
        return contiguity_refusal(layer.weight, layer._MERGE_NEEDS_CONTIGUOUS_WEIGHT, layer.layer_name)

    @classmethod
    def observers(cls, layer, parameter: bool = True) -> Optional[str]:
        """``parameter``: also count Python references to the weight Parameter (before the first
        write: another module or the linear the layer was built from holds it; afterwards a
        holder of the layer's own merged weight, an optimizer given every parameter, sees what
        the layer documents, so only the storage counts). About 0.1 us more."""
        if parameter and _parameter_refs(layer) > _own_counts()[0]:
            return (
                "its weight Parameter is held elsewhere too (another module or model, the linear it was built from, "
                "FSDP2's gathered parameter)"
            )
        return storage_observers(layer.weight)

    @classmethod
    def weight_for_ops(cls, layer) -> torch.Tensor:
        return layer.weight

    @classmethod
    def read(cls, layer, flat: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = (layer.weight if weight is None else weight).detach()
        flat = flat.to(weight.device, torch.int64)
        rows = torch.div(flat, layer.in_features, rounding_mode="floor")
        return weight[rows, flat - rows * layer.in_features]

    @classmethod
    def dense(cls, layer) -> torch.Tensor:
        return layer.weight.detach().clone(memory_format=torch.contiguous_format)
