"""The index as a layer stores it: 2 bytes a trainable entry instead of the canonical 4.

A canonical index (sorted unique flat positions, ops/index.py) is split at 2^16: each entry keeps
its low 16 bits, and one count per 65,536-position block of the weight says where each block's
entries end. The high bits are implied by the entry's place in the sorted order, so the split is
exact and costs ``2 nnz + 4 ceil(out * in / 65536)`` bytes (the adapter file's ``split16`` form
is the same split, with per-block counts).

Why: in merged mode a trainable entry costs its fp32 value (4 B), AdamW's two moments (8 B), W0
at the position (2 B) and the index. At the step's peak (the start of backward, no gradients yet)
on Llama-2-7B at LoRA rank 64's count (159.9M entries) the int32 index was 0.60 GiB and put
SpaRTA at 0.962x LoRA's peak; 2 bytes make it 0.30 GiB (``spft-bench --memory``, README).

The low halves are kept as bytes (uint8 [2 nnz]), not int16/uint16: NCCL has no 16-bit integer
type, and DDP broadcasts every buffer. Expanding is a handful of O(nnz) ops with static shapes
(a ``searchsorted`` of the entry numbers into the block ends): no host sync, the same count of
ops for any number of tokens. The canonical form exists only while an op reads it.
"""

from __future__ import annotations

import torch

LOW_BITS = 16
BLOCK = 1 << LOW_BITS


def block_count(out_features: int, in_features: int) -> int:
    """How many 65,536-position blocks cover an out x in weight."""
    return -(-(out_features * in_features) // BLOCK)


def _ends_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 else torch.int64


def compact_index(flat: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low_bytes, block_ends)`` of a canonical flat index: ``low_bytes`` uint8 [2 nnz] (each
    entry's ``flat % 65536`` as two bytes), ``block_ends`` [blocks]: how many entries lie below
    the end of each block (int32, int64 from 2^31 entries)."""
    wide = flat.long()
    low = (wide & (BLOCK - 1)).to(torch.int32).to(torch.int16)  # values >= 2^15 wrap; expand masks them back
    bounds = (torch.arange(block_count(out_features, in_features), device=flat.device, dtype=torch.int64) + 1) * BLOCK
    ends = torch.searchsorted(wide, bounds).to(_ends_dtype(flat.numel()))
    return low.view(torch.uint8), ends


def expand_index(low_bytes: torch.Tensor, block_ends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The canonical flat index in ``dtype`` (the canonical one: ``index_dtype_for``) back from
    :func:`compact_index`'s two tensors."""
    nnz = low_bytes.numel() // 2
    if nnz == 0:
        return torch.empty(0, dtype=dtype, device=low_bytes.device)
    # In place where possible: the transients peak at 8 bytes an entry besides the result.
    entry = torch.arange(nnz, device=low_bytes.device, dtype=block_ends.dtype)
    flat = torch.searchsorted(block_ends, entry, right=True, out_int32=dtype == torch.int32)
    del entry
    low = low_bytes.view(torch.int16).to(dtype).bitwise_and_(BLOCK - 1)
    return flat.mul_(BLOCK).add_(low)
