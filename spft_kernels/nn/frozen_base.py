"""What W0 is, and what a layer may do with it: the second axis beside the position kinds
(``docs/architecture.md``, "Two axes").

A layer keeps its frozen base as ``layer.weight`` (so that it stays a drop-in ``nn.Linear``) and
asks its base kind, a ``FrozenBase`` subclass, everything that depends on what that weight is:

- ``merge_refusal(layer)``: why merged mode (writing ``W0 + Δ`` into the weight) is impossible
  for this layer now, or None. Merged mode is a property of the base: a dense float weight the
  layer may write into allows it; a quantized weight cannot hold ``W0 + Δ``;
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
    write ``W0 + Δ`` into it unless another module holds it too (``layer.weight_shared_with``),
    it is an inference tensor (torch forbids the write), or the kind's merged positions are flat
    offsets and the weight is not contiguous."""

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
        return contiguity_refusal(layer.weight, layer._MERGE_NEEDS_CONTIGUOUS_WEIGHT, layer.layer_name)

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
