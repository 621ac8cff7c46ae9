"""``RowSparseLinear``, the ``rows`` kind: a frozen W0 plus R trainable whole rows (SPruFT). The
modes and the state dict are every delta kind's (``delta_layer.py``); this file owns what is
particular to rows: their validation, W0 at them, the adapter encoding (int32 rows), the SHiRA
form (each row as its ``in`` entries), the selection hook and the sum of several adapters."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import naive
from ..ops.row_gather import row_gather
from ..ops.index import canonical_rows
from ..ops.row_delta_linear import row_delta_linear
from .base import trainable_count
from .delta_layer import DeltaLayer
from .registry import register_kind
from .stored import AdapterPayload, StoredLayer, expect_tensor, take_tensors, VALUE_DTYPES


@register_kind
class RowSparseLinear(DeltaLayer):
    """SPruFT: ``y = x W0ᵀ + b``, then ``y[..., rows] += x Wfᵀ``: R whole rows ``Wf = delta`` of the
    weight are trained (``docs/architecture.md``, "Row delta").

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [R, in], fp32 master, zeros at start), ``rows`` (buffer [R], sorted unique
    int64 output rows). Merged mode keeps ``W0[rows]`` aside (R x in values in the weight's dtype)
    and works with any weight layout, so ``auto`` always merges.
    ``RowSparseLinear.from_linear(linear, rows, *, mode="auto", backend="auto", name=None)``.
    """

    kind = "rows"
    positions_key = "rows"
    unit = "rows"
    shira_kind = "rows"
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = False  # rows are written with index_copy_ along dim 0

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

    def _delta_gradient(self, x2d: torch.Tensor, dy2d: torch.Tensor) -> torch.Tensor:
        # dWf = dy[:, rows]ᵀ x, accumulated in fp32 (fp64 for fp64 inputs)
        gathered = row_gather(dy2d, self.rows, self.backend, validate=False)
        return naive.mm_tn_acc(gathered, x2d, naive.accumulate_dtype(x2d, dy2d))

    def _describe(self) -> str:
        fraction = self.num_rows / self.out_features if self.out_features else 0.0
        return f"rows={self.num_rows}, fraction={fraction:.4g}"

    def _kept_entries(self):
        return _row_entries(self.rows, self.in_features), self._w0_at_index.reshape(-1)

    # --- the position-kind protocol ---------------------------------------------------------

    @classmethod
    def serves(cls, config) -> bool:
        return config.method == "spruft"

    @classmethod
    def select_positions(cls, selection) -> dict:
        return selection.rows()

    @classmethod
    def flat_positions(cls, positions, shape, options) -> torch.Tensor:
        return _row_entries(positions, shape[1])

    @classmethod
    def entries_of(cls, positions, values, shape, options):
        return _row_entries(positions, shape[1]), values["delta"].reshape(-1)

    @classmethod
    def entries_per_position(cls, shape, options) -> int:
        return shape[1]

    @classmethod
    def from_entries(cls, where, count, shape, flat, values):
        width = shape[1]
        grid = flat.view(count, width)
        rows = torch.div(grid[:, 0], width, rounding_mode="floor")
        if not torch.equal(grid, rows[:, None] * width + torch.arange(width)):
            raise ValueError(f"{where}: the entries of a rows layer must be whole rows in order")
        return rows, {"delta": values.view(count, width)}

    def adapter_payload(self) -> AdapterPayload:
        rows = self.rows
        wide = rows.numel() > 0 and int(rows.max()) >= 2**31  # never for a real weight; kept exact
        positions = rows.long() if wide else rows.to(torch.int32)
        fields = {"count": int(rows.numel()), "index": None}
        return AdapterPayload({"delta": self.delta.detach()}, {"rows": positions}, fields, rows)

    @classmethod
    def read_adapter_payload(cls, where, name, entry, tensors, shape):
        count = entry["count"]
        parts = take_tensors(where, name, tensors, ("rows", "delta"))
        expect_tensor(f"{name}.delta", parts["delta"], VALUE_DTYPES, (count, shape[1]))
        expect_tensor(f"{name}.rows", parts["rows"], (torch.int32, torch.int64), (count,))
        return parts["rows"], {"delta": parts["delta"]}, {}, {f"{name}.rows", f"{name}.delta"}

    @classmethod
    def config_for(cls, layers: list) -> dict:
        return {"method": "spruft", "num_params": trainable_count(layers)}

    @classmethod
    def sum_stored(cls, parts: list):
        """Whole rows everywhere: the union of the rows, summed (fp64, rounded once)."""
        return sum_by_position(parts)


def _row_entries(rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """The flat entries of whole rows, row-major (sorted when the rows are)."""
    rows = rows.long()
    return (rows[:, None] * in_features + torch.arange(in_features, device=rows.device)).reshape(-1)


def sum_by_position(parts: list) -> StoredLayer:
    """``Σ w · part`` of ``[(StoredLayer, w)]`` of one kind whose positions carry equal-sized value
    slices (rows, blocks of one size): the union of the positions, overlapping ones summed (fp64,
    rounded once to the first part's dtype)."""
    first = parts[0][0]
    values = first.values["delta"]
    union = torch.unique(torch.cat([stored.positions for stored, _ in parts]))
    acc = torch.zeros(union.numel(), *values.shape[1:], dtype=torch.float64, device=union.device)
    for stored, weight in parts:
        acc.index_add_(0, torch.searchsorted(union, stored.positions), stored.values["delta"].to(torch.float64) * weight)
    return first.replace(positions=union, values={"delta": acc.to(values.dtype)}, fingerprint=None)
