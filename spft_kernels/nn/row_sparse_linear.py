"""``RowSparseLinear``: a frozen W0 plus R trainable whole rows (SPruFT); the modes and the state
dict are the base's (``base.py``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops import naive
from ..ops.index import canonical_rows
from ..ops.row_delta_linear import row_delta_linear
from .base import _FrozenBaseDeltaLinear


class RowSparseLinear(_FrozenBaseDeltaLinear):
    """SPruFT: ``y = x W0ᵀ + b``, then ``y[..., rows] += x Wfᵀ``: R whole rows ``Wf = delta`` of the
    weight are trained (DESIGN.md "Row delta").

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [R, in], fp32 master, zeros at start), ``rows`` (buffer [R], sorted unique
    int64 output rows). Merged mode keeps ``W0[rows]`` aside (R x in values in the weight's dtype)
    and works with any weight layout, so ``auto`` always merges.
    """

    _POSITIONS = "rows"
    _UNIT = "rows"
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = False  # rows are written with index_copy_ along dim 0

    def __init__(self, in_features: int, out_features: int, rows: Optional[torch.Tensor], *args, **kwargs) -> None:
        # bias, device, dtype and the keyword-only mode, backend, delta_dtype, name: see the base.
        super().__init__(in_features, out_features, rows, *args, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rows: torch.Tensor,
        mode: str = "auto",
        backend: str = "auto",
        *,
        delta_dtype: torch.dtype = torch.float32,
        name: Optional[str] = None,
    ) -> "RowSparseLinear":
        """Wrap ``linear`` without copying its weight: the layer shares (and freezes) the weight and
        bias tensors and trains ``delta`` [len(rows), in] at the given output ``rows`` (1-D integer,
        unique, in range; sorted here), starting from zero so that it computes exactly what
        ``linear`` did."""
        return cls._wrap(linear, rows, mode, backend, delta_dtype, name)

    def set_rows(self, rows: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the trained rows: validate ``rows`` (unsorted input is sorted together with the
        rows of ``values`` [R, in]) and set ``delta`` to ``values`` (zeros if None). The layer is
        unmerged first and re-merged afterwards if it was merged. ``delta`` gets new storage, so an
        optimizer holding it must be rebuilt (or its state reset)."""
        self._set_positions(rows, values)

    @property
    def num_rows(self) -> int:
        return self.rows.numel()

    @classmethod
    def _validate(cls, rows, out_features, in_features, device, name, layer=None):
        return canonical_rows(rows, out_features, device=device, name=name)

    def _adopt(self, rows: torch.Tensor) -> None:
        self.register_buffer("rows", rows, persistent=False)  # the base writes the state dict's key

    @staticmethod
    def _positions_tensor(rows: torch.Tensor) -> torch.Tensor:
        return rows

    def _delta_shape(self, rows: torch.Tensor) -> tuple:
        return (rows.numel(), self.in_features)

    def _gather_w0(self) -> torch.Tensor:
        return self.weight.index_select(0, self.rows)

    def _write(self, weight, base, delta):
        return naive.write_rows_(weight, self.rows, base=base, delta=delta)

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        return row_delta_linear(
            x, self.weight, self.delta, self.rows, self.bias, backend=self.backend, merged=self._computes_merged(), validate=False
        )

    def _describe(self) -> str:
        fraction = self.num_rows / self.out_features if self.out_features else 0.0
        return f"rows={self.num_rows}, fraction={fraction:.4g}"
