"""``SparseDeltaLinear``, the ``entries`` kind: a frozen W0 plus trainable scattered entries
(SPEFT, SpaRTA). The modes and the state dict are every delta kind's (``delta_layer.py``); this
file owns what is particular to entries: the index's validation and 2-byte stored form, W0 at
the entries, the adapter encoding (flat or split16), the SHiRA form (entries as they are), the
selection hook and the sum of several adapters (union of entries)."""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..ops._guards import builds_state
from ..ops.compact_index import BLOCK, block_count, compact_index, expand_index
from ..ops.csr_index import CsrIndex, column_bytes
from ..ops.delta_term import masked_gradient
from ..ops.index import DERIVED, SparseIndex, index_dtype_for
from ..ops.scatter_delta import scatter_delta_
from ..ops.sparse_delta_linear import sparse_delta_linear
from .base import lookup, trainable_count
from .delta_layer import DeltaLayer
from .registry import kind_class, register_kind
from .stored import AdapterPayload, StoredLayer, expect_tensor, take_tensors, VALUE_DTYPES


# The SparseIndex the layer hands its op, kept in the instance dict (not module state: never in
# a state dict, a pickle or a traced graph's guards on buffers).
_KEPT_INDEX = "_kept_sparse_index"


def _metadata_buffer(name: str) -> str:
    return "_" + name


def _weak_keeper(layer) -> Callable:
    """``layer._keep_metadata`` without holding the layer (see ``SparseDeltaLinear.sparse_index``)."""
    method = weakref.WeakMethod(layer._keep_metadata)

    def keep(name: str, tensor: torch.Tensor) -> None:
        bound = method()
        if bound is not None:
            bound(name, tensor)

    return keep


@register_kind
class SparseDeltaLinear(DeltaLayer):
    """``y = x (W0 + Δ)ᵀ + b`` with ``Δ`` holding ``delta[k]`` at flat position ``index[k]``.

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [nnz], fp32 master, zeros at start), ``index`` ([nnz], canonical: read-only,
    expanded on each access from the 2 bytes an entry the layer stores, ops/compact_index.py;
    the state dict holds it as before). Change positions with :meth:`set_index`.
    ``SparseDeltaLinear.from_linear(linear, index, *, mode="auto", backend="auto", name=None,
    delta_dtype=torch.float32)``.
    """

    kind = "entries"
    positions_key = "index"
    unit = "entries"
    universal = True  # any trained positions can be written as entries
    shira_kind = "entries"
    dynamic_masks = True  # fold_delta
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = True  # merged positions are flat offsets into the weight
    _HAS_FUSED_MODE = True

    # --- the index --------------------------------------------------------------------------

    def set_index(self, index: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the mask: validate ``index`` (unsorted input is sorted together with ``values``),
        rebuild the cached metadata and set ``delta`` to ``values`` (zeros if None). The layer is
        unmerged first and re-merged afterwards if it was merged. ``delta`` gets new storage, so an
        optimizer holding it must be rebuilt (or its state reset)."""
        self._set_positions(index, values)

    @classmethod
    def _validate(cls, index, out_features, in_features, device, name, layer=None):
        return SparseIndex.build(index, out_features, in_features, device=device, name=name)

    def _adopt(self, sparse_index: SparseIndex) -> None:
        # Stored as CSR with 16-bit columns (2 bytes an entry instead of 4: 0.30 GiB at SpaRTA r64
        # on Llama-2-7B; ops/csr_index.py): the form the step's sparse products read, so a step
        # casts the columns once instead of expanding a flat index. The state dict still holds
        # the canonical index (_current_positions). Non-persistent buffers: they follow .to() and
        # DDP's buffer broadcast (bytes: NCCL has no 16-bit integers).
        csr = sparse_index.csr()
        self.register_buffer("_index_crow", csr.crow, persistent=False)
        self.register_buffer("_index_col_bytes", csr.col_bytes, persistent=False)
        # The derived forms (CSR/CSC pointers, tile pointers) are built when a kernel that reads
        # them first runs (SparseIndex), then kept as non-persistent buffers: they follow .to()
        # but never reach a state dict. The default (reference) path never builds them.
        for name in DERIVED:
            self._buffers.pop(_metadata_buffer(name), None)
        for name, tensor in sparse_index.cached().items():
            self._keep_metadata(name, tensor)

    def _keep_metadata(self, name: str, tensor: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():  # a traced graph must not add module state
            self.register_buffer(_metadata_buffer(name), tensor, persistent=False)

    @staticmethod
    def _positions_tensor(sparse_index: SparseIndex) -> torch.Tensor:
        return sparse_index.flat

    def _delta_shape(self, sparse_index: SparseIndex) -> tuple:
        return (sparse_index.nnz,)

    def sparse_index(self) -> SparseIndex:
        """The validated index with the derived forms built so far (no validation or rebuild:
        O(1)); a derived form read from it for the first time is built then and kept. The same
        object while the layer's stored CSR tensors are the same (once per index change, move or
        cast: building it cost ~10 µs, called twice a step), so what an op decides from it (the
        index form it reads, ``index_form_for``) is decided once too."""
        crow, col_bytes = self._buffers["_index_crow"], self._buffers["_index_col_bytes"]
        compiling = torch.compiler.is_compiling()  # a traced graph neither reads nor adds module state
        kept = None if compiling else self.__dict__.get(_KEPT_INDEX)
        if kept is not None and kept.csr().crow is crow and kept.csr().col_bytes is col_bytes:
            return kept
        cached = {name: self._buffers.get(_metadata_buffer(name)) for name in DERIVED}
        csr = CsrIndex(crow, col_bytes, self.out_features, self.in_features)
        if compiling:
            return SparseIndex(None, self.out_features, self.in_features, csr=csr, on_build=self._keep_metadata, **cached)
        # The kept index calls back through a weak reference: a bound method would make a reference
        # cycle (layer -> index -> layer), and a replaced layer caught in one would hold its weight
        # until the garbage collector ran, so the layer replacing it could not merge (observers).
        built = SparseIndex(None, self.out_features, self.in_features, csr=csr, on_build=_weak_keeper(self), **cached)
        self.__dict__[_KEPT_INDEX] = built
        return built

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop(_KEPT_INDEX, None)  # rebuilt from the buffers on first use
        return state

    @property
    def index(self) -> torch.Tensor:
        """The canonical flat positions (sorted, int32/int64), expanded on each access: O(nnz), no
        host sync. A new tensor each time: writing into it changes nothing (use set_index)."""
        return self.sparse_index().flat

    @property
    def nnz(self) -> int:
        return self._index_col_bytes.numel() // column_bytes(self.in_features)

    def _current_positions(self) -> torch.Tensor:
        # The state dict's index: canonical, as the index format (docs/architecture.md) and every earlier state dict
        # have it (4 bytes an entry while the state dict lives; the weight is never copied).
        return self.index

    # --- folding (dynamic masks) --------------------------------------------------------------

    @builds_state
    @torch.no_grad()
    def fold_delta(self) -> None:
        """``W0 ← W0 + Δ`` (fp32 sum rounded once, O(nnz)) and ``Δ ← 0``: the layer computes the
        same function with the trained values moved into its weight (SPEFT's dynamic masks fold
        before reselecting). The original W0 of every position ever folded is kept aside
        (``original_w0()``, ~10 bytes a position, in memory only), so that ``save_adapter`` still
        writes an adapter relative to the original base. Refused for a shared weight."""
        if self.weight_shared_with is not None:
            raise ValueError(
                f"{self.layer_name}: the weight is shared with {self.weight_shared_with!r}; folding the delta "
                "into it would change that module too"
            )
        if self.base_kind.weight_for_ops(self) is None:
            raise ValueError(
                f"{self.layer_name}: the base weight is quantized ({self.base_kind.name}); folding writes W0 + delta "
                "into it, which a quantized weight cannot hold (keep the delta, or merge_and_unload)"
            )
        self._refuse_while_lent("fold_delta()")
        was_merged = self._merged
        self.unmerge()
        flat = self.index.long()
        folded = self.original_w0()
        if folded is None:
            positions, values = flat, self._weight_at(flat)
        else:
            new = flat[~torch.isin(flat, folded[0])]
            positions, order = torch.sort(torch.cat([folded[0], new]))
            values = torch.cat([folded[1], self._weight_at(new)])[order]
        self.register_buffer("_folded_index", positions, persistent=False)
        self.register_buffer("_folded_w0", values, persistent=False)
        scatter_delta_(self.weight, self.index, delta=self.delta, backend=self.backend)
        self.delta.zero_()
        self.delta.grad = None
        if was_merged:
            self.merge()

    def original_w0(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(positions, values)``: the W0 the layer was built on at every flat position
        ``fold_delta`` changed (sorted int64 positions, values in the weight's dtype), or None when
        nothing was folded."""
        positions = getattr(self, "_folded_index", None)
        return None if positions is None else (positions, self._folded_w0)

    def _weight_at(self, flat: torch.Tensor) -> torch.Tensor:
        rows = torch.div(flat, self.in_features, rounding_mode="floor")
        return self.weight.detach()[rows, flat - rows * self.in_features]

    def _gather_w0(self) -> torch.Tensor:
        return self.weight.view(-1).index_select(0, self.sparse_index().flat_for_owner())

    def _write(self, weight, base, delta):
        return scatter_delta_(weight, self.sparse_index().flat_for_owner(), base=base, delta=delta, backend=self.backend)

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta_linear(
            x, self.weight, self.delta, self.sparse_index(), self.bias, backend=self.backend, mode=self._op_mode(),
        )

    def _op_mode(self) -> str:
        """What this forward computes: ``merged`` while the weight holds W0 + Δ, else the layer's
        own way (``fused`` or ``split``)."""
        if self._computes_merged():
            return "merged"
        return "fused" if self.mode == "fused" else "split"

    def _delta_gradient(self, x2d: torch.Tensor, dy2d: torch.Tensor) -> torch.Tensor:
        index = self.sparse_index()
        return masked_gradient(x2d, dy2d, index.flat, index.shape, None, self.backend)

    def _describe(self) -> str:
        total = self.in_features * self.out_features
        density = self.nnz / total if total else 0.0
        return f"nnz={self.nnz}, density={density:.4g}"

    def _kept_entries(self):
        return self.index.long(), self._w0_at_index

    def folded_w0(self):
        return self.original_w0()

    # --- the position-kind protocol ---------------------------------------------------------

    @classmethod
    def serves(cls, config) -> bool:
        return config.method in ("speft", "sparta") and config.block_size is None

    @classmethod
    def select_positions(cls, selection) -> dict:
        return selection.entries()

    @classmethod
    def flat_positions(cls, positions, shape, options) -> torch.Tensor:
        return positions

    @classmethod
    def entries_of(cls, positions, values, shape, options):
        return positions.long(), values["delta"]

    @classmethod
    def from_entries(cls, where, count, shape, flat, values):
        return flat, {"delta": values}

    def adapter_payload(self) -> AdapterPayload:
        index, values = self.index, self.delta.detach()
        if self.original_w0() is not None:
            index, values = self._relative_to_original_base(values)
        encoding, parts = _encode_index(index, self.out_features, self.in_features)
        return AdapterPayload({"delta": values}, parts, {"count": int(index.numel()), "index": encoding}, index)

    def _relative_to_original_base(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A folded layer (dynamic masks) as an adapter of its original base: the union of the
        folded and the current positions, each with ``(W0_now + Δ) - W0_original`` (fp64, rounded
        once to the delta's dtype). O(union); the weight is only read at those positions."""
        folded, _ = self.original_w0()
        index = self.index
        union = torch.unique(torch.cat([folded, index.long()]))
        now = self.w0_at(union).to(torch.float64)
        original = self.w0_at(union, original=True).to(torch.float64)
        trained = torch.zeros_like(now)
        hit, where = lookup(union, index.long())
        trained[where[hit]] = delta.to(torch.float64)
        return union.to(index.dtype), (now + trained - original).to(delta.dtype)

    @classmethod
    def read_adapter_payload(cls, where, name, entry, tensors, shape):
        encoding, count = entry.get("index"), entry["count"]
        if encoding not in ("flat", "split16"):
            raise ValueError(f"{where}: unknown index encoding {encoding!r}")
        labels = ("index",) if encoding == "flat" else ("index_low16", "index_high_counts")
        parts = take_tensors(where, name, tensors, labels + ("delta",))
        expect_tensor(f"{name}.delta", parts["delta"], VALUE_DTYPES, (count,))
        where_path = where.rsplit(": layer ", 1)[0]
        positions = _decode_index(f"{where_path}: {name}", encoding, parts, count, shape[0] * shape[1])
        return positions, {"delta": parts["delta"]}, {}, {f"{name}.{label}" for label in parts}

    @classmethod
    def sum_stored(cls, parts: list):
        return sum_as_entries(parts)

    @classmethod
    def config_for(cls, layers: list) -> dict:
        return {"method": "speft", "num_params": trainable_count(layers)}


def sum_as_entries(parts: list) -> StoredLayer:
    """``Σ w · part`` of ``[(StoredLayer, w)]`` of any kinds on one weight as scattered entries:
    the union of their entries, overlapping ones summed (fp64, rounded once to the first part's
    master dtype)."""
    first = parts[0][0]
    master = first.values[next(iter(first.values))].dtype
    flats, values = [], []
    for stored, weight in parts:
        flat, value = kind_class(stored.kind).entries_of(stored.positions, stored.values, stored.shape, stored.options)
        flats.append(flat.long())
        values.append(value.reshape(-1).to(torch.float64) * weight)
    union = torch.unique(torch.cat(flats))
    acc = torch.zeros(union.numel(), dtype=torch.float64, device=union.device)
    for flat, value in zip(flats, values):
        acc.index_add_(0, torch.searchsorted(union, flat), value)
    index = union.to(index_dtype_for(*first.shape))
    return StoredLayer(SparseDeltaLinear.kind, first.shape, first.weight_dtype, None, index, {"delta": acc.to(master)},
                       shared_with=first.shared_with)


# --- the adapter file's index encodings -------------------------------------------------------


def _encode_index(index: torch.Tensor, out_features: int, in_features: int) -> tuple[str, dict]:
    """The smaller of two forms of a canonical index: ``flat`` (``index``: the positions, int32, or
    int64 for a weight of 2**31 entries or more) or ``split16`` (``index_low16``, uint16:
    ``flat % 65536``, + ``index_high_counts``, int32, one count per block of 65536 flat positions):
    2 bytes an entry plus 4 bytes per 65536 weight entries, against 4 (or 8)."""
    blocks = block_count(out_features, in_features)
    flat_bytes = index.numel() * index.element_size()
    if 2 * index.numel() + 4 * blocks >= flat_bytes:
        return "flat", {"index": index}
    # The split the layers store (ops/compact_index.py), with per-block counts instead of ends.
    low_bytes, ends = compact_index(index, out_features, in_features)
    counts = torch.diff(ends.long(), prepend=ends.new_zeros(1, dtype=torch.int64)).to(torch.int32)
    return "split16", {"index_low16": low_bytes.view(torch.uint16), "index_high_counts": counts}


def _decode_index(where: str, encoding: str, parts: dict, count: int, total: int) -> torch.Tensor:
    if encoding == "flat":
        index = parts["index"]
        expect_tensor(where + ".index", index, (torch.int32, torch.int64), (count,))
        return index
    low, counts = parts["index_low16"], parts["index_high_counts"]
    blocks = -(-total // BLOCK)
    expect_tensor(where + ".index_low16", low, (torch.uint16,), (count,))
    expect_tensor(where + ".index_high_counts", counts, (torch.int32,), (blocks,))
    if bool((counts < 0).any()) or int(counts.long().sum()) != count:
        raise ValueError(f"{where}.index_high_counts: the block counts must be non-negative and sum to {count}")
    return expand_index(low.view(torch.uint8), torch.cumsum(counts.long(), 0), torch.int64)
