"""``SpftLayer``: the one base of every sparse fine-tuning layer, and the position-kind protocol.

Every layer is a drop-in ``nn.Linear`` on a frozen base weight W0 (shared with the linear it was
built from, never copied) that trains something small: scattered entries (``SparseDeltaLinear``),
whole rows (``RowSparseLinear``), dense blocks (``BlockSparseLinear``), PST's factors
(``PSTLinear``), or a kind of your own. What is common lives here: building on a linear, the
names, the frozen base and its kind (``frozen_base.py``), casts that keep the trainable masters
in fp32. What a kind must say about itself is the protocol below (the methods that raise
``NotImplementedError`` here); ``integration/``, ``masks/`` and ``bench/`` use only the protocol
(``docs/architecture.md``, "Position kinds"). Layers with positions and a delta, and their modes,
are ``delta_layer.py``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn as nn

from ..ops._guards import as_int, describe
from ..ops.backends import check_backend_name
from .frozen_base import DenseBase, base_kind_for
from .stored import AdapterPayload, StoredLayer

Tensor = torch.Tensor

_READ_BY_PARENT = (
    "{layer}: this linear is the out_proj of an nn.MultiheadAttention (a NonDynamicallyQuantizableLinear), "
    "which reads out_proj.weight and .bias itself and never calls the module's forward: a delta there would "
    "be silently ignored, so it cannot be converted"
)


def check_sizes(in_features, out_features, layer_name: str) -> tuple[int, int]:
    """Python ints (numpy integers accepted: the index arithmetic must not wrap in uint16)."""
    sizes = as_int(in_features), as_int(out_features)
    if None in sizes or min(sizes) < 0:
        raise ValueError(
            f"{layer_name}: in_features and out_features must be non-negative integers, got "
            f"{describe(in_features)} and {describe(out_features)}"
        )
    return sizes


def lookup(sorted_keys: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """``(hit, where)``: whether each query is in the sorted unique keys, and at which position."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(queries, dtype=torch.bool), torch.zeros_like(queries)
    where = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[where] == queries, where


def trainable_count(layers) -> int:
    """The trainable values of ``layers`` (at least 1: a config's budget is positive)."""
    return max(1, sum(p.numel() for layer in layers for p in layer.trainable_tensors().values()))


class SpftLayer(nn.Linear):
    """The base of every sparse fine-tuning layer (module docstring).

    Class attributes a kind sets: ``kind`` (its name in adapter files and configs),
    ``positions_key`` (the state-dict key of its positions, or None), ``unit`` (what one position
    is called in messages), ``writes_w0`` (whether its merged mode writes into W0), ``additive``
    (whether adapters of this kind can be summed), ``universal`` (whether any trained entries can
    be written as this kind: scattered entries), ``shira_kind`` (the kind its entries come back
    as from a peft SHiRA folder, or None when SHiRA cannot express it), ``dynamic_masks``
    (whether ``fold_delta`` exists for dynamic masks).
    """

    kind: ClassVar[str] = ""
    positions_key: ClassVar[Optional[str]] = None
    unit: ClassVar[str] = "values"
    writes_w0: ClassVar[bool] = True
    additive: ClassVar[bool] = True
    universal: ClassVar[bool] = False
    shira_kind: ClassVar[Optional[str]] = None
    shira_refusal: ClassVar[str] = "its trained values are not a set of weight entries, so peft's SHiRA format cannot express it"
    dynamic_masks: ClassVar[bool] = False
    # Why the kind needs a dense W0 of its own (None: it can train over a base that stores W0 in
    # another form, e.g. quantized; a delta kind that defines ``_delta_gradient`` gets None).
    dense_w0_reason: ClassVar[Optional[str]] = "its forward computes with a dense W0"
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT: ClassVar[bool] = False

    def __init__(self, in_features, out_features, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto", name: Optional[str] = None) -> None:
        in_features, out_features = check_sizes(in_features, out_features, name or type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.layer_name = name or type(self).__name__
        self.backend = check_backend_name(backend)
        self.base_kind = DenseBase
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    # --- building on a linear ---------------------------------------------------------------

    @classmethod
    def _check_linear(cls, linear, layer_name: str, mode: str = "auto") -> None:
        """What every kind refuses before touching ``linear`` (its base kind included: a quantized
        base refuses what cannot work on it)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if type(linear).__name__ == "NonDynamicallyQuantizableLinear":
            raise ValueError(_READ_BY_PARENT.format(layer=layer_name))
        if linear.weight.device.type == "meta":
            raise ValueError(f"{layer_name}: the linear's weight is on the meta device; materialise it first")
        check_sizes(linear.in_features, linear.out_features, layer_name)
        refusal = base_kind_for(linear).refusal_for(linear, cls, mode, layer_name)
        if refusal is not None:
            raise ValueError(refusal)

    def _share_base(self, linear: nn.Linear) -> list:
        """Take ``linear``'s weight and bias tensors (shared, frozen); returns their former
        ``requires_grad`` flags, to put back if building fails afterwards."""
        flags = [(p, p.requires_grad) for p in (linear.weight, linear.bias) if p is not None]
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        if linear.bias is not None:
            self.bias = linear.bias
            self.bias.requires_grad_(False)
        self.base_kind = base_kind_for(linear)
        self.base_kind.adopt(self, linear)
        return flags

    # --- trainable masters ------------------------------------------------------------------

    def _master_dtype(self) -> torch.dtype:
        # The masters follow the base only into fp64 (gradcheck); otherwise they stay fp32 (or the
        # configured delta_dtype) when the base is cast to bf16/fp16.
        return torch.float64 if self.weight.dtype == torch.float64 else getattr(self, "delta_dtype", torch.float32)

    def trainable_tensors(self) -> dict:
        """``{label: Parameter}``: what trains (and what an adapter stores)."""
        raise NotImplementedError(f"{type(self).__name__} (kind {self.kind!r}) does not implement trainable_tensors")

    def _apply(self, fn, recurse=True):
        # A cast of the module to bf16/fp16 must not round the fp32 masters: keep their values and
        # move them to the new device in the master dtype instead.
        labels = [label for label in self.trainable_tensors() if label in self._parameters]
        before = {label: (self._parameters[label].data, self._parameters[label].grad) for label in labels}
        super()._apply(fn, recurse)
        master = self._master_dtype()
        for label, (values, grad) in before.items():
            parameter = self._parameters[label]
            if parameter is not None and parameter.dtype != master:
                parameter.data = values.to(device=parameter.device, dtype=master)
                parameter.grad = None if grad is None else grad.to(device=parameter.device, dtype=master)
        self._after_apply()
        return self

    def _after_apply(self) -> None:
        """Called after ``_apply`` (casts, moves): refresh what depends on the tensors."""

    # --- the position-kind protocol -----------------------------------------------------------

    @classmethod
    def serves(cls, config) -> bool:
        """Whether this kind is what a conversion ``config`` without an explicit ``kind`` trains."""
        return False

    @classmethod
    def options_from_config(cls, config) -> dict:
        """``from_linear`` keyword options a conversion config implies (e.g. the block size)."""
        return {}

    @classmethod
    def select_positions(cls, selection) -> dict:
        """``{target name: positions}`` for a conversion; ``selection`` (``masks/selection.py``)
        offers the scores and the budgeted choosers of the config's method."""
        raise NotImplementedError(f"kind {cls.kind!r} has no selection hook")

    def positions(self) -> Optional[Tensor]:
        """The canonical positions (what ``positions_key`` holds in the state dict), or None."""
        return None

    def options(self) -> dict:
        """The ``from_linear`` keyword options that rebuild this layer's structure."""
        return {}

    @classmethod
    def check_positions(cls, positions, shape: tuple, device, where: str, options: dict):
        """``(canonical positions, order or None)``: validated positions for a weight of ``shape``
        (``ValueError`` naming ``where`` otherwise) and the permutation that sorted them."""
        raise NotImplementedError(f"kind {cls.kind!r} has no positions")

    @classmethod
    def flat_positions(cls, positions, shape: tuple, options: dict) -> Tensor:
        """The weight entries the positions cover (int64 flat ``row * in + col``), in the order an
        adapter's base fingerprint hashes W0 at them."""
        return torch.empty(0, dtype=torch.int64)

    @classmethod
    def entries_of(cls, positions, values: dict, shape: tuple, options: dict) -> tuple[Tensor, Tensor]:
        """``(sorted flat int64, values)``: the trained positions as scattered entries (SHiRA
        folders, merging adapters of different kinds)."""
        raise ValueError(f"kind {cls.kind!r} is not a set of weight entries")

    @classmethod
    def entries_per_position(cls, shape: tuple, options: dict) -> int:
        """How many weight entries one position is in ``entries_of`` (SHiRA's padding rule)."""
        return 1

    @classmethod
    def from_entries(cls, where: str, count: int, shape: tuple, flat: Tensor, values: Tensor):
        """``(positions, {label: values})`` from ``count`` positions' flat entries (a SHiRA folder
        this package wrote); ``ValueError`` if they do not have the kind's structure."""
        raise ValueError(f"{where}: kind {cls.kind!r} cannot be read from flat entries")

    def adapter_payload(self) -> AdapterPayload:
        """What this layer writes into an adapter file (``stored.py``)."""
        raise NotImplementedError(f"kind {self.kind!r} has no adapter form")

    @classmethod
    def read_adapter_payload(cls, where: str, name: str, entry: dict, tensors: dict, shape: tuple):
        """``(positions, values, options, tensor keys used)`` of layer ``name`` from an adapter
        file's ``entry`` (its metadata) and ``tensors``; ``ValueError`` naming ``where``."""
        raise NotImplementedError(f"kind {cls.kind!r} has no adapter form")

    @classmethod
    def build_stored(cls, linear: nn.Linear, stored: StoredLayer, *, mode: str, backend: str, name: str):
        """A layer of this kind on ``linear`` holding a checked adapter layer's positions and values."""
        layer = cls.from_linear(linear, stored.positions, mode=mode, backend=backend, name=name, **stored.options)
        with torch.no_grad():
            for label, parameter in layer.trainable_tensors().items():
                parameter.copy_(stored.values[label])
        if stored.shared_with is not None:
            layer.mark_weight_shared(stored.shared_with)
        return layer

    @classmethod
    def sum_stored(cls, parts: list) -> Optional[StoredLayer]:
        """``Σ w · part`` of ``[(StoredLayer, w)]`` of this kind on one weight, on the union of their
        positions (fp64 sums rounded once), or None when this kind cannot sum them as itself
        (then they are summed as scattered entries)."""
        return None

    @classmethod
    def config_for(cls, layers: list) -> dict:
        """``SpftConfig`` keywords describing hand-converted layers of this kind (an adapter of a
        model without ``spft_config``)."""
        return {"method": "speft", "num_params": trainable_count(layers), "kind": cls.kind}

    # --- W0 ---------------------------------------------------------------------------------

    def kept_w0(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(sorted flat int64, values)``: W0 where the weight holds something else now (a merged
        layer keeps W0 at its positions aside), or None."""
        return None

    def folded_w0(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(sorted flat int64, values)``: the original W0 at positions a dynamic mask folded
        trained values into, or None."""
        return None

    def w0_at(self, flat: Tensor, weight: Optional[Tensor] = None, *, original: bool = False) -> Tensor:
        """W0 at flat positions (any weight layout): the weight (``weight``: the layer's weight as a
        plain tensor, e.g. gathered from shards), with the values kept aside where the weight holds
        W0 + Δ, and with ``original`` the W0 from before any dynamic-mask fold."""
        flat = flat.to(self.weight.device, torch.int64)
        values = self.base_kind.read(self, flat, weight)
        for aside in (self.kept_w0(), self.folded_w0() if original else None):
            if aside is not None and flat.numel():
                hit, where = lookup(aside[0], flat)
                values[hit] = aside[1][where[hit]]
        return values

    def prepare_for_training(self, merge: bool = True) -> None:
        """What a conversion does last: the trainable tensors require grad (with ``merge``, a delta
        kind also merges now when its mode resolves to merged, so compiled graphs trace the merged
        form)."""
        for parameter in self.trainable_tensors().values():
            parameter.requires_grad_(True)

    @property
    def w0_lent(self) -> bool:
        """Whether a live state dict shares the weight while it holds W0 for it (``w0_loan.py``)."""
        return False

    def export(self) -> tuple[nn.Linear, Optional[dict]]:
        """``(plain linear, report or None)`` for ``merge_and_unload`` of a layer that is not merged
        in place: new tensors; a kind with something to report (PST's sparsity) gives it."""
        return self.to_linear(), None

    def as_plain_linear(self):
        """A context in which the layer runs as a plain linear on its effective weight (salience
        scoring needs an ordinary weight Parameter); a kind that cannot refuses."""
        raise ValueError(f"{self.layer_name}: a {self.kind!r} layer cannot be scored as a plain linear")

    def mode_refusal(self, mode: str) -> Optional[str]:
        """Why this layer cannot run in ``mode`` now, or None (a kind that never writes into W0
        computes one way whatever the mode)."""
        return None

    def set_mode(self, mode: str) -> None:
        """Switch the execution mode (``spft.set_mode``); a kind without modes has nothing to do."""

    def mark_weight_shared(self, other: str) -> None:
        """Record that module ``other`` holds this layer's weight too (e.g. a tied LM head)."""
        self.weight_shared_with = other

    def unmerge(self) -> None:
        """W0 back in the weight (a kind that never writes into W0 has nothing to do)."""

    def merged_weight(self) -> Tensor:
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the layer's effective weight (new tensors; this layer is
        unchanged)."""
        weight = self.merged_weight()  # (a quantized base's: dense, in its compute dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

