"""``BlockSparseLinear``, the ``blocks`` kind: a frozen W0 plus trainable dense blocks of the weight
("select sparsely, compute densely": S2FT / SMT style). The modes and the state dict are every
delta kind's (``delta_layer.py``); this file owns what is particular to blocks: the block size,
the block ids' validation and derived groups, W0 at the blocks, the adapter encoding (int32 ids
+ block size), the SHiRA form (live entries, which come back as scattered entries), the
selection hook and the sum of several adapters."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.block_delta_linear import block_delta_linear, block_gradient, gather_blocks, write_blocks_
from ..ops.block_index import BlockIndex, SlotGroups, block_entries, check_block_size
from .base import trainable_count
from .delta_layer import DeltaLayer
from .registry import register_kind
from .row_sparse_linear import sum_by_position
from .stored import AdapterPayload, expect_tensor, take_tensors, VALUE_DTYPES

DEFAULT_BLOCK_SIZE = (64, 64)


@register_kind
class BlockSparseLinear(DeltaLayer):
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
    ``BlockSparseLinear.from_linear(linear, blocks, *, block_size=(64, 64), mode="auto",
    backend="auto", name=None)``.
    """

    kind = "blocks"
    positions_key = "blocks"
    unit = "blocks"
    shira_kind = "entries"  # SHiRA has no blocks: they cross as their live entries
    _MERGE_NEEDS_CONTIGUOUS_WEIGHT = False  # blocks are written with 2-D indices, any layout

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: Optional[torch.Tensor] = None,
        *args,
        block_size=DEFAULT_BLOCK_SIZE,
        **kwargs,
    ) -> None:
        # bias, device, dtype and the keyword-only mode, backend, delta_dtype, name: see DeltaLayer.
        object.__setattr__(self, "block_size", check_block_size(block_size, kwargs.get("name") or "BlockSparseLinear"))
        super().__init__(in_features, out_features, blocks, *args, **kwargs)

    @classmethod
    def _check_options(cls, options: dict, layer_name: str) -> dict:
        unknown = sorted(set(options) - {"block_size"})
        if unknown:
            raise TypeError(f"BlockSparseLinear.from_linear got unexpected options {unknown}")
        return {"block_size": check_block_size(options.get("block_size", DEFAULT_BLOCK_SIZE), layer_name)}

    def options(self) -> dict:
        return {"block_size": self.block_size}

    def set_blocks(self, blocks: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the trained blocks (same block size): validate ``blocks`` (unsorted ids are sorted
        together with ``values`` [nb, bh, bw]) and set ``delta`` to ``values`` (zeros if None). The
        layer is unmerged first and re-merged afterwards if it was merged. ``delta`` gets new
        storage, so an optimizer holding it must be rebuilt (or its state reset)."""
        self._set_positions(blocks, values)

    @classmethod
    def _validate(cls, blocks, out_features, in_features, device, name, layer=None, block_size=DEFAULT_BLOCK_SIZE):
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

    def _delta_gradient(self, x2d: torch.Tensor, dy2d: torch.Tensor) -> torch.Tensor:
        return block_gradient(x2d, dy2d, self.block_index())

    def _describe(self) -> str:
        total = self.in_features * self.out_features
        density = self.trained_entries / total if total else 0.0
        bh, bw = self.block_size
        return f"blocks={self.num_blocks}, block_size=({bh}, {bw}), density={density:.4g}"

    def _kept_entries(self):
        flat, where = block_entries(self.blocks, (self.out_features, self.in_features), self.block_size)
        order = torch.argsort(flat)
        return flat[order], self._w0_at_index.reshape(-1)[where[order]]

    # --- the position-kind protocol ---------------------------------------------------------

    @classmethod
    def serves(cls, config) -> bool:
        return config.method in ("speft", "sparta") and config.block_size is not None

    @classmethod
    def options_from_config(cls, config) -> dict:
        return {"block_size": config.block_size or DEFAULT_BLOCK_SIZE}

    @classmethod
    def select_positions(cls, selection) -> dict:
        return selection.blocks(selection.config.block_size or DEFAULT_BLOCK_SIZE)

    @classmethod
    def flat_positions(cls, positions, shape, options) -> torch.Tensor:
        return block_entries(positions, shape, options["block_size"])[0]

    @classmethod
    def entries_of(cls, positions, values, shape, options):
        """The live entries (the dead entries of clipped edge blocks are not weights), sorted."""
        flat, where = block_entries(positions, shape, options["block_size"])
        order = torch.argsort(flat)
        return flat[order], values["delta"].reshape(-1)[where[order]]

    def adapter_payload(self) -> AdapterPayload:
        blocks = self.blocks
        wide = blocks.numel() > 0 and int(blocks.max()) >= 2**31  # only a grid of 2**31 blocks or more
        positions = blocks.long() if wide else blocks.to(torch.int32)
        fields = {"count": int(blocks.numel()), "index": None, "block_size": list(self.block_size)}
        return AdapterPayload({"delta": self.delta.detach()}, {"blocks": positions}, fields, blocks)

    @classmethod
    def read_adapter_payload(cls, where, name, entry, tensors, shape):
        try:
            block_size = check_block_size(tuple(entry.get("block_size") or ()), where)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: a blocks layer needs block_size [bh, bw], got {entry.get('block_size')!r}") from None
        count = entry["count"]
        parts = take_tensors(where, name, tensors, ("blocks", "delta"))
        expect_tensor(f"{name}.delta", parts["delta"], VALUE_DTYPES, (count, *block_size))
        expect_tensor(f"{name}.blocks", parts["blocks"], (torch.int32, torch.int64), (count,))
        return parts["blocks"], {"delta": parts["delta"]}, {"block_size": block_size}, {f"{name}.blocks", f"{name}.delta"}

    @classmethod
    def config_for(cls, layers: list) -> dict:
        """Blocks of one size everywhere: a blocks config (the layers carry their own sizes anyway)."""
        sizes = {layer.block_size for layer in layers}
        return {"method": "speft", "num_params": trainable_count(layers), "block_size": sizes.pop() if len(sizes) == 1 else None}

    @classmethod
    def sum_stored(cls, parts: list):
        """Blocks of one size everywhere: the union of the blocks, summed; else None (as entries)."""
        if len({tuple(stored.options["block_size"]) for stored, _ in parts}) != 1:
            return None
        return sum_by_position(parts)
