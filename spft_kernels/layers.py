"""``SparseDeltaLinear``: a drop-in ``nn.Linear`` with a frozen weight W0 and a trainable sparse delta.

Modes (DESIGN.md "Execution modes"):

- ``split``: ``x W0ᵀ + b`` (cuBLAS) plus the sparse ``x Δᵀ``; W0 is never modified.
- ``merged``: the weight holds ``W_eff = W0 + Δ`` in its own dtype and ``W0[idx]`` is kept aside
  (nnz values); forward and dx are plain GEMMs, only the delta gradient is sparse. When
  ``delta`` has changed since the last forward (its version counter moved, e.g. after an
  optimizer step) the masked entries are rewritten ``W_eff[idx] = W0[idx] + delta`` (O(nnz)).
  Note that the weight tensor is shared with the linear the layer was built from, so that
  linear sees ``W_eff`` while the layer is merged; ``unmerge()`` restores W0 exactly.
- ``fused``: one GEMM with the delta added into the weight tile; arrives with the kernel issue.
- ``auto``: ``merged`` when the weight is contiguous (the fastest mode available), else ``split``.

The state dict always holds W0 (never W_eff), the fp32 delta and the canonical index, so it is
the same whatever the mode and loads into a layer of any mode or nnz.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .backends import check_backend_name
from .index import SparseIndex
from .scatter_delta import scatter_delta_
from .sparse_delta_linear import sparse_delta_linear

MODES = ("auto", "merged", "split", "fused")


class SparseDeltaLinear(nn.Linear):
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ`` holding ``delta[k]`` at flat position ``index[k]``.

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [nnz], fp32 master, zeros at start), ``index`` (buffer [nnz], canonical).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        index: Optional[torch.Tensor],
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        mode: str = "auto",
        backend: str = "auto",
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if mode not in MODES:
            raise ValueError(f"{name or 'SparseDeltaLinear'}: unknown mode {mode!r}; choose one of {MODES}")
        if mode == "fused":
            raise NotImplementedError(
                "mode='fused' needs the fused GEMM kernel, which this version does not ship yet; "
                "use 'merged' (fastest) or 'split'"
            )
        self.mode = mode
        self.backend = check_backend_name(backend)
        self.delta_dtype = delta_dtype
        self.layer_name = name or "SparseDeltaLinear"
        self._merged = False
        self._synced_delta_key = None
        self.register_buffer("_w0_at_index", None, persistent=False)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if index is not None:
            self.set_index(index)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        index: torch.Tensor,
        mode: str = "auto",
        backend: str = "auto",
        *,
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> "SparseDeltaLinear":
        """Wrap ``linear`` without copying its weight: the layer shares (and freezes) the weight and
        bias tensors, and starts with ``delta = 0`` so that it computes exactly what ``linear`` did."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer_name = name or "SparseDeltaLinear"
        if linear.weight.device.type == "meta":
            raise ValueError(f"{layer_name}: the linear's weight is on the meta device; materialise it first")
        if mode == "merged" and not linear.weight.is_contiguous():
            raise ValueError(f"{layer_name}: mode='merged' needs a contiguous weight; use mode='split'")
        # Validate before touching the linear, so a bad index leaves it as it was.
        sparse_index, _ = SparseIndex.build(
            index, linear.out_features, linear.in_features, device=linear.weight.device, name=layer_name
        )
        # Build on the meta device so that no second weight is ever allocated or initialised.
        layer = cls(
            linear.in_features,
            linear.out_features,
            None,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            mode=mode,
            backend=backend,
            delta_dtype=delta_dtype,
            name=name,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer._install(sparse_index, None)
        return layer

    # --- the index --------------------------------------------------------------------------

    def set_index(self, index: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the mask: validate ``index`` (unsorted input is sorted together with ``values``),
        rebuild the cached metadata and set ``delta`` to ``values`` (zeros if None). The layer is
        unmerged first and re-merged afterwards if it was merged. ``delta`` gets new storage, so an
        optimizer holding it must be rebuilt (or its state reset)."""
        sparse_index, order = SparseIndex.build(
            index, self.out_features, self.in_features, device=self.weight.device, name=self.layer_name
        )
        if values is not None:
            if not isinstance(values, torch.Tensor) or values.shape != (sparse_index.nnz,):
                raise ValueError(
                    f"{self.layer_name}: values must be a tensor of shape ({sparse_index.nnz},), got "
                    f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
                )
            if order is not None:
                values = values[order.to(values.device)]
        self._install(sparse_index, values)

    def _install(self, sparse_index: SparseIndex, values: Optional[torch.Tensor]) -> None:
        device = self.weight.device
        if values is None:
            values = torch.zeros(sparse_index.nnz, dtype=self._master_dtype(), device=device)
        else:
            values = values.detach().to(device=device, dtype=self._master_dtype())
        was_merged = self._merged
        if was_merged:
            self.unmerge()
        self._adopt(sparse_index)
        if isinstance(getattr(self, "delta", None), nn.Parameter):
            self.delta.data = values
            self.delta.grad = None
        else:
            self.delta = nn.Parameter(values)
        if was_merged:
            self.merge()

    def _adopt(self, sparse_index: SparseIndex) -> None:
        self.register_buffer("index", sparse_index.flat)
        # Derived once per mask; non-persistent so they follow .to() but never reach a state dict.
        self.register_buffer("_row_ptr", sparse_index.row_ptr, persistent=False)
        self.register_buffer("_col_ptr", sparse_index.col_ptr, persistent=False)
        self.register_buffer("_csc_perm", sparse_index.csc_perm, persistent=False)

    def sparse_index(self) -> SparseIndex:
        """The cached, validated index (no validation or rebuild: O(1))."""
        return SparseIndex(
            self.index, self._row_ptr, self._col_ptr, self._csc_perm, self.out_features, self.in_features
        )

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def _master_dtype(self) -> torch.dtype:
        # The delta master follows the base only into fp64 (gradcheck); otherwise it stays fp32
        # (or the configured delta_dtype) when the base is cast to bf16/fp16.
        return torch.float64 if self.weight.dtype == torch.float64 else self.delta_dtype

    # --- merge / unmerge --------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._merged

    def _delta_key(self):
        return (self.delta._version, self.delta.data_ptr(), self.delta.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Make the weight hold ``W0 + Δ`` (W0[idx] kept aside); later forwards re-sync it when
        ``delta`` changes. Idempotent."""
        if self._merged:
            self._resync_if_stale()
            return
        if not self.weight.is_contiguous():
            raise ValueError(f"{self.layer_name}: merge needs a contiguous weight")
        self._w0_at_index = self.weight.view(-1).index_select(0, self.index)
        scatter_delta_(self.weight, self.index, base=self._w0_at_index, delta=self.delta, backend=self.backend)
        self._merged = True
        self._synced_delta_key = self._delta_key()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly (the saved W0[idx] are written back). Idempotent. In mode 'merged'
        the next forward merges again."""
        if not self._merged:
            return
        scatter_delta_(self.weight, self.index, base=self._w0_at_index, backend=self.backend)
        self._w0_at_index = None
        self._merged = False
        self._synced_delta_key = None

    @torch.no_grad()
    def _resync_if_stale(self) -> None:
        key = self._delta_key()
        if key != self._synced_delta_key:
            scatter_delta_(self.weight, self.index, base=self._w0_at_index, delta=self.delta, backend=self.backend)
            self._synced_delta_key = key

    def _wants_merged(self) -> bool:
        return self.mode == "merged" or (self.mode == "auto" and self.weight.is_contiguous())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding ``W0 + Δ`` in the weight's dtype (fp32 sum, rounded once), bitwise
        equal to the merged mode's weight."""
        if self._merged:
            self._resync_if_stale()
            return self.weight.detach().clone()
        weight = self.weight.detach().clone(memory_format=torch.contiguous_format)
        return scatter_delta_(weight, self.index, delta=self.delta, backend=self.backend)

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
        if not self._merged and self._wants_merged():
            self.merge()
        if self._merged:
            self._resync_if_stale()
        return sparse_delta_linear(
            x, self.weight, self.delta, self.sparse_index(), self.bias, backend=self.backend, merged=self._merged
        )

    # --- state dict, dtype and device -------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged:
            # Save W0, never W_eff: the state dict must not depend on the mode.
            with torch.no_grad():
                w0 = self.weight.detach().clone()
                scatter_delta_(w0, self.index, base=self._w0_at_index, backend=self.backend)
            destination[prefix + "weight"] = w0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        index_key, delta_key = prefix + "index", prefix + "delta"
        incoming_index = state_dict.get(index_key)
        order = None
        sparse_index = None
        if incoming_index is not None:
            # Validate before touching anything, so a bad file leaves the layer as it was.
            sparse_index, order = SparseIndex.build(
                incoming_index.to(self.weight.device),
                self.out_features,
                self.in_features,
                device=self.weight.device,
                name=f"{self.layer_name} ({index_key})",
            )
            incoming_delta = state_dict.get(delta_key)
            if incoming_delta is not None and incoming_delta.shape != (sparse_index.nnz,):
                error_msgs.append(
                    f"{self.layer_name}: {delta_key} has shape {tuple(incoming_delta.shape)} but {index_key} "
                    f"has {sparse_index.nnz} entries"
                )
                return
        was_merged = self._merged
        self.unmerge()
        if sparse_index is not None and sparse_index.nnz != self.nnz:
            # Resize so the default loader can copy; values come from the state dict right after.
            self.delta.data = torch.empty(sparse_index.nnz, dtype=self.delta.dtype, device=self.delta.device)
            self.delta.grad = None
            self._buffers["index"] = torch.empty_like(sparse_index.flat)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if sparse_index is not None:
            if order is not None:
                with torch.no_grad():
                    self.delta.data = self.delta.data[order]
            self._adopt(sparse_index)
        if was_merged:
            self.merge()

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
        return self

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        density = self.nnz / total if total else 0.0
        return (
            f"{super().extra_repr()}, nnz={self.nnz}, density={density:.4g}, mode={self.mode}, "
            f"backend={self.backend}, merged={self._merged}"
        )
