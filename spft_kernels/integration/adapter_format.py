"""The adapter file format (safetensors): what ``save_adapter`` writes and ``read_adapter`` checks
(``adapter_save.py``, ``adapter_read.py``; loading and merging in ``adapter_load.py``, ``adapter_merge.py``).

File format (version 1): a safetensors file whose tensors are, for every spft layer ``<name>``
(its qualified module name):

- ``<name>.delta``: the trained values, ``[nnz]`` (entries) or ``[R, in]`` (rows), in the delta's
  dtype (fp32) or the ``dtype`` given to ``save_adapter`` (bf16: 2 bytes a value);
- the positions, sorted: ``<name>.rows`` (int32 output rows) for a RowSparseLinear; for a
  SparseDeltaLinear either ``<name>.index`` (the canonical flat positions ``row * in + col``,
  int32, or int64 for a weight of 2**31 entries or more) or, when smaller, the split form
  ``<name>.index_low16`` (uint16: ``flat % 65536``) + ``<name>.index_high_counts`` (int32, one
  count per block of 65536 flat positions): 2 bytes an entry plus 4 bytes per 65536 weight
  entries, against 4 (or 8) for the flat form. The writer picks the smaller form per layer.

for a BlockSparseLinear ``<name>.delta`` ``[nb, bh, bw]`` and ``<name>.blocks`` (int32 sorted block
ids ``block_row * ceil(in / bw) + block_col``; int64 past 2**31 blocks); and, for a PSTLinear, ``<name>.U``, ``.V``, ``.A``, ``.B``, ``.R``, ``.C`` (its trained factors, in
their fp32 masters or ``dtype``); and, for every module in ``modules_to_save``, its state dict as
``<module>.<key>``.

Metadata (safetensors' string map):

- ``format`` = ``"spft_adapter"``, ``format_version`` = ``"1"``;
- ``config``: the ``SpftConfig`` as JSON;
- ``layers``: JSON ``{name: {"kind": "entries"|"rows"|"blocks"|"pst", "shape": [out, in], "count": nnz,
  R or nb (pst: the trainable count (out + in)(r1 + r2 + 1)), "index": "flat"|"split16"|null,
  "weight_dtype": "float32", "fingerprint": sha256 hex}}``; a ``blocks`` layer adds
  ``"block_size": [bh, bw]``; a ``pst`` layer adds ``"pst": {"r1",
  "r2", "sparsity" (the layer's current one), "beta", "alpha1", "alpha2", "abs_score_grad"}``;
- ``saved_modules``: JSON ``{module: [state dict keys]}``;
- ``checksum``: sha256 over every other metadata entry and every tensor (name, dtype, shape,
  bytes), so that a truncated file, a flipped byte or an edited entry is reported instead of
  loaded. It detects corruption and accidental edits; it is not a signature.

Base-weight fingerprint (per layer): sha256 of the weight's shape and dtype, of W0 at 256 fixed
pseudo-random positions spread over the whole matrix (the same for every file of that shape), and
of W0 at every position the adapter trains (its entries, its whole rows, or its blocks' live
entries; none for a PST
layer, whose mask depends on all of W0: only the sample guards it). Values are hashed
bitwise in the weight's dtype. W0 at the trained positions is what the adapter's deltas are added
to, so a base that differs there (or anywhere in the sample) is refused; a base of another dtype
is refused too (load onto the dtype the adapter was trained on and cast afterwards, or pass
``check_base=False``). The fingerprint is always taken on W0: a merged layer's weight holds
W0 + Δ at its positions, so there W0 comes from the values the layer keeps aside (O(nnz), never
a copy of the weight).

Sizes: fp32 values + split index = 6 bytes per trainable entry, bf16 values + split index =
4 bytes, plus 4 bytes per 65536 weight entries and the header (~570 bytes a layer). Measured on
one 4096 x 4096 layer at 1% density: bf16 4.01, fp32 6.01 bytes per trainable parameter (0.1%:
bf16 4.12). Rows cost 2 (bf16) or 4 (fp32) bytes a value.

Loading is all-or-nothing: the whole file is read and checked (integrity, format, config, layer
names, shapes, dtypes, position validity with ``SparseIndex.build`` / ``canonical_rows``,
fingerprints) before the model is touched, so any failure leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Union

import torch
import torch.nn as nn

from ..nn.block_sparse_linear import BlockSparseLinear
from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from ..ops.block_index import block_entries
from ..ops.compact_index import BLOCK, block_count, compact_index, expand_index
from .surgery import saved_module_names, SPFT_LAYER_TYPES

FORMAT = "spft_adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "spft_adapter.safetensors"  # the file name used when a directory is given
SAMPLE_POSITIONS = 256
_KINDS = {"entries": SparseDeltaLinear, "rows": RowSparseLinear, "pst": PSTLinear, "blocks": BlockSparseLinear}
_PST_FACTORS = ("U", "V", "A", "B", "R", "C")
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

PathLike = Union[str, bytes, os.PathLike]


# --- fingerprints ------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _sample_positions(out_features: int, in_features: int) -> torch.Tensor:
    """256 fixed flat positions spread over the weight (a Weyl sequence: no RNG, so every version
    and device draws the same ones)."""
    total = out_features * in_features
    count = min(SAMPLE_POSITIONS, total)
    return torch.tensor([(k * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % total for k in range(count)], dtype=torch.int64)


def _w0_entries(
    module: nn.Linear, flat: torch.Tensor, weight: Optional[torch.Tensor] = None, *, original: bool = False
) -> torch.Tensor:
    """W0 at the flat positions (any weight layout); a merged spft layer's own positions read the
    W0 values it keeps aside. ``weight``: the module's weight as a plain tensor (default: its own).
    ``original``: where a dynamic mask folded trained values into W0, the W0 the layer was built
    on (``SparseDeltaLinear.original_w0``) instead of the folded one."""
    weight = (module.weight if weight is None else weight).detach()
    flat = flat.to(weight.device, torch.int64)
    rows = torch.div(flat, module.in_features, rounding_mode="floor")
    cols = flat - rows * module.in_features
    values = weight[rows, cols]
    if isinstance(module, SPFT_LAYER_TYPES) and getattr(module, "merged", False) and flat.numel():
        aside = module._w0_at_index
        if isinstance(module, BlockSparseLinear):
            merged_flat, merged_w0 = _merged_block_entries(module)
            hit, where = _lookup(merged_flat, flat)
            values[hit] = merged_w0[where[hit]]
        elif isinstance(module, SparseDeltaLinear):
            hit, where = _lookup(module.index.long(), flat)
            values[hit] = aside[where[hit]]
        else:
            hit, where = _lookup(module.rows, rows)
            values[hit] = aside[where[hit], cols[hit]]
    folded = module.original_w0() if original and isinstance(module, SparseDeltaLinear) else None
    if folded is not None and flat.numel():
        hit, where = _lookup(folded[0], flat)
        values[hit] = folded[1][where[hit]]
    return values


def _w0_rows(module: nn.Linear, rows: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W0 at whole output rows [R, in] (any weight layout), merged layers as in ``_w0_entries``."""
    weight = (module.weight if weight is None else weight).detach()
    rows = rows.to(weight.device, torch.int64)
    values = weight.index_select(0, rows)
    if isinstance(module, SPFT_LAYER_TYPES) and getattr(module, "merged", False) and rows.numel():
        aside = module._w0_at_index
        if isinstance(module, RowSparseLinear):
            hit, where = _lookup(module.rows, rows)
            values[hit] = aside[where[hit]]
        elif isinstance(module, BlockSparseLinear):
            merged_flat, merged_w0 = _merged_block_entries(module)
            entry_rows = torch.div(merged_flat, module.in_features, rounding_mode="floor")
            hit, where = _lookup(rows, entry_rows)  # which merged entries fall in the asked rows
            values[where[hit], (merged_flat - entry_rows * module.in_features)[hit]] = merged_w0[hit]
        else:
            index = module.index.long()
            entry_rows = torch.div(index, module.in_features, rounding_mode="floor")
            hit, where = _lookup(rows, entry_rows)  # which merged entries fall in the asked rows
            values[where[hit], (index - entry_rows * module.in_features)[hit]] = aside[hit]
    return values


def _merged_block_entries(module: BlockSparseLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged block layer's live entries as sorted flat positions with the W0 values it keeps aside."""
    flat, where = block_entries(module.blocks, (module.out_features, module.in_features), module.block_size)
    order = torch.argsort(flat)
    return flat[order], module._w0_at_index.reshape(-1)[where[order]]


def _lookup(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hit, where)``: whether each query is in the sorted unique keys, and at which position."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(queries, dtype=torch.bool), torch.zeros_like(queries)
    where = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[where] == queries, where


def fingerprint(
    module: nn.Linear, kind: str, positions: torch.Tensor, block_size: Optional[tuple] = None, *, original: bool = False
) -> str:
    """The base-weight fingerprint of an adapter layer (module docstring): sha256 hex
    (``block_size``: for kind ``blocks``, whose positions are block ids). ``original``: of the base
    the layer was built on, before any dynamic-mask fold (saving); loading checks the model's weight
    as it is."""
    digest = hashlib.sha256()
    weight = _full(module.weight)
    digest.update(f"{module.out_features}x{module.in_features}:{_dtype_name(weight.dtype)}".encode())
    sample = _sample_positions(module.out_features, module.in_features)
    digest.update(_tensor_bytes(_w0_entries(module, sample, weight, original=original)))
    if kind == "pst":
        trained = weight.new_empty(0)
    elif kind == "entries":
        trained = _w0_entries(module, positions, weight, original=original)
    elif kind == "blocks":
        trained = _w0_entries(module, block_entries(positions, (module.out_features, module.in_features), block_size)[0],
                              weight, original=original)
    else:
        trained = _w0_rows(module, positions, weight)
    digest.update(_tensor_bytes(trained))
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP2's sharded parameters) is gathered, which is a collective,
    so under FSDP2 every rank must call save_adapter; a weight is then gathered whole, one layer at
    a time, for its fingerprint."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


# --- checksum ----------------------------------------------------------------------------------


def _checksum(metadata: dict, tensors: dict) -> str:
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in sorted(metadata):
        if key != "checksum":
            put(key.encode())
            put(metadata[key].encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        put(key.encode())
        put(f"{_dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
        put(_tensor_bytes(tensor))
    return digest.hexdigest()


# --- index encoding ----------------------------------------------------------------------------


def _encode_index(index: torch.Tensor, out_features: int, in_features: int) -> tuple[str, dict]:
    """The smaller of the flat and split16 forms (module docstring) of a canonical index."""
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
        _expect(where + ".index", index, (torch.int32, torch.int64), (count,))
        return index
    low, counts = parts["index_low16"], parts["index_high_counts"]
    blocks = -(-total // BLOCK)
    _expect(where + ".index_low16", low, (torch.uint16,), (count,))
    _expect(where + ".index_high_counts", counts, (torch.int32,), (blocks,))
    if bool((counts < 0).any()) or int(counts.long().sum()) != count:
        raise ValueError(f"{where}.index_high_counts: the block counts must be non-negative and sum to {count}")
    return expand_index(low.view(torch.uint8), torch.cumsum(counts.long(), 0), torch.int64)


def _expect(key: str, tensor: torch.Tensor, dtypes: tuple, shape: tuple) -> None:
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        raise ValueError(
            f"adapter tensor {key!r} must be {'/'.join(_dtype_name(d) for d in dtypes)} of shape {shape}, got "
            f"{_dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        )


def saved_module_tensors(root: nn.Module, patterns, tensors: dict, prefix: str = "") -> dict:
    """Put the state of every ``modules_to_save`` module into ``tensors`` as
    ``<prefix><module>.<key>`` (CPU copies); returns ``{module: sorted state dict keys}``."""
    saved = {}
    for module_name in saved_module_names(root, patterns):
        state = root.get_submodule(module_name).state_dict()
        saved[module_name] = sorted(state)
        for key, tensor in state.items():
            tensors[f"{prefix}{module_name}.{key}"] = _full(tensor).detach().cpu().contiguous().clone()
    return saved


def fs_path(path: PathLike) -> str:
    """``path`` as a ``str`` (``bytes`` and ``os.PathLike`` decoded as ``os.fsdecode`` does), so
    that messages and derived names (temporary files) never show ``b'...'``."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ValueError(f"adapter path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _resolve_path(path: PathLike) -> str:
    """A ``str`` path (``fs_path``); a directory gets the default file name."""
    path = fs_path(path)
    return os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path


def cast_values(layer: str, label: str, values: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``values`` in the file's dtype, on the CPU; a finite value that the cast would turn into
    ±inf (|Δ| > 65504 in float16) is a ValueError naming it, not a silent inf."""
    cast = values.to(dtype or values.dtype)
    if dtype is not None and cast.dtype != values.dtype and values.numel():
        overflow = torch.isfinite(values) & ~torch.isfinite(cast)
        if bool(overflow.any()):
            where = int(torch.nonzero(overflow.reshape(-1))[0])
            value = float(values.reshape(-1)[where])
            raise ValueError(
                f"save_adapter: layer {layer!r}: {label}[{where}] = {value:.6g} does not fit {_dtype_name(dtype)} "
                f"(largest finite {torch.finfo(dtype).max:.6g}); save with dtype=torch.bfloat16 or torch.float32 "
                "(default), nothing was written"
            )
    return cast.cpu().contiguous()
