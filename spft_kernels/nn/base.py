"""The shared base of the drop-in ``nn.Linear`` layers with a frozen weight W0 and a trainable delta
at fixed positions: ``SparseDeltaLinear`` (scattered entries: SPEFT, SpaRTA;
``sparse_delta_linear.py``) and ``RowSparseLinear`` (whole rows: SPruFT; ``row_sparse_linear.py``).

Modes (DESIGN.md "Execution modes"), the same for both layers:

- ``split``: ``x W0ᵀ + b`` (cuBLAS) plus the delta's own term (the sparse ``x Δᵀ``, or
  ``x Wfᵀ`` scattered into the selected output rows); W0 is never modified.
- ``merged``: the weight holds ``W_eff = W0 + Δ`` in its own dtype and W0 at the trained
  positions is kept aside (nnz values, or R rows); forward and dx are plain GEMMs, only the delta
  gradient is sparse. When ``delta`` may have changed since the last forward (its version counter
  or storage moved, or a gradient was accumulated into it since, after which any optimizer step
  may follow) the trained positions are rewritten from W0 and the fp32 master (O(nnz) or
  O(R * in)). Note that the weight tensor is shared with the linear the layer
  was built from, so that linear sees ``W_eff`` while the layer is merged; ``unmerge()`` restores
  W0 exactly.
- ``fused`` (SparseDeltaLinear): one GEMM whose weight tiles get the delta entries added on the
  fly (the cuda backend's kernel; other backends compute the split form); W0 is never modified
  and no merged copy is kept. The backward is the split mode's.
- ``auto``: ``merged`` when it is possible (the fastest mode available: SparseDeltaLinear needs a
  contiguous weight, RowSparseLinear merges any layout), else ``split``.

The state dict always holds W0 (never W_eff), the fp32 delta and the canonical positions
(``index`` or ``rows``), so it is the same whatever the mode and loads into a layer of any mode
or size. A merged layer builds it without copying the weight: W0 is written back into the trained
positions and lent to the state dict until it is freed (``w0_loan.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops._guards import as_int, builds_state, describe, is_inference
from ..ops.backends import check_backend_name
from .w0_loan import W0Loans

MODES = ("auto", "merged", "split", "fused")

_GRADIENTS_SEEN = "_spft_gradients_seen"


_SHARED_WEIGHT = (
    "{layer}: the weight is shared with {other!r} (e.g. a tied LM head and input embedding); merging would "
    "write W0 + delta into {other!r} too, so this layer never merges: use mode 'auto' or 'split' (exact, W0 "
    "never modified)"
)
_INFERENCE_WEIGHT = (
    "{layer}: the weight is an inference tensor (made under torch.inference_mode), which torch forbids writing "
    "in place outside inference mode, so it cannot be merged; use mode 'auto' or 'split', or rebuild the linear "
    "outside inference_mode (or clone its weight there)"
)
_READ_BY_PARENT = (
    "{layer}: this linear is the out_proj of an nn.MultiheadAttention (a NonDynamicallyQuantizableLinear), "
    "which reads out_proj.weight and .bias itself and never calls the module's forward: a delta there would "
    "be silently ignored, so it cannot be converted"
)


def _check_sizes(in_features, out_features, layer_name: str) -> tuple[int, int]:
    """Python ints (numpy integers accepted: the index arithmetic must not wrap in uint16)."""
    sizes = as_int(in_features), as_int(out_features)
    if None in sizes or min(sizes) < 0:
        raise ValueError(
            f"{layer_name}: in_features and out_features must be non-negative integers, got "
            f"{describe(in_features)} and {describe(out_features)}"
        )
    return sizes


def _check_delta_dtype(delta_dtype, layer_name: str) -> torch.dtype:
    if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
        raise ValueError(
            f"{layer_name}: delta_dtype must be a floating-point torch.dtype (the trainable master, fp32 by "
            f"default), got {delta_dtype!r}"
        )
    return delta_dtype


def _count_gradient(delta: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a layer's delta: counts the gradients accumulated into it, so
    that a merged layer re-syncs after an optimizer step that did not bump the version counter."""
    setattr(delta, _GRADIENTS_SEEN, getattr(delta, _GRADIENTS_SEEN, 0) + 1)


class _FrozenBaseDeltaLinear(nn.Linear):
    """What both layers share: a frozen W0 (shared with the wrapped linear, never copied), a master
    delta at validated positions (fp32 unless told otherwise), merge/unmerge with W0 at the
    positions kept aside, the merged mode's re-sync, a mode-independent state dict and casts that
    keep the master delta.

    A subclass says where the delta sits: ``_POSITIONS`` (the state dict key of the positions,
    which the base writes and reads itself: a subclass stores them in any form, in non-persistent
    buffers, and gives them back canonical through ``_current_positions``), ``_UNIT``
    (what one position is called in messages) and the hooks ``_validate`` (a classmethod; given
    ``layer=`` when positions come into an existing layer), ``_adopt``,
    ``_positions_tensor``, ``_delta_shape``, ``_gather_w0``, ``_write``, ``_functional`` and
    ``_describe``.
    """

    _POSITIONS = ""
    _UNIT = ""
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = True
    _HAS_FUSED_MODE = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        positions: Optional[torch.Tensor],
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        mode: str = "auto",
        backend: str = "auto",
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> None:
        in_features, out_features = _check_sizes(in_features, out_features, name or type(self).__name__)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.layer_name = name or type(self).__name__
        if mode not in MODES:
            raise ValueError(f"{self.layer_name}: unknown mode {mode!r}; choose one of {MODES}")
        if mode == "fused" and not self._HAS_FUSED_MODE:
            raise NotImplementedError(
                f"{type(self).__name__} has no mode='fused' (the fused GEMM is SparseDeltaLinear's); "
                "use 'merged' (fastest) or 'split'"
            )
        self.mode = mode
        self.backend = check_backend_name(backend)
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
        # Live state-dict views of the weight while it holds W0 for them (w0_loan.py).
        self._w0_loans = W0Loans()
        self.register_buffer("_w0_at_index", None, persistent=False)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if positions is None:
            # No positions yet (a skeleton, e.g. on the meta device, to load a state dict into):
            # zero trainable entries, a valid layer that computes the plain linear.
            positions = torch.empty(0, dtype=torch.int64, device=self.weight.device)
        self._set_positions(positions, None)

    @classmethod
    @builds_state
    def _wrap(cls, linear: nn.Linear, positions, mode: str, backend: str, delta_dtype, name: Optional[str]):
        """``from_linear``: wrap ``linear`` without copying its weight; the layer shares (and freezes)
        the weight and bias tensors and starts with ``delta = 0``, computing exactly what
        ``linear`` did."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer_name = name or cls.__name__
        if type(linear).__name__ == "NonDynamicallyQuantizableLinear":
            raise ValueError(_READ_BY_PARENT.format(layer=layer_name))
        _check_delta_dtype(delta_dtype, layer_name)
        if linear.weight.device.type == "meta":
            raise ValueError(f"{layer_name}: the linear's weight is on the meta device; materialise it first")
        if mode == "merged" and cls._MERGE_NEEDS_CONTIGUOUS_WEIGHT and not linear.weight.is_contiguous():
            raise ValueError(f"{layer_name}: mode='merged' needs a contiguous weight; use mode='split'")
        if mode == "merged" and is_inference(linear.weight):
            raise ValueError(_INFERENCE_WEIGHT.format(layer=layer_name))
        in_features, out_features = _check_sizes(linear.in_features, linear.out_features, layer_name)
        # Validate before touching the linear, so bad positions leave it as it was.
        validated, _ = cls._validate(positions, out_features, in_features, linear.weight.device, layer_name)
        # Build on the meta device so that no second weight is ever allocated or initialised.
        layer = cls(
            in_features,
            out_features,
            None,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            mode=mode,
            backend=backend,
            delta_dtype=delta_dtype,
            name=name,
        )
        flags = [(p, p.requires_grad) for p in (linear.weight, linear.bias) if p is not None]
        try:
            layer.weight = linear.weight
            layer.weight.requires_grad_(False)
            if linear.bias is not None:
                layer.bias = linear.bias
                layer.bias.requires_grad_(False)
            layer._install(validated, None)
        except BaseException:
            for parameter, flag in flags:  # the linear is left as it was
                parameter.requires_grad_(flag)
            raise
        return layer

    # --- the positions ----------------------------------------------------------------------

    @builds_state
    def _set_positions(self, positions, values: Optional[torch.Tensor]) -> None:
        validated, order = self._validate(
            positions, self.out_features, self.in_features, self.weight.device, self.layer_name, layer=self
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
        current = getattr(self, "delta", None)
        if isinstance(current, nn.Parameter) and current.device.type != "meta":  # the same Parameter
            self.delta.data = values
            self.delta.grad = None
        else:
            self.delta = nn.Parameter(values)
        if was_merged:
            self._merge()

    def _master_dtype(self) -> torch.dtype:
        # The delta master follows the base only into fp64 (gradcheck); otherwise it stays fp32
        # (or the configured delta_dtype) when the base is cast to bf16/fp16.
        return torch.float64 if self.weight.dtype == torch.float64 else self.delta_dtype

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
        (``weight_shared_with``) and for an inference tensor weight: both stay in the split form.
        Raises ``RuntimeError`` while a state dict of this layer that shares its weight (holding
        W0) is still alive (``w0_loan.py``)."""
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
        if self._MERGE_NEEDS_CONTIGUOUS_WEIGHT and not self.weight.is_contiguous():
            raise ValueError(f"{self.layer_name}: merge needs a contiguous weight")
        if self.weight_shared_with is not None:
            raise ValueError(_SHARED_WEIGHT.format(layer=self.layer_name, other=self.weight_shared_with))
        if is_inference(self.weight):
            raise ValueError(_INFERENCE_WEIGHT.format(layer=self.layer_name))
        self._w0_at_index = self._gather_w0()
        self._merged = True
        self._merged_into = (self.weight,)
        self._synced_delta_key = None
        self._resync_if_stale()

    @builds_state
    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly (the saved W0 values are written back). Idempotent. In mode 'merged'
        the next forward merges again."""
        if not self._merged:
            return
        self._write(self.weight, base=self._w0_at_index, delta=None)
        self._w0_at_index = None
        self._merged = False
        self._merged_into = None
        self._synced_delta_key = None

    @builds_state
    @torch.no_grad()
    def _resync_if_stale(self) -> None:
        if self._w0_loans.settled():
            return  # the weight holds W0 for a live state dict
        key = self._delta_key()
        if key != self._synced_delta_key:
            self._write(self.weight, base=self._w0_at_index, delta=self.delta)
            self._synced_delta_key = key

    def _computes_merged(self) -> bool:
        """Whether the weight holds ``W0 + Δ`` for this forward (merged and W0 not lent): the
        subclasses' ``_functional`` computes the merged form then, else the split form."""
        return self._merged and not self._w0_loans.settled()

    def _wants_merged(self) -> bool:
        if self.mode == "merged":
            return True  # merge() raises when it cannot (a shared or an inference tensor weight)
        return (
            self.mode == "auto"
            and self.weight_shared_with is None
            and not is_inference(self.weight)
            and not self._merge_disabled
            and (self.weight.is_contiguous() or not self._MERGE_NEEDS_CONTIGUOUS_WEIGHT)
        )

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
        the shards hold W0, i.e. the delta was still zero when the model was sharded (one host
        sync, once); otherwise, and for mode 'merged', this is an error."""
        if not self._weight_swapped():
            return
        if self.mode == "auto" and not bool(self.delta.detach().any()):
            self._merged, self._merged_into, self._merge_disabled = False, None, True
            self._w0_at_index = None
            self._synced_delta_key = None
            return
        raise RuntimeError(
            f"{self.layer_name}: the weight Parameter of this merged layer was replaced (FSDP swaps gathered "
            "parameters in for every forward), so W0 + delta cannot persist in it; use mode='split' with "
            "FSDP, or unmerge() before replacing the weight"
        )

    @builds_state
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding ``W0 + Δ`` in the weight's dtype (fp32 sum, rounded once), bitwise
        equal to the merged mode's weight."""
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
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        linear.weight = nn.Parameter(self.merged_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        self._check_weight_kept()
        if not self._merged and self._wants_merged():
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
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The canonical positions, whatever form the layer stores them in (SparseDeltaLinear: 2
        # bytes an entry, expanded here to the int32 index while the state dict lives).
        positions = self._current_positions()
        destination[prefix + self._POSITIONS] = positions if keep_vars else positions.detach()
        if self._merged:
            # Save W0, never W_eff: the state dict must not depend on the mode. W0 is written back
            # into the trained positions (O(nnz), exact) and lent, never copied (w0_loan.py).
            with torch.no_grad():
                self._write(self.weight, base=self._w0_at_index, delta=None)
            self._synced_delta_key = None
            destination[prefix + "weight"] = self._w0_loans.lend(self.weight)
        elif not keep_vars and self._wants_merged():
            # The weight holds W0 now, but the next forward would merge W0 + Δ into it under a
            # state dict still held (weight W0 + Δ next to delta Δ: Δ counted twice on load).
            # Lent, the layer computes the split form until the state dict is freed.
            destination[prefix + "weight"] = self._w0_loans.lend(self.weight)

    @builds_state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """All or nothing for this layer: positions, delta and the shapes of the other entries are
        checked before anything changes. New positions need their delta (a missing one is an
        error, whatever ``strict`` says: there are no values to train from); the same positions
        without a delta keep the current delta (a missing key for ``strict``)."""
        positions_key, delta_key = prefix + self._POSITIONS, prefix + "delta"
        incoming, incoming_delta = state_dict.get(positions_key), state_dict.get(delta_key)
        validated = order = None
        if incoming is not None:
            if not isinstance(incoming, torch.Tensor):
                raise ValueError(f"{self.layer_name}: {positions_key} must be a tensor, got {type(incoming).__name__}")
            # Validate before touching anything, so a bad file leaves the layer as it was.
            validated, order = self._validate(
                incoming.to(self.weight.device) if incoming.device.type != "meta" else incoming,
                self.out_features,
                self.in_features,
                self.weight.device,
                f"{self.layer_name} ({positions_key})",
                layer=self,
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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The positions key is this method's (validated above, adopted below), not the default
        # loader's: neither unexpected nor, when absent, left unreported.
        if positions_key in unexpected_keys:
            unexpected_keys.remove(positions_key)
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
        if was_merged:
            self._merge()

    def _load_problem(self, validated, incoming_delta, positions_key, delta_key, state_dict, prefix) -> Optional[str]:
        """What makes a state dict unloadable into this layer, found without changing it (None: loadable)."""
        if validated is not None:
            count = self._positions_tensor(validated).numel()
            if incoming_delta is None:
                if not self._same_positions(validated):
                    return (
                        f"{self.layer_name}: {positions_key} gives new positions ({count} {self._UNIT}) but "
                        f"{delta_key} is missing; a delta must come with its positions"
                    )
            elif not isinstance(incoming_delta, torch.Tensor):
                return f"{self.layer_name}: {delta_key} must be a tensor, got {type(incoming_delta).__name__}"
            elif tuple(incoming_delta.shape) != self._delta_shape(validated):
                shape = tuple(incoming_delta.shape)
                return f"{self.layer_name}: {delta_key} has shape {shape} but {positions_key} has {count} {self._UNIT}"
        if isinstance(incoming_delta, torch.Tensor) and not incoming_delta.is_floating_point():
            return f"{self.layer_name}: {delta_key} must be floating point, got {incoming_delta.dtype}"
        for name, own in list(self._parameters.items()) + list(self._buffers.items()):
            if name in ("delta", self._POSITIONS) or own is None or name in self._non_persistent_buffers_set:
                continue
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own.shape):
                return (
                    f"{self.layer_name}: size mismatch for {prefix + name}: {tuple(value.shape)} in the state dict, "
                    f"{tuple(own.shape)} in the layer"
                )
        return None

    def _current_positions(self) -> torch.Tensor:
        """The layer's positions in canonical form (subclasses that store another form override)."""
        return self._buffers[self._POSITIONS]

    def _same_positions(self, validated) -> bool:
        mine, theirs = self._current_positions(), self._positions_tensor(validated)
        return mine.shape == theirs.shape and bool(torch.equal(mine.long(), theirs.long().to(mine.device)))

    @builds_state
    def _apply(self, fn, recurse=True):
        # A cast of the module to bf16/fp16 must not round the fp32 master delta: keep the
        # original values and move them to the new device in the master dtype instead.
        before = self._parameters.get("delta")
        original = None if before is None else (before.data, before.grad)
        super()._apply(fn, recurse)
        delta = self._parameters.get("delta")
        master = self._master_dtype()
        if delta is not None and delta.dtype != master:
            values, grad = original
            delta.data = values.to(device=delta.device, dtype=master)
            delta.grad = None if grad is None else grad.to(device=delta.device, dtype=master)
        if self._merged:
            # The cast rounded W_eff as a whole; rewrite the positions from the (cast) W0 values
            # and the master so that the merged weight is again W0 + Δ rounded once. A cast may
            # also have made a new weight Parameter (torch.__future__ overwrite semantics).
            self._synced_delta_key = None
            self._merged_into = (self.weight,)
        return self

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, {self._describe()}, mode={self.mode}, backend={self.backend}, "
            f"merged={self._merged}"
        )
