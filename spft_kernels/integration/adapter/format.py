"""The adapter file format (safetensors): what ``save_adapter`` writes and ``read_adapter`` checks
(``save.py``, ``read.py``; loading and merging in ``load.py``, ``merge.py``). The tensors and
metadata fields of each layer are its kind's (``adapter_payload`` / ``read_adapter_payload`` of
the layer classes in ``spft_kernels/nn``); this file holds what is common: the metadata, the base
fingerprints, the checksum, the value casts and the saved modules.

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
from typing import Optional

import torch
import torch.nn as nn

from ...nn.frozen_base import base_kind_for
from ...nn.registry import is_spft_layer
from ...nn.stored import dtype_name, VALUE_DTYPES
from ..surgery import saved_module_names
from .files import ADAPTER_FILE, PathLike  # noqa: F401  (the format's names, re-exported)

FORMAT = "spft_adapter"
FORMAT_VERSION = 1
SAMPLE_POSITIONS = 256


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


def w0_at(module: nn.Linear, flat: torch.Tensor, weight: Optional[torch.Tensor] = None, *, original: bool = False):
    """W0 at flat positions of a linear or an spft layer (which knows where its weight holds
    something else now, ``SpftLayer.w0_at``). ``weight``: the module's weight as a plain tensor."""
    if is_spft_layer(module):
        return module.w0_at(flat, weight, original=original)
    return base_kind_for(module).read(module, flat, weight)


def fingerprint(module: nn.Linear, trained_flat: torch.Tensor, *, original: bool = False) -> str:
    """The base-weight fingerprint of an adapter layer (module docstring): sha256 hex of the
    weight's shape and dtype, W0 at the fixed sample and W0 at ``trained_flat`` (the kind's
    ``flat_positions``). ``original``: of the base the layer was built on, before any
    dynamic-mask fold (saving); loading checks the model's weight as it is."""
    digest = hashlib.sha256()
    weight = _full(module.weight)
    digest.update(f"{module.out_features}x{module.in_features}:{dtype_name(weight.dtype)}".encode())
    sample = _sample_positions(module.out_features, module.in_features)
    digest.update(_tensor_bytes(w0_at(module, sample, weight, original=original)))
    trained = w0_at(module, trained_flat, weight, original=original) if trained_flat.numel() else weight.new_empty(0)
    digest.update(_tensor_bytes(trained))
    return digest.hexdigest()


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
        put(f"{dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
        put(_tensor_bytes(tensor))
    return digest.hexdigest()


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


def cast_values(layer: str, label: str, values: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``values`` in the file's dtype, on the CPU. A NaN or ±inf (a diverged training step) and a
    finite value that the cast would turn into ±inf (|Δ| > 65504 in float16) are a ValueError
    naming the first one, not a file that loads into a model giving NaN."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        where = int(torch.nonzero(~finite.reshape(-1))[0])
        raise ValueError(
            f"save_adapter: layer {layer!r}: {label}[{where}] = {float(values.reshape(-1)[where])} is not finite "
            "(training diverged?); nothing was written"
        )
    cast = values.to(dtype or values.dtype)
    if dtype is not None and cast.dtype != values.dtype and values.numel():
        overflow = ~torch.isfinite(cast)
        if bool(overflow.any()):
            where = int(torch.nonzero(overflow.reshape(-1))[0])
            value = float(values.reshape(-1)[where])
            raise ValueError(
                f"save_adapter: layer {layer!r}: {label}[{where}] = {value:.6g} does not fit {dtype_name(dtype)} "
                f"(largest finite {torch.finfo(dtype).max:.6g}); save with dtype=torch.bfloat16 or torch.float32 "
                "(default), nothing was written"
            )
    return cast.cpu().contiguous()
