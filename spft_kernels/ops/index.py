"""The sparse index format (``docs/architecture.md``, "Index format").

Canonical form: 1-D sorted unique flat positions ``row * in_features + col``, int32 when
``out * in < 2**31`` else int64, on the weight's device. Validation happens once, here, when an
index is built or loaded; kernels then trust it. Layers store it as CSR with 16-bit columns, 2
bytes an entry (csr_index.py): the form the library's sparse products read, so a training step
gets its index with one cast; a :class:`SparseIndex` on that form expands the canonical one only
when something reads it (merge, the state dict, the custom kernels). Derived forms for the
custom kernels (cuda, triton; opt-in) are built lazily, the first time an op that reads them
runs, and then cached (on the layer as non-persistent buffers):

- ``row_ptr`` [out + 1]: CSR row pointers into the canonical order (the stored ``crow``);
- ``col_ptr`` [in + 1] and ``csc_perm`` [nnz]: the CSC view used by the kernels of ``dy @ Δ``;
  ``csc_perm[j]`` is the canonical position of the j-th entry in column-major order;
- ``tile_ptr`` [out, ceil(in / TILE_K) + 1], only at densities where the tensor-core SDDMM runs:
  where each row's entries of every TILE_K-column range start (see :func:`tile_pointers`).

The default path reads none of the kernel forms: built eagerly they would cost 4-8 bytes per
trainable entry (0.98 GiB at SpaRTA rank 64 on Llama-2-7B), as much as the index itself.
No per-entry row array is kept: it would cost 4 bytes per trainable parameter, as much as the
fp32 value itself.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ._guards import as_float, as_int, describe, outside_inference_mode
from .csr_index import CsrIndex

INT32_LIMIT = 2**31
# Column granularity of ``tile_ptr``; the tensor-core SDDMM's BLOCK_K is a multiple of it.
TILE_K = 64
# The tensor-core SDDMM (and its tile_ptr: 4 bytes per TILE_K weight entries) from this density
# up. Provisional: the crossover with the gather-dot SDDMM is still to be measured on a GPU.
TILE_SDDMM_MIN_DENSITY = 0.02
# A weight of at most this many entries keeps its expanded flat positions for its owner's own
# writes (the merged mode's re-sync after every optimizer step, merge, unmerge): expanding them
# is 4 ops (the columns' cast, ``arange``, ``searchsorted``, an add), ~10 µs of a 64x64 layer's
# ~160 µs step on the development CPU, where LoRA's whole step is ~110 µs. It costs 4 bytes an
# entry, at most 1 MiB a layer, only on layers whose weight is itself at most 1 MiB (fp32);
# no layer of a 7B-class model is that small (4096x4096 = 2^24), so their memory is as before.
KEPT_FLAT_MAX_ENTRIES = 1 << 18


def index_dtype_for(out_features: int, in_features: int) -> torch.dtype:
    """int32 when every flat position fits, else int64."""
    return torch.int32 if out_features * in_features < INT32_LIMIT else torch.int64


# The derived forms, in the order ``SparseIndex`` takes them.
DERIVED = ("row_ptr", "col_ptr", "csc_perm", "tile_ptr")


class SparseIndex:
    """A validated canonical index and its derived CSR/CSC/tile metadata, each built on first
    access and kept (``cached()`` says which exist). Build with :meth:`build` (validates) or
    :meth:`from_canonical` (trusts). ``on_build(name, tensor)`` is told about each derived tensor
    when it is built, so that a layer can keep it across calls."""

    def __init__(
        self,
        flat: Optional[torch.Tensor],
        out_features: int,
        in_features: int,
        *,
        csr: Optional[CsrIndex] = None,
        tile_metadata: Optional[bool] = None,
        on_build: Optional[Callable[[str, torch.Tensor], None]] = None,
        **derived: Optional[torch.Tensor],
    ) -> None:
        unknown = set(derived) - set(DERIVED)
        if unknown:
            raise TypeError(f"SparseIndex: unknown derived forms {sorted(unknown)}")
        if (flat is None) == (csr is None):
            raise TypeError("SparseIndex: give the canonical flat index or its CSR form, exactly one")
        self._flat = flat
        self._csr = csr
        self._kept_flat: Optional[torch.Tensor] = None
        self.out_features = out_features
        self.in_features = in_features
        total = out_features * in_features
        if tile_metadata is None:
            tile_metadata = total > 0 and self.nnz / total >= TILE_SDDMM_MIN_DENSITY
        self.tile_metadata = bool(tile_metadata)
        self._derived = {name: tensor for name, tensor in derived.items() if tensor is not None}
        self._on_build = on_build
        # What an op decided from this index, by the op's key (``index_form_for``): an index
        # never changes, and a layer keeps its SparseIndex per index change.
        self.decided: dict = {}

    @property
    def flat(self) -> torch.Tensor:
        """The canonical flat positions; from the stored CSR form, expanded on each read (O(nnz),
        4 ops, no host sync) and never kept: a layer keeps its SparseIndex between steps, and a
        kept expansion would cost 4 bytes an entry, twice the stored index."""
        if self._flat is None:
            return self._csr.flat(index_dtype_for(self.out_features, self.in_features))
        return self._flat

    def kept_flat(self) -> Optional[torch.Tensor]:
        """The flat positions of a weight of at most ``KEPT_FLAT_MAX_ENTRIES`` entries, expanded
        once and kept, for the owner's own reads and writes and its ops (merge, re-sync, the
        small-step gradient); None for a larger weight. Never handed to users: ``flat`` stays a
        new tensor on every read, which a caller may write into."""
        if self._flat is not None:
            return self._flat
        if self.out_features * self.in_features > KEPT_FLAT_MAX_ENTRIES:
            return None
        if torch.compiler.is_compiling():
            return self.flat  # (a traced graph keeps nothing)
        if self._kept_flat is None:
            with outside_inference_mode():  # long-lived: a later training step saves it for backward
                self._kept_flat = self.flat
        return self._kept_flat

    def flat_for_owner(self) -> torch.Tensor:
        """:meth:`kept_flat`, or for a larger weight the expansion :attr:`flat` makes."""
        kept = self.kept_flat()
        return self.flat if kept is None else kept

    def csr(self) -> CsrIndex:
        """The CSR form with 16-bit columns, 2 bytes an entry: what layers store and what the
        default path's ops read (csr_index.py); built from the flat index once and kept."""
        if self._csr is None:
            self._csr = CsrIndex.from_flat(self._flat, self.out_features, self.in_features)
        return self._csr

    @property
    def nnz(self) -> int:
        if self._csr is not None:
            return self._csr.nnz
        return self._flat.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    @classmethod
    def build(
        cls,
        index: torch.Tensor,
        out_features: int,
        in_features: int,
        *,
        device: Optional[torch.device] = None,
        name: str = "sparse index",
        tile_metadata: Optional[bool] = None,
    ) -> tuple["SparseIndex", Optional[torch.Tensor]]:
        """Validate ``index``; the metadata is derived when first read.

        Returns ``(sparse_index, order)``: ``order`` is ``None`` when ``index`` was already sorted,
        else the permutation that sorts it (apply it to the values: ``values[order]``).
        Raises ``ValueError`` naming ``name`` and the problem for a wrong type, dtype, rank or
        device, positions out of range and duplicates.
        """
        flat, order = canonical_flat_index(index, out_features, in_features, device=device, name=name)
        return cls.from_canonical(flat, out_features, in_features, tile_metadata=tile_metadata), order

    @classmethod
    def from_canonical(
        cls, flat: torch.Tensor, out_features: int, in_features: int, *, tile_metadata: Optional[bool] = None
    ) -> "SparseIndex":
        """An already validated canonical index. ``tile_metadata``: whether ``tile_ptr`` exists
        (None: when the density reaches ``TILE_SDDMM_MIN_DENSITY``)."""
        return cls(flat, out_features, in_features, tile_metadata=tile_metadata)

    # --- the derived forms, built on first access ------------------------------------------

    def cached(self) -> dict[str, torch.Tensor]:
        """The derived tensors built so far, by name."""
        return dict(self._derived)

    def _get(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        tensor = self._derived.get(name)
        if tensor is None:
            tensor = self._derived[name] = make()
            if self._on_build is not None:
                self._on_build(name, tensor)
        return tensor

    @property
    def _pointer_dtype(self) -> torch.dtype:
        return torch.int32 if self.nnz < INT32_LIMIT else torch.int64

    @property
    def row_ptr(self) -> torch.Tensor:
        return self._get("row_ptr", lambda: self.csr().crow)  # the same tensor: no bytes added

    @property
    def col_ptr(self) -> torch.Tensor:
        return self._get("col_ptr", lambda: _pointers(self.rows_and_cols()[1], self.in_features, self._pointer_dtype))

    @property
    def csc_perm(self) -> torch.Tensor:
        # Stable: within a column, entries stay in row order.
        return self._get(
            "csc_perm", lambda: torch.argsort(self.rows_and_cols()[1], stable=True).to(self._pointer_dtype)
        )

    @property
    def tile_ptr(self) -> Optional[torch.Tensor]:
        if not self.tile_metadata:
            return None
        return self._get("tile_ptr", lambda: tile_pointers(self.flat, self.out_features, self.in_features))

    def rows_and_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry row and column as int64 (computed, O(nnz); not cached, see the module docstring)."""
        wide = self.flat.long()
        rows = torch.div(wide, self.in_features, rounding_mode="floor")
        return rows, wide - rows * self.in_features

    def to(self, device: torch.device) -> "SparseIndex":
        # One form moves: the CSR one where it exists (an expanded flat is only a cache).
        csr = None if self._csr is None else CsrIndex(
            self._csr.crow.to(device), self._csr.col_bytes.to(device), self.out_features, self.in_features
        )
        flat = None if csr is not None else self._flat.to(device)
        return SparseIndex(
            flat, self.out_features, self.in_features, csr=csr, tile_metadata=self.tile_metadata,
            **{name: tensor.to(device) for name, tensor in self._derived.items()},
        )

    def __repr__(self) -> str:
        return (
            f"SparseIndex(shape={self.shape}, nnz={self.nnz}, dtype={index_dtype_for(*self.shape)}, "
            f"stored_csr={self._csr is not None}, "
            f"derived={sorted(self._derived)})"
        )


def tile_pointers(flat: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``tile_ptr[n, t]``: the canonical position of the first entry of row n at column
    ``>= t * TILE_K`` ([out, ceil(in / TILE_K) + 1], so ``tile_ptr[n, -1]`` ends the row). The
    entries of row n inside any column range aligned to TILE_K are then one contiguous run, which
    lets the tensor-core SDDMM find each tile's entries without a dense mask."""
    tiles = -(-in_features // TILE_K)
    starts = torch.clamp(torch.arange(tiles + 1, device=flat.device) * TILE_K, max=in_features)
    bounds = torch.arange(out_features, device=flat.device).unsqueeze(1) * in_features + starts
    dtype = torch.int32 if flat.numel() < INT32_LIMIT else torch.int64
    return torch.searchsorted(flat.long(), bounds).to(dtype)


def _pointers(keys: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(keys, minlength=length)
    pointers = torch.zeros(length + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, dim=0, out=pointers[1:])
    return pointers.to(dtype)


def canonical_flat_index(
    index,
    out_features: int,
    in_features: int,
    *,
    device: Optional[torch.device] = None,
    name: str = "sparse index",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate and canonicalise a flat index; returns ``(sorted_index, order_or_None)``."""
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{name}: index must be a torch.Tensor of flat positions, got {type(index).__name__}")
    if index.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(
            f"{name}: index must have an integer dtype (int32 or int64 preferred), got {index.dtype}"
        )
    if index.dim() != 1:
        raise ValueError(
            f"{name}: index must be 1-D flat positions (row * in_features + col), got shape "
            f"{tuple(index.shape)}"
        )
    if device is not None and index.device != torch.device(device):
        raise ValueError(
            f"{name}: index is on {index.device} but the weight is on {torch.device(device)}; "
            f"move it with index.to(weight.device)"
        )
    if index.device.type == "meta" and index.numel():  # an empty index has no values to lack
        raise ValueError(f"{name}: index is on the meta device (it has no values); positions must be real tensors")
    if index.is_inference():  # kept by layers and saved for backward: a normal tensor (ops/_guards.py)
        with outside_inference_mode():
            index = index.clone()
    total = out_features * in_features
    target_dtype = index_dtype_for(out_features, in_features)
    if index.numel() == 0:
        return index.to(target_dtype), None
    wide = index.long()
    low, high = int(wide.min()), int(wide.max())  # the one host sync, at build time
    if low < 0 or high >= total:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name}: index out of range: position {bad} is not in [0, {total}) for a weight of shape "
            f"({out_features}, {in_features})"
        )
    order = None
    if wide.numel() > 1 and not bool((wide[1:] >= wide[:-1]).all()):
        wide, order = torch.sort(wide, stable=True)
    if wide.numel() > 1:
        repeated = wide[1:] == wide[:-1]
        if bool(repeated.any()):
            position = int(wide[1:][repeated][0])
            raise ValueError(
                f"{name}: index has duplicate positions, e.g. {position} (row {position // in_features}, "
                f"col {position % in_features}); each weight entry may appear once"
            )
    return wide.to(target_dtype), order


def random_index(
    out_features: int,
    in_features: int,
    density: float,
    generator: Optional[torch.Generator] = None,
    *,
    device=None,
) -> torch.Tensor:
    """SpaRTA's mask: ``round(density * out * in)`` distinct uniformly random positions, sorted,
    in the canonical dtype.

    Sampling never materialises an ``out * in`` permutation (8 bytes per weight entry): it draws
    positions with replacement, deduplicates and tops up, then keeps a uniformly random subset of
    the exact size. Every step treats all positions alike, so every subset is equally likely.
    """
    sizes = as_int(out_features), as_int(in_features)
    if None in sizes or min(sizes) < 0:
        raise ValueError(
            f"random_index: sizes must be non-negative integers, got out_features={describe(out_features)}, "
            f"in_features={describe(in_features)}"
        )
    out_features, in_features = sizes
    value = as_float(density)
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"random_index: density must be in [0, 1], got {describe(density)}")
    density = value
    total = out_features * in_features
    count = min(total, int(round(density * total)))
    dtype = index_dtype_for(out_features, in_features)
    if count > total // 2:
        keep = torch.ones(total, dtype=torch.bool)
        keep[_distinct_uniform(total, total - count, generator)] = False
        chosen = keep.nonzero().squeeze(1)
    else:
        chosen = _distinct_uniform(total, count, generator)
    return chosen.to(dtype=dtype, device=device)


def _distinct_uniform(total: int, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``count`` distinct positions in [0, total), sorted, uniformly at random (count <= total / 2)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:
        # count <= total/2, so each draw is new with probability >= 1/2; 10% headroom makes one
        # round enough almost always.
        need = count - chosen.numel()
        draws = torch.randint(0, total, (need + need // 10 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draws]))
    if chosen.numel() > count:
        keep = torch.randperm(chosen.numel(), generator=generator)[:count]
        chosen = chosen[keep.sort().values]
    return chosen


def canonical_rows(
    rows,
    out_features: int,
    *,
    device: Optional[torch.device] = None,
    name: str = "rows",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate SPruFT's row selection and bring it to canonical form: 1-D sorted unique int64 row
    numbers in ``[0, out_features)``. Returns ``(sorted_rows, order_or_None)``; ``order`` sorts the
    rows' values too (``delta_rows[order]``). Raises ``ValueError`` naming ``name`` and the problem."""
    return canonical_ids(rows, out_features, device=device, name=name)


def canonical_ids(
    ids,
    limit: int,
    *,
    device: Optional[torch.device] = None,
    name: str = "rows",
    plural: str = "rows",
    singular: str = "row",
    meaning: str = "output-row numbers",
    range_detail: str = "",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate unique integer ids in ``[0, limit)`` (rows, blocks) and bring them to canonical form,
    1-D sorted unique int64; returns ``(sorted_ids, order_or_None)``. Messages name ``name`` and
    call the ids ``plural`` / ``singular`` (``meaning``: what they are; ``range_detail``: appended
    to the out-of-range message)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: {plural} must be a torch.Tensor of {meaning}, got {type(ids).__name__}")
    if ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"{name}: {plural} must have an integer dtype (int64 preferred), got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name}: {plural} must be 1-D {meaning}, got shape {tuple(ids.shape)}")
    if device is not None and ids.device != torch.device(device):
        raise ValueError(
            f"{name}: {plural} are on {ids.device} but the weight is on {torch.device(device)}; "
            f"move them with {plural}.to(weight.device)"
        )
    if ids.device.type == "meta" and ids.numel():  # empty: no values to lack
        raise ValueError(f"{name}: {plural} are on the meta device (they have no values); {plural} must be real tensors")
    if ids.is_inference():  # kept by layers and saved for backward: a normal tensor (ops/_guards.py)
        with outside_inference_mode():
            ids = ids.clone()
    wide = ids.long()
    if wide.numel() == 0:
        return wide, None
    low, high = int(wide.min()), int(wide.max())  # the one host sync, at build time
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: {singular} {bad} is out of range [0, {limit}){range_detail}")
    order = None
    if wide.numel() > 1 and not bool((wide[1:] > wide[:-1]).all()):
        wide, order = torch.sort(wide, stable=True)
        repeated = wide[1:] == wide[:-1]
        if bool(repeated.any()):
            raise ValueError(
                f"{name}: {plural} has duplicates, e.g. {singular} {int(wide[1:][repeated][0])}; each {singular} may "
                "appear once"
            )
    return wide, order
