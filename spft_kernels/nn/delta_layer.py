"""``DeltaLayer``: the layers whose trainable part is a delta at fixed positions of W0
(``SparseDeltaLinear``: scattered entries, SPEFT and SpaRTA; ``RowSparseLinear``: whole rows,
SPruFT; ``BlockSparseLinear``: dense blocks), with their modes, merging and state dict. The
positions themselves (validation, stored form, W0 at them) are each kind's (``docs/architecture.md``).

Modes, the same for every delta kind:

- ``split``: ``x W0ᵀ + b`` (cuBLAS) plus the delta's own term (the sparse ``x Δᵀ``, or
  ``x Wfᵀ`` scattered into the selected output rows, or the blocks' batched GEMMs); W0 is never
  modified.
- ``merged``: the weight holds ``W_eff = W0 + Δ`` in its own dtype and W0 at the trained
  positions is kept aside; forward and dx are plain GEMMs, only the delta gradient is sparse. When
  ``delta`` may have changed since the last forward (its version counter or storage moved, or a
  gradient was accumulated into it since, after which any optimizer step may follow) the trained
  positions are rewritten from W0 and the fp32 master (O(positions)). Whether a layer may merge is
  its frozen base's call (``frozen_base.py``: a dense weight nobody else holds).
- ``fused`` (SparseDeltaLinear): one GEMM whose weight tiles get the delta entries added on the
  fly (the cuda backend's kernel; other backends compute the split form); the backward is split's.
- ``auto``: ``merged`` when the base allows it, else ``split``.

The state dict always holds W0 (never W_eff), the fp32 delta and the canonical positions, so it
is the same whatever the mode and loads into a layer of any mode or size. A merged layer builds it
without copying the weight: W0 is written back into the trained positions and lent to the state
dict until it is freed (``w0_loan.py``).
"""

from __future__ import annotations

import contextlib
import gc
import time
import types
import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..ops._guards import builds_state, is_inference
from ..ops.delta_term import DequantizedDelta, on_dequantized
from .base import SpftLayer, check_sizes
from .frozen_base import contiguity_refusal, INFERENCE_WEIGHT
from .w0_loan import W0Loans

MODES = ("auto", "merged", "split", "fused")

_GRADIENTS_SEEN = "_spft_gradients_seen"


def _check_delta_dtype(delta_dtype, layer_name: str) -> torch.dtype:
    if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
        raise ValueError(
            f"{layer_name}: delta_dtype must be a floating-point torch.dtype (the trainable master, fp32 by "
            f"default), got {delta_dtype!r}"
        )
    return delta_dtype


_last_collection = [float("-inf")]


def _collect_cycles() -> None:
    """Run the garbage collector, at most once a second: a module replaced in the model (peft's
    unloaded wrappers, a linear a conversion replaced) may live on in a reference cycle and hold
    the weight until the collector runs; without it mode 'auto' would compute split for good. Only
    when a layer is about to say so, so a model's first forward costs one collection at most."""
    now = time.monotonic()
    if now - _last_collection[0] > 1.0:
        gc.collect()
        _last_collection[0] = time.monotonic()


def _count_gradient(delta: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a layer's delta: counts the gradients accumulated into it, so
    that a merged layer re-syncs after an optimizer step that did not bump the version counter."""
    setattr(delta, _GRADIENTS_SEEN, getattr(delta, _GRADIENTS_SEEN, 0) + 1)


class DeltaLayer(SpftLayer):
    """What the delta kinds share: a frozen W0 (shared with the wrapped linear, never copied), a
    master delta at validated positions (fp32 unless told otherwise), merge/unmerge with W0 at the
    positions kept aside, the merged mode's re-sync, a mode-independent state dict and casts that
    keep the master delta.

    A kind says where the delta sits: ``positions_key`` (the state dict key of the positions,
    which this class writes and reads itself: a kind stores them in any form, in non-persistent
    buffers, and gives them back canonical through ``_current_positions``), ``unit`` and the hooks
    ``_validate`` (a classmethod; given ``layer=`` when positions come into an existing layer, and
    the kind's options as keywords), ``_adopt``, ``_positions_tensor``, ``_delta_shape``,
    ``_gather_w0``, ``_write``, ``_functional`` and ``_describe``; plus the protocol of
    ``SpftLayer``.
    """

    _HAS_FUSED_MODE = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "_delta_gradient" in cls.__dict__:
            cls.dense_w0_reason = None  # it can train over a base that stores W0 in another form

    def __init__(
        self,
        in_features: int,
        out_features: int,
        positions: Optional[torch.Tensor] = None,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        mode: str = "auto",
        backend: str = "auto",
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype, backend=backend, name=name)
        self.mode = self.check_mode(mode, self.layer_name)
        self.delta_dtype = _check_delta_dtype(delta_dtype, self.layer_name)
        # The qualified name of another module that holds this layer's weight too (a tied LM head's
        # input embedding), set by get_spft_model / load_adapter via ``mark_weight_shared``: such
        # a layer never writes into its weight (auto computes the split form; merge() refuses).
        self.weight_shared_with: Optional[str] = None
        self._merged = False
        self._synced_delta_key = None
        # (the weight Parameter merge() wrote W0 + Δ into,) while merged; see _check_weight_kept.
        self._merged_into = None
        self._merge_disabled = False  # mode 'auto' after the weight was swapped out (FSDP2)
        # Whether the weight holds W0 + Δ at the positions now (merged and written); a merged
        # layer whose weight holds W0 (lent to a state dict, or seen by another tensor) computes
        # the split form.
        self._holds_delta = False
        self._split_said = False  # the warning of mode 'auto' computing split, once per layer
        # Live state-dict views of the weight while it holds W0 for them (w0_loan.py).
        self._w0_loans = W0Loans()
        self.register_buffer("_w0_at_index", None, persistent=False)
        if positions is None:
            # No positions yet (a skeleton, e.g. on the meta device, to load a state dict into):
            # zero trainable entries, a valid layer that computes the plain linear.
            positions = torch.empty(0, dtype=torch.int64, device=self.weight.device)
        self._set_positions(positions, None)

    @classmethod
    @builds_state
    def from_linear(
        cls,
        linear: nn.Linear,
        positions,
        *,
        mode: str = "auto",
        backend: str = "auto",
        name: Optional[str] = None,
        delta_dtype: torch.dtype = torch.float32,
        **options,
    ):
        """Wrap ``linear`` without copying its weight: the layer shares (and freezes) the weight and
        bias tensors and trains a delta at ``positions`` (the kind's form: flat entries, rows or
        block ids; sorted here), starting from zero so that it computes exactly what ``linear``
        did. ``options``: the kind's own (e.g. ``block_size``). Everything is checked before
        ``linear`` is touched."""
        layer_name = name or cls.__name__
        cls._check_linear(linear, layer_name, mode)
        _check_delta_dtype(delta_dtype, layer_name)
        options = cls._check_options(options, layer_name)
        if mode == "merged":
            refusal = contiguity_refusal(linear.weight, cls._MERGE_NEEDS_CONTIGUOUS_WEIGHT, layer_name)
            if refusal is None and is_inference(linear.weight):
                refusal = INFERENCE_WEIGHT.format(layer=layer_name)
            if refusal is not None:
                raise ValueError(refusal)
        in_features, out_features = check_sizes(linear.in_features, linear.out_features, layer_name)
        # Validate before touching the linear, so bad positions leave it as it was.
        validated, _ = cls._validate(positions, out_features, in_features, linear.weight.device, layer_name, **options)
        # Build on the meta device so that no second weight is ever allocated or initialised.
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else None  # (a quantized weight's own)
        layer = cls(
            in_features, out_features, None, bias=linear.bias is not None, device="meta",
            dtype=dtype, mode=mode, backend=backend, delta_dtype=delta_dtype, name=name, **options,
        )
        flags = []
        try:
            flags = layer._share_base(linear)
            layer._install(validated, None)
        except BaseException:
            for parameter, flag in flags:  # the linear is left as it was
                parameter.requires_grad_(flag)
            raise
        return layer

    @classmethod
    def _check_options(cls, options: dict, layer_name: str) -> dict:
        """The kind's ``from_linear`` options, checked (a kind without options takes none)."""
        if options:
            raise TypeError(f"{cls.__name__}.from_linear got unexpected options {sorted(options)}")
        return {}

    # --- the positions ----------------------------------------------------------------------

    @builds_state
    def _set_positions(self, positions, values: Optional[torch.Tensor]) -> None:
        validated, order = self._validate(
            positions, self.out_features, self.in_features, self.weight.device, self.layer_name, layer=self,
            **self.options()
        )
        if values is not None:
            shape = self._delta_shape(validated)
            if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
                raise ValueError(
                    f"{self.layer_name}: values must be a tensor of shape {shape}, got "
                    f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
                )
            if order is not None:
                values = values[order.to(values.device)]
        self._install(validated, values)

    def _install(self, validated, values: Optional[torch.Tensor]) -> None:
        device = self.weight.device
        if values is None:
            values = torch.zeros(self._delta_shape(validated), dtype=self._master_dtype(), device=device)
        else:
            values = values.detach().to(device=device, dtype=self._master_dtype())
        was_merged = self._merged
        if was_merged:
            self.unmerge()
        self._adopt(validated)
        self._announce_positions()
        current = getattr(self, "delta", None)
        if isinstance(current, nn.Parameter) and current.device.type != "meta":  # the same Parameter
            self.delta.data = values
            self.delta.grad = None
        else:
            self.delta = nn.Parameter(values)
        if was_merged:
            self._merge()

    # --- merge / unmerge --------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._merged

    def _delta_key(self):
        # The version counter alone misses updates that bypass it: fused optimizers (torch's
        # AdamW(fused=True), the transformers Trainer's default) and ``p.data`` updates leave
        # ``_version`` unchanged. Every such update follows a backward, so a gradient accumulated
        # into the delta also counts as a change (``_count_gradient``).
        delta = self.delta
        if is_inference(delta):
            # No version counter to watch (its .data was replaced under inference_mode): always
            # stale, so every forward re-syncs (O(nnz)) instead of raising.
            return object()
        self._watch_delta()
        return (delta._version, delta.data_ptr(), delta.dtype, getattr(delta, _GRADIENTS_SEEN, 0))

    def _watch_delta(self) -> None:
        """Make sure the current delta Parameter counts its accumulated gradients (a Parameter
        replaced by ``_apply``, a deepcopy or unpickling comes without the hook)."""
        delta = self.delta
        if delta.requires_grad:
            hooks = getattr(delta, "_post_accumulate_grad_hooks", None) or {}
            if not any(hook is _count_gradient for hook in hooks.values()):
                delta.register_post_accumulate_grad_hook(_count_gradient)

    @builds_state
    def merge(self) -> None:
        """Make the weight hold ``W0 + Δ`` (W0 at the positions kept aside); later forwards re-sync it
        when ``delta`` changes. Idempotent. Refused for a weight another module shares
        (``weight_shared_with``), a sharded weight and an inference tensor weight: they stay in
        the split form. A weight something else observes (another model or module on the same
        tensors, a view of it) is first copied: the layer then merges into its own copy and the
        others keep W0. Raises ``RuntimeError`` while a state dict of this layer that shares its
        weight (holding W0) is still alive (``w0_loan.py``)."""
        self._refuse_while_lent("merge()")
        self._merge()

    def _refuse_while_lent(self, action: str) -> None:
        """``action`` writes into the weight: refused while a state dict holds W0 from it."""
        if self._w0_loans.active:
            import gc

            gc.collect()  # a state dict caught in a reference cycle (even if collected since)
        if self._w0_loans.active:
            raise RuntimeError(
                f"{self.layer_name}: a state dict of this merged layer is still alive and shares its weight, "
                f"which holds W0 for it; {action} would change that state dict. Delete it (or copy its "
                f"tensors) before {action}"
            )

    @builds_state
    @torch.no_grad()
    def _merge(self) -> None:
        """merge() for the forward: while W0 is lent the weight keeps W0 (the forward computes the
        split form) and the next forward after the loan re-syncs."""
        if self._merged:
            self._resync_if_stale()
            return
        refusal = self.base_kind.merge_refusal(self)
        if refusal is not None:
            raise ValueError(refusal)
        # (While the layer's own state dict holds W0 the layer merges without writing, see
        # _resync_if_stale; anyone else seeing the weight now would see the write: a copy then.)
        observed = None if self._w0_loans.settled() else self.base_kind.observers(self, parameter=True)
        if observed is not None:  # merged on request (mode 'merged', merge()): into a copy of its own
            self._take_private_weight(observed)
        self._w0_at_index = self._gather_w0()
        self._merged = True
        self._merged_into = (self.weight,)
        self._synced_delta_key = None
        self._holds_delta = False
        self._resync_if_stale()

    @builds_state
    def _take_private_weight(self, observed: str) -> None:
        """Copy-on-write: the layer's weight becomes a copy only it holds (one out x in tensor), so
        that merging never changes what others see (``observed``: who they are). Said once."""
        warnings.warn(
            f"{self.layer_name}: {observed}; merging would change it there, so this layer merges into a copy of "
            f"its own ({self.out_features} x {self.in_features}, {self.weight.dtype}). Mode 'auto' computes the "
            "split form instead, with no copy",
            stacklevel=4,
        )
        self.weight = nn.Parameter(self.weight.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)
        if self._merged:
            self._merged_into = (self.weight,)

    def _write_w0_back(self) -> None:
        """W0 back at the positions of a merged weight. When the weight holds W0 already the write
        changes no value (a compiled forward may have written W0 + Δ without telling the eager
        flags, so it is written anyway; it also bumps the version counter, which makes a backward
        that saved W0 + Δ fail loudly)."""
        weight = self._writable_weight() if self._holds_delta else self.weight
        self._write(weight, base=self._w0_at_index, delta=None)
        self._holds_delta = False

    def _writable_weight(self) -> torch.Tensor:
        """The weight, to write into: copied first if a tensor outside the layer sees it now (only
        a view of the merged weight itself can: nothing else held it when the layer merged)."""
        observed = self.base_kind.observers(self, parameter=False)
        if observed is not None:
            self._take_private_weight(observed)
        return self.weight

    @builds_state
    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly (the saved W0 values are written back). Idempotent. In mode 'merged'
        the next forward merges again."""
        self._check_weight_kept()
        if not self._merged:
            return
        self._write_w0_back()
        self._w0_at_index = None
        self._merged = False
        self._merged_into = None
        self._synced_delta_key = None
        self._holds_delta = False

    @builds_state
    def _resync_if_stale(self) -> None:
        """Write ``W0 + Δ`` at the positions when Δ changed since the last write, only into a weight
        nothing else sees: while a state dict, a view, a numpy array or a storage object of the
        weight holding W0 is alive the layer leaves it alone (and computes the split form)."""
        if self._w0_loans.settled():
            return  # the weight holds W0 for a live state dict
        key = self._delta_key()
        if key == self._synced_delta_key and self._holds_delta:
            return
        if not self._holds_delta and self.base_kind.observers(self, parameter=False) is not None:
            return  # W0 in the weight, seen from outside: split until they are gone
        with torch.no_grad():
            self._write(self._writable_weight(), base=self._w0_at_index, delta=self.delta)
        # Plain attributes, set without nn.Module.__setattr__'s parameter/buffer/module lookups
        # (~2 µs each, every step of a merged layer).
        self.__dict__["_synced_delta_key"] = key
        self.__dict__["_holds_delta"] = True

    def _computes_merged(self) -> bool:
        """Whether the weight holds ``W0 + Δ`` for this forward: the subclasses' ``_functional``
        computes the merged form then, else the split form. Traced (torch.compile), the eager
        checks are not available: merged unless W0 is lent to a state dict (a counter Dynamo
        guards on), and the traced forward writes W0 + Δ itself."""
        if torch.compiler.is_compiling():
            return self._merged and not self._w0_loans.settled()
        return self._merged and self._holds_delta and not self._w0_loans.settled()

    def _wants_merged(self, say: bool = False) -> bool:
        """Whether this layer should merge now. Mode 'auto' merges only a weight its base allows
        (``merge_refusal``) that nothing outside the layer sees (``observers``); otherwise it
        computes the split form, and with ``say`` (a forward) warns once naming the reason."""
        if self.mode == "merged":
            return True  # merge() raises when it cannot, and copies a weight others see
        if self.mode != "auto" or self._merge_disabled:
            return False
        reason = self.base_kind.merge_refusal(self) or self.base_kind.observers(self, parameter=True)
        if reason is not None and say and not self._split_said:
            _collect_cycles()  # a module gone from the model but left in a reference cycle
            reason = self.base_kind.merge_refusal(self) or self.base_kind.observers(self, parameter=True)
        if reason is not None and say and not self._split_said:
            self._split_said = True
            warnings.warn(
                f"{self.layer_name}: mode 'auto' computes the split form (exact, W0 never written) because {reason}; "
                "it merges once nothing else holds the weight. Pass mode='split' to silence this, or give the model "
                "its own copy of the base weights for merged speed",
                stacklevel=3,
            )
        return reason is None

    @classmethod
    def check_mode(cls, mode, layer_name: str) -> str:
        """``mode`` if this kind has it, else a ``ValueError`` (``NotImplementedError`` for 'fused')."""
        if mode not in MODES:
            raise ValueError(f"{layer_name}: unknown mode {mode!r}; choose one of {MODES}")
        if mode == "fused" and not cls._HAS_FUSED_MODE:
            raise NotImplementedError(
                f"{cls.__name__} has no mode='fused' (the fused GEMM is SparseDeltaLinear's); "
                "use 'merged' (fastest) or 'split'"
            )
        return mode

    def mode_refusal(self, mode: str) -> Optional[str]:
        """Why this layer cannot run in ``mode`` now (mode 'merged' on a base that refuses it), or None."""
        self.check_mode(mode, self.layer_name)
        return self.base_kind.merge_refusal(self) if mode == "merged" else None

    @builds_state
    def set_mode(self, mode: str) -> None:
        """Switch the mode (``spft.set_mode``). Leaving merged mode unmerges now (W0 back, exactly),
        so that the weight holds W0 before the model is sharded (FSDP2, ZeRO-3: call
        ``set_mode(model, 'split')`` before ``fully_shard``); 'merged' and 'auto' merge at the
        next forward."""
        refusal = self.mode_refusal(mode)
        if refusal is not None:
            raise ValueError(refusal)
        if mode != "merged":
            self.unmerge()
        self.mode = mode
        self._merge_disabled = False
        self._split_said = False

    def mark_weight_shared(self, other: str) -> None:
        """Record that module ``other`` holds this layer's weight too (e.g. a tied LM head and the
        input embedding): the layer is unmerged (W0 back in the shared weight) and from now on
        never writes into it; mode 'auto' computes the split form."""
        self.unmerge()
        self.weight_shared_with = other

    def _weight_swapped(self) -> bool:
        return self._merged and self.weight is not self._merged_into[0]

    def _check_weight_kept(self) -> None:
        """Merged mode needs the weight Parameter it wrote W0 + Δ into to stay the module's weight.
        FSDP2 (and FSDP1) swap a gathered copy in for every forward and gather it again from the
        shards for backward, so W0 + Δ would be lost between forward and backward (dx would use
        the shards' weight). Mode 'auto' then falls back to split for good, which is exact when
        the shards hold W0, i.e. the weight held W0 when the model was sharded (lent to a state
        dict, or the delta was still zero, as right after get_spft_model: one host sync, once);
        otherwise, and for mode 'merged', this is an error. Checked by the forward, the state
        dict and unmerge (none of them may write into the replaced weight: a DTensor)."""
        if not self._weight_swapped():
            return
        shards_hold_w0 = not self._holds_delta or not bool(self.delta.detach().any())
        if self.mode == "merged":
            raise RuntimeError(
                f"{self.layer_name}: mode 'merged': the weight Parameter of this merged layer was replaced (FSDP "
                "swaps gathered parameters in for every forward and gathers them again for backward), so W0 + delta "
                "cannot persist in it; call spft.set_mode(model, 'split') (or 'auto') before sharding"
            )
        if shards_hold_w0:
            self._merged, self._merged_into, self._merge_disabled = False, None, True
            self._w0_at_index = None
            self._synced_delta_key = None
            self._holds_delta = False
            if not self._split_said:
                self._split_said = True
                warnings.warn(
                    f"{self.layer_name}: mode 'auto' computes the split form from now on (exact): the weight was sharded "
                    "(FSDP swaps gathered parameters in), so W0 + delta cannot persist in it. Pass mode='split' to "
                    "silence this",
                    stacklevel=3,
                )
            return
        raise RuntimeError(
            f"{self.layer_name}: the weight Parameter of this merged layer was replaced (FSDP swaps gathered "
            "parameters in for every forward) while it held W0 + delta, so the shards hold W0 + delta and "
            "training would count delta twice; call spft.set_mode(model, 'split') (or unmerge()) before "
            "sharding, or load the adapter with load_adapter(..., mode='split')"
        )

    @builds_state
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding ``W0 + Δ`` in the weight's dtype (fp32 sum, rounded once), bitwise
        equal to the merged mode's weight. Over a base that computes its own term (quantized):
        its dense W0 (``dequant(Wq)`` in the compute dtype) plus Δ."""
        if self.base_kind.weight_for_ops(self) is None:
            return self._write(self.base_kind.dense(self), base=None, delta=self.delta)
        self._check_weight_kept()
        if self._merged:
            self._resync_if_stale()
        if self._computes_merged():
            return self.weight.detach().clone()
        if self._merged:  # W0 lent to a state dict: the weight holds W0
            return self._write(self.weight.detach().clone(), base=None, delta=self.delta)
        weight = self.weight.detach().clone(memory_format=torch.contiguous_format)
        return self._write(weight, base=None, delta=self.delta)

    @builds_state
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W0 + Δ`` (new tensors; this layer is unchanged)."""
        return super().to_linear()

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_kind.weight_for_ops(self) is None:  # a base that computes its own product
            return self._quantized_forward(x)
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        self._check_weight_kept()
        if not self._merged and self._wants_merged(say=True):
            self._merge()
        if self._merged:
            self._resync_if_stale()
        return self._functional(x)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as torch.compile sees it. The eager staleness check compares ``delta``'s
        version counter and data pointer in Python, which Dynamo cannot trace (a graph break at
        every layer, and a recompile at every optimizer step when it guards on the version), so a
        merged layer re-syncs unconditionally instead: one O(nnz) (or O(R * in)) write in the
        graph, a tiny fraction of the layer's GEMM, giving the same weight as the eager re-sync.
        A layer that is not merged yet computes the split form here: merging installs new state
        on the module, which a traced graph must not do (``get_spft_model`` merges up front, and
        any eager forward merges too; Dynamo then recompiles once for the merged layer). A
        swapped weight (FSDP, see ``_check_weight_kept``) is an error here: the fallback to split
        changes module state; run one eager forward first, or use mode='split'."""
        if self._weight_swapped():
            raise RuntimeError(
                f"{self.layer_name}: the weight Parameter of this merged layer was replaced (FSDP); use "
                "mode='split' with FSDP and torch.compile"
            )
        if self._computes_merged():  # Dynamo guards on the loan count: one more graph while lent
            with torch.no_grad():
                self._write(self.weight, base=self._w0_at_index, delta=self.delta.detach())
        return self._functional(x)

    # --- state dict, dtype and device -------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._check_weight_kept()  # sharded since the merge (FSDP2): nothing to write back, or an error
        if self._merged:
            # Save W0, never W_eff: the state dict must not depend on the mode. W0 is written back
            # into the trained positions (O(nnz), exact; before the state dict holds the weight)
            # and lent, never copied (w0_loan.py).
            with torch.no_grad():
                self._write_w0_back()
            self._synced_delta_key = None
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The canonical positions, whatever form the layer stores them in (SparseDeltaLinear: 2
        # bytes an entry, expanded here to the int32 index while the state dict lives).
        positions = self._current_positions()
        destination[prefix + self.positions_key] = positions if keep_vars else positions.detach()
        destination.update(self.base_kind.state_dict_extras(self, prefix, keep_vars))
        dense = self.base_kind.weight_for_ops(self) is not None  # (a quantized weight is never merged)
        if self._merged or (dense and not keep_vars and self.mode in ("auto", "merged")):
            # The weight holds W0 now; the state dict's tensor shares its storage, so the layer
            # writes no W0 + Δ into it while it lives (``observers``). Lent as well, so that a
            # compiled forward (which cannot ask the storage) keeps the split form too.
            destination[prefix + "weight"] = self._w0_loans.lend(self.weight)

    @builds_state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """All or nothing for this layer: positions, delta and the shapes of the other entries are
        checked before anything changes. New positions need their delta (a missing one is an
        error, whatever ``strict`` says: there are no values to train from); the same positions
        without a delta keep the current delta (a missing key for ``strict``)."""
        positions_key, delta_key = prefix + self.positions_key, prefix + "delta"
        incoming, incoming_delta = state_dict.get(positions_key), state_dict.get(delta_key)
        validated = order = None
        if incoming is not None:
            if not isinstance(incoming, torch.Tensor):
                raise ValueError(f"{self.layer_name}: {positions_key} must be a tensor, got {type(incoming).__name__}")
            # load_state_dict(assign=True) takes the state dict's tensors (a meta skeleton's usual
            # way to get real ones): the positions stay on their device too, not the layer's.
            device = incoming.device if local_metadata.get("assign_to_params_buffers") else self.weight.device
            # Validate before touching anything, so a bad file leaves the layer as it was.
            validated, order = self._validate(
                incoming.to(device) if incoming.device.type != "meta" else incoming,
                self.out_features,
                self.in_features,
                device,
                f"{self.layer_name} ({positions_key})",
                layer=self,
                **self.options(),
            )
        problem = self._load_problem(validated, incoming_delta, positions_key, delta_key, state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"{problem} (nothing was loaded into this layer)")
            return
        was_merged = self._merged
        self.unmerge()
        kept = (self.delta.data, self.delta.grad, dict(self._buffers))
        errors_before = len(error_msgs)
        if validated is not None and incoming_delta is not None:
            # Resize so the default loader can copy; values come from the state dict right after.
            self.delta.data = torch.zeros(self._delta_shape(validated), dtype=self.delta.dtype, device=self.delta.device)
            self.delta.grad = None
        # The positions key is this method's (validated above, adopted below): hidden from the default loader.
        self._non_persistent_buffers_set.add(self.positions_key)
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._announce_positions()
        # The positions key is this method's (validated above, adopted below), not the default
        # loader's: neither unexpected nor, when absent, left unreported.
        if positions_key in unexpected_keys:
            unexpected_keys.remove(positions_key)
        for key in self.base_kind.state_dict_extras(self, prefix, False):  # the base's own keys
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if strict and incoming is None and positions_key not in missing_keys:
            missing_keys.append(positions_key)
        if len(error_msgs) > errors_before:  # a check the default loader made failed: undo
            self.delta.data, self.delta.grad = kept[0], kept[1]
            self._buffers.clear()
            self._buffers.update(kept[2])
        elif validated is not None and incoming_delta is not None:
            if order is not None:
                with torch.no_grad():
                    self.delta.data = self.delta.data[order.to(self.delta.device)]
            self._adopt(validated)
            self._announce_positions()
        if was_merged and self._wants_merged():
            self._merge()

    def _load_problem(self, validated, incoming_delta, positions_key, delta_key, state_dict, prefix) -> Optional[str]:
        """What makes a state dict unloadable into this layer, found without changing it (None: loadable)."""
        if validated is not None:
            count = self._positions_tensor(validated).numel()
            if incoming_delta is None:
                if not self._same_positions(validated):
                    return (
                        f"{self.layer_name}: {positions_key} gives new positions ({count} {self.unit}) but "
                        f"{delta_key} is missing; a delta must come with its positions"
                    )
            elif not isinstance(incoming_delta, torch.Tensor):
                return f"{self.layer_name}: {delta_key} must be a tensor, got {type(incoming_delta).__name__}"
            elif tuple(incoming_delta.shape) != self._delta_shape(validated):
                shape = tuple(incoming_delta.shape)
                return f"{self.layer_name}: {delta_key} has shape {shape} but {positions_key} has {count} {self.unit}"
        if isinstance(incoming_delta, torch.Tensor) and not incoming_delta.is_floating_point():
            return f"{self.layer_name}: {delta_key} must be floating point, got {incoming_delta.dtype}"
        problem = self.base_kind.load_problem(self, state_dict, prefix)
        if problem is not None:
            return f"{self.layer_name}: {problem}"
        for name, own in list(self._parameters.items()) + list(self._buffers.items()):
            if name in ("delta", self.positions_key) or own is None or name in self._non_persistent_buffers_set:
                continue
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own.shape):
                return (
                    f"{self.layer_name}: size mismatch for {prefix + name}: {tuple(value.shape)} in the state dict, "
                    f"{tuple(own.shape)} in the layer"
                )
        return None

    def _announce_positions(self) -> None:
        """List the positions key among the persistent buffers, so that tools that learn a module's
        state-dict keys from its parameters and buffers expect it (torch.distributed.checkpoint's
        ``set_model_state_dict`` with ``broadcast_from_rank0``: without it rank 1 dropped the
        positions it received, raised "Missing key(s) ... index" and rank 0 waited to the
        timeout). The state dict's value is still written by ``_save_to_state_dict`` (the
        canonical positions) and read by ``_load_from_state_dict``, so the saved format is
        unchanged. A kind that keeps its positions in another form (entries: 2 bytes an entry)
        gets a 0-d placeholder under the key."""
        key = self.positions_key
        if key not in self._buffers:
            self._buffers[key] = torch.zeros((), dtype=torch.int64)  # (on the CPU: a layer built on meta too)
        self._non_persistent_buffers_set.discard(key)

    def _current_positions(self) -> torch.Tensor:
        """The layer's positions in canonical form (subclasses that store another form override)."""
        return self._buffers[self.positions_key]

    def _same_positions(self, validated) -> bool:
        mine, theirs = self._current_positions(), self._positions_tensor(validated)
        return mine.shape == theirs.shape and bool(torch.equal(mine.long(), theirs.long().to(mine.device)))

    def _after_apply(self) -> None:
        if self._merged and self.weight.device.type == "meta":
            # Moved to the meta device (``.to("meta")``, then ``to_empty``): no tensor holds W0 + Δ
            # or the kept W0 any more, so the layer is a skeleton, not merged; else loading into it
            # after ``to_empty`` would first "unmerge" uninitialised values at uninitialised positions.
            self._w0_at_index = None
            self._merged = False
            self._merged_into = None
            self._synced_delta_key = None
        if self._merged:
            # The cast rounded W_eff as a whole; rewrite the positions from the (cast) W0 values
            # and the master so that the merged weight is again W0 + Δ rounded once. A cast may
            # also have made a new weight Parameter (torch.__future__ overwrite semantics).
            self._synced_delta_key = None
            self._merged_into = (self.weight,)

    @builds_state
    def _apply(self, fn, recurse=True):
        return super()._apply(fn, recurse)

    # --- the position-kind protocol (what every delta kind shares) ---------------------------

    def prepare_for_training(self, merge: bool = True) -> None:
        super().prepare_for_training()
        if merge and self._wants_merged():
            self.merge()

    @property
    def w0_lent(self) -> bool:
        return self._w0_loans.active

    @contextlib.contextmanager
    def as_plain_linear(self):
        """Merged (the weight holds ``W0 + Δ``, O(positions)) and running ``nn.Linear.forward``, so
        autograd (double backward, vmap included) sees an ordinary weight; on exit the forward is
        restored and a layer that was not merged is unmerged (W0 back exactly)."""
        was_merged = self._merged
        self.merge()
        self.forward = types.MethodType(nn.Linear.forward, self)
        try:
            yield self
        finally:
            del self.forward
            if not was_merged:
                self.unmerge()

    def trainable_tensors(self) -> dict:
        return {"delta": self.delta}

    def positions(self) -> torch.Tensor:
        return self._current_positions()

    @classmethod
    def check_positions(cls, positions, shape: tuple, device, where: str, options: dict):
        validated, order = cls._validate(positions, shape[0], shape[1], device, where, **options)
        return cls._positions_tensor(validated), order

    def kept_w0(self):
        if not self._merged or self._w0_at_index is None:
            return None
        return self._kept_entries()

    def _kept_entries(self):
        """``(sorted flat int64, values)`` of ``_w0_at_index`` (the W0 a merged layer keeps aside)."""
        raise NotImplementedError

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward over a base that stores W0 in another form (``weight_for_ops`` None: a
        quantized base): Δ added into the dense W0 the base makes for its GEMM, one layer at a time
        (``ops/delta_term.py``)."""
        ops = DequantizedDelta(lambda: self.base_kind.dense(self), lambda weight, delta: self._write(weight, None, delta),
                               self._delta_gradient)
        return on_dequantized(x, self.delta, self.bias, ops)

    def _delta_gradient(self, x2d: torch.Tensor, dy2d: torch.Tensor) -> torch.Tensor:
        """The delta's gradient from 2-D x and dy (fp32 / fp64), for ``_quantized_forward``; a kind
        that defines it can train over a quantized base."""
        raise NotImplementedError(f"{type(self).__name__} cannot train over a quantized base")

    def extra_repr(self) -> str:
        described = self.base_kind.describe(self)
        base = "" if not described else ", base=" + ", ".join(f"{k}={v}" for k, v in described.items())
        return (
            f"{nn.Linear.extra_repr(self)}, {self._describe()}, mode={self.mode}, backend={self.backend}, "
            f"merged={self._merged}{base}"
        )
