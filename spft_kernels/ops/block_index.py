"""The block index of a block-sparse delta (``docs/architecture.md``, "The math": block-structured deltas).

A weight [out, in] is cut into a grid of ``ceil(out / bh) x ceil(in / bw)`` blocks of
``block_size = (bh, bw)``; a block's id is ``block_row * ceil(in / bw) + block_col``. Canonical
form: 1-D sorted unique int64 block ids on the weight's device (one id per bh * bw trained values,
so int64 costs nothing that matters). Validation happens once, here; the ops trust it.

A shape that is not a multiple of the block has clipped edge blocks: the last block row / column
reaches past the weight. Their values outside the weight are dead: the ops never read them (the
forward masks them to zero), their gradient is exactly zero (so an optimizer leaves them at
zero), and merging never writes them.

Derived once per mask (for the split mode, where several selected blocks may add into the same
output columns of y, or of dx): for each axis, the blocks are grouped into *slots* such that no
two blocks of one slot share a block row (for y) or a block column (for dx). Adding slot after
slot with ``index_add_`` then never adds twice into one element in one call, which keeps the sum
deterministic on every device (CUDA's ``index_add_`` uses atomics). The number of slots is the
largest number of selected blocks in one block row (column): it does not grow with the tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ._guards import as_int
from .index import canonical_ids

Tensor = torch.Tensor


def check_block_size(block_size, name: str = "block_size") -> tuple[int, int]:
    """``(bh, bw)`` as Python ints from a pair of positive integers (an integer n means (n, n);
    numpy integers included)."""
    given = block_size
    if as_int(block_size) is not None:
        block_size = (block_size, block_size)
    sizes = [as_int(b) for b in block_size] if isinstance(block_size, (tuple, list)) and len(block_size) == 2 else [None]
    if any(b is None or b < 1 for b in sizes):
        raise ValueError(f"{name}: block_size must be a pair of positive ints (bh, bw), got {given!r}")
    return sizes[0], sizes[1]


def block_grid(out_features: int, in_features: int, block_size: tuple[int, int]) -> tuple[int, int]:
    """``(block rows, block columns)`` of the grid, clipped edge blocks included."""
    bh, bw = block_size
    return -(-out_features // bh), -(-in_features // bw)


@dataclasses.dataclass(frozen=True)
class SlotGroups:
    """Blocks grouped so that no two blocks of one slot add into the same block of columns.

    ``order`` [nb]: block positions (into the canonical order) sorted by slot; ``slot_ptr``:
    slot s is ``order[slot_ptr[s]:slot_ptr[s + 1]]``; ``targets`` [nu]: the distinct target block
    rows (columns), sorted; ``target_of`` [nb]: for each block (canonical order), the position of
    its target in ``targets``."""

    order: Tensor
    slot_ptr: tuple
    targets: Tensor
    target_of: Tensor

    @classmethod
    def build(cls, keys: Tensor) -> "SlotGroups":
        """From each block's target (its block row or column), canonical order."""
        nb = keys.numel()
        if nb == 0:
            empty = keys.new_empty(0)
            return cls(empty, (0,), empty, empty)
        # Rank of each block among the blocks with the same target (0 for the first, ...).
        by_key = torch.argsort(keys, stable=True)
        sorted_keys = keys[by_key]
        starts = torch.searchsorted(sorted_keys, sorted_keys)  # first position of each key's run
        rank = torch.empty_like(keys)
        rank[by_key] = torch.arange(nb, device=keys.device) - starts
        order = torch.argsort(rank * (int(keys.max()) + 1) + keys, stable=True)
        counts = torch.bincount(rank).tolist()  # host side, once per mask
        slot_ptr = [0]
        for count in counts:
            slot_ptr.append(slot_ptr[-1] + count)
        targets = torch.unique(keys)
        return cls(order, tuple(slot_ptr), targets, torch.searchsorted(targets, keys))

    def to(self, device) -> "SlotGroups":
        return dataclasses.replace(
            self, order=self.order.to(device), targets=self.targets.to(device), target_of=self.target_of.to(device)
        )


@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """A validated block selection with its derived metadata. Build with :meth:`build`."""

    blocks: Tensor
    out_features: int
    in_features: int
    block_size: tuple
    by_row: SlotGroups  # for adding x Δᵀ into y (split mode)
    by_col: SlotGroups  # for adding dy Δ into dx (split mode)
    # Each block's block row and block column [nb] (int64, 16 bytes a block of bh * bw values),
    # kept so that a step gathers with them directly instead of dividing the ids (3 ops a call).
    block_rows: Optional[Tensor] = None
    block_cols: Optional[Tensor] = None

    @property
    def num_blocks(self) -> int:
        return self.blocks.numel()

    @property
    def grid(self) -> tuple[int, int]:
        return block_grid(self.out_features, self.in_features, self.block_size)

    @property
    def clipped(self) -> bool:
        bh, bw = self.block_size
        return self.out_features % bh != 0 or self.in_features % bw != 0

    @property
    def trained_entries(self) -> int:
        """Weight entries the blocks cover (dead entries of clipped blocks excluded)."""
        rows, cols = self.rows_and_cols()
        bh, bw = self.block_size
        heights = torch.clamp(self.out_features - rows * bh, max=bh)
        widths = torch.clamp(self.in_features - cols * bw, max=bw)
        return int((heights * widths).sum())

    def rows_and_cols(self) -> tuple[Tensor, Tensor]:
        """Block row and block column of each block (O(nb); kept ones when built so)."""
        if self.block_rows is not None and self.block_cols is not None:
            return self.block_rows, self.block_cols
        columns = self.grid[1]
        rows = torch.div(self.blocks, columns, rounding_mode="floor")
        return rows, self.blocks - rows * columns

    @classmethod
    def build(
        cls,
        blocks,
        out_features: int,
        in_features: int,
        block_size,
        *,
        device: Optional[torch.device] = None,
        name: str = "blocks",
    ) -> tuple["BlockIndex", Optional[Tensor]]:
        """Validate ``blocks`` and derive the metadata. Returns ``(block_index, order)``: ``order``
        is None when ``blocks`` was sorted already, else the permutation that sorts it (apply it to
        the values: ``values[order]``). Raises ``ValueError`` naming ``name`` and the problem."""
        block_size = check_block_size(block_size, name)
        flat, order = canonical_blocks(blocks, out_features, in_features, block_size, device=device, name=name)
        return cls.from_canonical(flat, out_features, in_features, block_size), order

    @classmethod
    def from_canonical(cls, blocks: Tensor, out_features: int, in_features: int, block_size) -> "BlockIndex":
        columns = block_grid(out_features, in_features, block_size)[1]
        rows = torch.div(blocks, max(columns, 1), rounding_mode="floor")
        cols = blocks - rows * columns
        return cls(
            blocks, out_features, in_features, tuple(block_size), SlotGroups.build(rows), SlotGroups.build(cols),
            rows, cols,
        )

    def to(self, device) -> "BlockIndex":
        return dataclasses.replace(
            self, blocks=self.blocks.to(device), by_row=self.by_row.to(device), by_col=self.by_col.to(device),
            block_rows=None if self.block_rows is None else self.block_rows.to(device),
            block_cols=None if self.block_cols is None else self.block_cols.to(device),
        )


def canonical_blocks(
    blocks,
    out_features: int,
    in_features: int,
    block_size: tuple[int, int],
    *,
    device: Optional[torch.device] = None,
    name: str = "blocks",
) -> tuple[Tensor, Optional[Tensor]]:
    """Validate flat block ids and bring them to canonical form (1-D sorted unique int64); returns
    ``(sorted_blocks, order_or_None)``."""
    grid_rows, grid_cols = block_grid(out_features, in_features, block_size)
    return canonical_ids(
        blocks, grid_rows * grid_cols, device=device, name=name, plural="blocks", singular="block",
        meaning="flat block ids (block_row * ceil(in / bw) + block_col)",
        range_detail=f" for a weight of shape ({out_features}, {in_features}) in blocks of {block_size[0]}x{block_size[1]} "
        f"(a grid of {grid_rows}x{grid_cols})",
    )


def random_block_ids(
    out_features: int,
    in_features: int,
    block_size,
    count: int,
    generator: Optional[torch.Generator] = None,
    *,
    device=None,
) -> Tensor:
    """``count`` distinct uniformly random block ids of the grid, sorted (SpaRTA on blocks)."""
    grid_rows, grid_cols = block_grid(out_features, in_features, check_block_size(block_size))
    total = grid_rows * grid_cols
    if as_int(count) is None or not 0 <= as_int(count) <= total:
        raise ValueError(f"random_block_ids: count must be an int in [0, {total}], got {count!r}")
    count = as_int(count)
    chosen = torch.randperm(total, generator=generator)[:count].sort().values  # the grid is small
    return chosen.to(device=device)


def block_entries(blocks: torch.Tensor, shape: tuple, block_size: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat, where)``: the flat weight positions of the live entries of the blocks (the entries
    of clipped edge blocks that lie in the weight), in delta order, and their positions in
    ``delta.flatten()``. Per-entry indices, O(nb * bh * bw): for adapters (fingerprints, merging) and
    oracles, never in a training step."""
    if blocks.numel() == 0:  # no ranges of bh and bw: an empty layer's block size is backed by no values
        empty = torch.empty(0, dtype=torch.int64, device=blocks.device)
        return empty, empty
    out_features, in_features = shape
    bh, bw = block_size
    columns = block_grid(out_features, in_features, block_size)[1]
    rows = (blocks.long() // columns).view(-1, 1, 1) * bh + torch.arange(bh, device=blocks.device).view(1, bh, 1)
    cols = (blocks.long() % columns).view(-1, 1, 1) * bw + torch.arange(bw, device=blocks.device).view(1, 1, bw)
    rows, cols = rows.expand(-1, bh, bw).reshape(-1), cols.expand(-1, bh, bw).reshape(-1)
    live = (rows < out_features) & (cols < in_features)
    return (rows * in_features + cols)[live], torch.nonzero(live).squeeze(1)
