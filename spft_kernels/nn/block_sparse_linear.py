"""``BlockSparseLinear``: a frozen W0 plus trainable dense blocks of the weight ("select sparsely,
compute densely": S2FT / SMT style); the modes and the state dict are the base's (``base.py``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.block_delta_linear import block_delta_linear, gather_blocks, write_blocks_
from ..ops.block_index import BlockIndex, SlotGroups, check_block_size
from .base import _FrozenBaseDeltaLinear

DEFAULT_BLOCK_SIZE = (64, 64)


class BlockSparseLinear(_FrozenBaseDeltaLinear):
    """``y = x (W0 + Δ)ᵀ + b`` where Δ is zero except ``nb`` dense blocks ``delta[k]`` of
    ``block_size = (bh, bw)`` at block ids ``blocks[k] = block_row * ceil(in / bw) + block_col``.

    Attributes: ``weight`` (W0, frozen; W_eff while merged), ``bias`` (frozen), ``delta``
    (``nn.Parameter`` [nb, bh, bw], fp32 master, zeros at start), ``blocks`` (buffer [nb], sorted
    unique int64 block ids), ``block_size``. A shape that is not a multiple of the block gets
    clipped edge blocks: their entries past the weight are dead (always zero gradient, never
    merged; they count in ``delta.numel()``, see ``trained_entries``). Mode ``merged`` (what
    ``auto`` picks; any weight layout) keeps W0 at the blocks aside (nb x bh x bw values in the
    weight's dtype): forward and dx are plain GEMMs and the delta gradient is one batched GEMM over
    the selected blocks. ``split`` never touches W0 and adds the blocks' products with batched
    GEMMs too.
    """

    _POSITIONS = "blocks"
    _UNIT = "blocks"
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = False  # blocks are written with 2-D indices, any layout

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: Optional[torch.Tensor],
        *args,
        block_size=DEFAULT_BLOCK_SIZE,
        **kwargs,
    ) -> None:
        # bias, device, dtype and the keyword-only mode, backend, delta_dtype, name: see the base.
        object.__setattr__(self, "block_size", check_block_size(block_size, kwargs.get("name") or "BlockSparseLinear"))
        super().__init__(in_features, out_features, blocks, *args, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocks: torch.Tensor,
        block_size=DEFAULT_BLOCK_SIZE,
        mode: str = "auto",
        backend: str = "auto",
        name: Optional[str] = None,
        *,
        delta_dtype: torch.dtype = torch.float32,
    ) -> "BlockSparseLinear":
        """Wrap ``linear`` without copying its weight: the layer shares (and freezes) the weight and
        bias tensors and trains ``delta`` [len(blocks), bh, bw] at the given block ids (1-D integer,
        unique, in range of the ``ceil(out / bh) x ceil(in / bw)`` grid; sorted here), starting
        from zero so that it computes exactly what ``linear`` did."""
        block_size = check_block_size(block_size, name or cls.__name__)
        return cls._wrap(linear, (blocks, block_size), mode, backend, delta_dtype, name)

    def set_blocks(self, blocks: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the trained blocks (same block size): validate ``blocks`` (unsorted ids are sorted
        together with ``values`` [nb, bh, bw]) and set ``delta`` to ``values`` (zeros if None). The
        layer is unmerged first and re-merged afterwards if it was merged. ``delta`` gets new
        storage, so an optimizer holding it must be rebuilt (or its state reset)."""
        self._set_positions(blocks, values)

    @classmethod
    def _validate(cls, positions, out_features, in_features, device, name, layer=None):
        """``positions``: ``(blocks, block_size)``, or block ids alone when they come into an existing
        ``layer`` (its own block size)."""
        blocks, block_size = positions if isinstance(positions, tuple) else (positions, layer.block_size)
        return BlockIndex.build(blocks, out_features, in_features, block_size, device=device, name=name)

    def _adopt(self, block_index: BlockIndex) -> None:
        object.__setattr__(self, "block_size", block_index.block_size)
        self.register_buffer("blocks", block_index.blocks, persistent=False)  # the base writes the state dict's key
        rows, cols = block_index.rows_and_cols()
        self.register_buffer("_block_rows", rows, persistent=False)
        self.register_buffer("_block_cols", cols, persistent=False)
        # Derived once per mask; non-persistent so they follow .to() but never reach a state dict.
        for axis, groups in (("row", block_index.by_row), ("col", block_index.by_col)):
            self.register_buffer(f"_{axis}_order", groups.order, persistent=False)
            self.register_buffer(f"_{axis}_targets", groups.targets, persistent=False)
            self.register_buffer(f"_{axis}_target_of", groups.target_of, persistent=False)
            object.__setattr__(self, f"_{axis}_slot_ptr", groups.slot_ptr)

    @staticmethod
    def _positions_tensor(block_index: BlockIndex) -> torch.Tensor:
        return block_index.blocks

    def _delta_shape(self, block_index: BlockIndex) -> tuple:
        return (block_index.num_blocks, *block_index.block_size)

    def block_index(self) -> BlockIndex:
        """The cached, validated block index (no validation or rebuild: O(1))."""
        return BlockIndex(
            self.blocks, self.out_features, self.in_features, self.block_size,
            SlotGroups(self._row_order, self._row_slot_ptr, self._row_targets, self._row_target_of),
            SlotGroups(self._col_order, self._col_slot_ptr, self._col_targets, self._col_target_of),
            self._block_rows, self._block_cols,
        )

    @property
    def num_blocks(self) -> int:
        return self.blocks.numel()

    @property
    def trained_entries(self) -> int:
        """Weight entries the blocks cover: ``delta.numel()`` less the dead entries of clipped edge
        blocks."""
        return self.block_index().trained_entries

    def _gather_w0(self) -> torch.Tensor:
        return gather_blocks(self.weight, self.block_index())

    def _write(self, weight, base, delta):
        return write_blocks_(weight, self.block_index(), base=base, delta=delta)

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        return block_delta_linear(
            x, self.weight, self.delta, self.block_index(), None, self.bias, backend=self.backend, merged=self._computes_merged()
        )

    def _describe(self) -> str:
        total = self.in_features * self.out_features
        density = self.trained_entries / total if total else 0.0
        bh, bw = self.block_size
        return f"blocks={self.num_blocks}, block_size=({bh}, {bw}), density={density:.4g}"
