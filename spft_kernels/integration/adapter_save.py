"""``save_adapter``: write a converted model's adapter (deltas, positions, saved modules, config,
fingerprints, checksum) in the format of ``adapter_format.py``."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ..nn.block_sparse_linear import BlockSparseLinear
from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from .adapter_format import (
    _checksum,
    _dtype_name,
    _encode_index,
    cast_values,
    _full,
    fs_path,
    _lookup,
    _w0_entries,
    fingerprint,
    FORMAT,
    FORMAT_VERSION,
    PathLike,
    _PST_FACTORS,
    saved_module_tensors,
    _VALUE_DTYPES,
)
from .adapter_folder import (
    _replace,
    check_writable,
    CONFIG_FILE,
    PEFT_TENSORS,
    SAVE_FORMATS,
    save_target,
    write_folder_config,
)
from .config import SpftConfig
from .peft_shira import save_shira_folder
from .surgery import CONFIG_ATTR, spft_layers, unwrap_model


def _writes_files() -> bool:
    """Under torch.distributed (DDP, FSDP2) rank 0 writes; every other rank only takes part in the
    gathers."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def save_adapter(
    model: nn.Module, path: PathLike, *, dtype: Optional[torch.dtype] = None, format: str = "spft"
) -> str:
    """Write the model's adapter (every spft layer's delta and positions, the ``modules_to_save``
    and the config) to ``path``: a ``.safetensors`` path (or an existing file) gets that single
    file; any other path is a folder, like peft's, holding ``spft_adapter.safetensors`` and
    ``adapter_config.json`` (``adapter_folder.py``). Returns the tensors file's path.
    ``format="peft"`` writes peft's SHiRA folder instead (``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained``; see
    ``peft_shira.py``, which also says what SHiRA cannot express) and returns the folder.
    ``dtype`` stores the values in another precision, e.g.
    ``torch.bfloat16`` for 4 bytes per trainable entry (default: the deltas' own fp32). The file
    is written to a temporary name and renamed, so a crash never leaves a half-written adapter.
    DDP-wrapped models are unwrapped; under torch.distributed only rank 0 writes, and with FSDP2
    every rank must call it (the sharded deltas are gathered).

    Everything is checked before a file is touched: a value that does not fit ``dtype`` (|Δ| >
    65504 in float16) is a ``ValueError`` naming the layer and the value, and an existing file
    is replaced unless it is read-only (``PermissionError``). Failures to write (a missing
    directory, a full disk) are ``OSError`` subclasses; an existing file is then left as it was.
    After dynamic-mask updates (``SparseDeltaLinear.fold_delta``) the adapter is written for the
    original base: every position ever trained, with ``W_trained - W0_original`` (``format="peft"``
    refuses such a model). Paths may be ``str``, ``bytes`` or ``os.PathLike``."""
    from safetensors.torch import save_file

    if format not in SAVE_FORMATS:
        raise ValueError(f"save_adapter: format must be one of {SAVE_FORMATS}, got {format!r}")
    if dtype is not None and dtype not in _VALUE_DTYPES:
        raise ValueError(f"save_adapter: dtype must be one of {[_dtype_name(d) for d in _VALUE_DTYPES]}, got {dtype!r}")
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("save_adapter: the model has no sparse fine-tuning layers (convert it with get_spft_model)")
    config = getattr(root, CONFIG_ATTR, None)
    if config is None:
        config = _describe(layers)
    path = fs_path(path)
    if format == "peft":
        folded = [n for n, m in layers.items() if isinstance(m, SparseDeltaLinear) and m.original_w0() is not None]
        if folded:
            raise ValueError(
                f"save_adapter(format='peft'): layer {folded[0]!r} had dynamic-mask updates folded into its W0; a "
                "SHiRA folder cannot describe that relative to the original base. Save with format='spft', which "
                "writes every position ever trained relative to the original base"
            )
        if _writes_files():
            check_writable([os.path.join(path, PEFT_TENSORS), os.path.join(path, CONFIG_FILE)], path)
        return save_shira_folder(root, layers, config, path, dtype=dtype, write=_writes_files())
    target, folder = save_target(path)
    if _writes_files():  # (other ranks may not see rank 0's file system)
        check_writable([target] + ([os.path.join(folder, CONFIG_FILE)] if folder is not None else []), folder)
    tensors, entries = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(layer, PSTLinear):
                for label, factor in zip(_PST_FACTORS, layer.factors()):
                    tensors[f"{name}.{label}"] = cast_values(name, label, _full(factor).detach(), dtype)
                entries[name] = _pst_entry(layer)
                continue
            kind = _kind(layer)
            positions = getattr(layer, layer._POSITIONS)
            values = _full(layer.delta).detach()
            if kind == "entries" and layer.original_w0() is not None:
                positions, values = _relative_to_original_base(layer, values)
            tensors[f"{name}.delta"] = cast_values(name, "delta", values, dtype)
            encoding = None
            if kind == "entries":
                encoding, parts = _encode_index(positions, layer.out_features, layer.in_features)
            else:  # rows or block ids: int32 (only a grid of 2**31 blocks or more needs int64)
                wide = positions.numel() > 0 and int(positions.max()) >= 2**31
                parts = {layer._POSITIONS: positions.long() if wide else positions.to(torch.int32)}
            for key, tensor in parts.items():
                tensors[f"{name}.{key}"] = tensor.cpu().contiguous()
            entries[name] = {
                "kind": kind,
                "shape": [layer.out_features, layer.in_features],
                "count": int(positions.numel()),
                "index": encoding,
                "weight_dtype": _dtype_name(layer.weight.dtype),
                "fingerprint": fingerprint(layer, kind, positions, getattr(layer, "block_size", None), original=True),
            }
            if kind == "blocks":
                entries[name]["block_size"] = list(layer.block_size)
        saved = saved_module_tensors(root, config.modules_to_save, tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "layers": json.dumps(entries, sort_keys=True, separators=(",", ":")),
        "saved_modules": json.dumps(saved, sort_keys=True, separators=(",", ":")),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    if not _writes_files():
        return target
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    _replace(target, lambda temporary: save_file(tensors, temporary, metadata=metadata))
    if folder is not None:
        write_folder_config(folder, config, root)
    return target


def _relative_to_original_base(layer: SparseDeltaLinear, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded layer (dynamic masks) as an adapter of its original base: the union of the folded
    and the current positions, each with ``(W0_now + Δ) - W0_original`` (fp64, rounded once to the
    delta's dtype). O(union); the weight is only read at those positions."""
    folded, _ = layer.original_w0()
    union = torch.unique(torch.cat([folded, layer.index.long()]))
    now = _w0_entries(layer, union).to(torch.float64)
    original = _w0_entries(layer, union, original=True).to(torch.float64)
    trained = torch.zeros_like(now)
    hit, where = _lookup(union, layer.index.long())
    trained[where[hit]] = delta.to(torch.float64)
    return union.to(layer.index.dtype), (now + trained - original).to(delta.dtype)


def _kind(layer) -> str:
    if isinstance(layer, BlockSparseLinear):
        return "blocks"
    return "entries" if isinstance(layer, SparseDeltaLinear) else "rows"


def _pst_entry(layer: PSTLinear) -> dict:
    return {
        "kind": "pst",
        "shape": [layer.out_features, layer.in_features],
        "count": sum(factor.numel() for factor in layer.factors()),
        "index": None,
        "weight_dtype": _dtype_name(layer.weight.dtype),
        "fingerprint": fingerprint(layer, "pst", None),
        "pst": dict(r1=layer.r1, r2=layer.r2, **layer.get_extra_state()),
    }


def _describe(layers: dict) -> SpftConfig:
    """A config for layers converted by hand (no ``spft_config``): their total count (pst: the
    first layer's ranks, the highest sparsity)."""
    pst = [layer for layer in layers.values() if isinstance(layer, PSTLinear)]
    if pst:
        if len(pst) != len(layers):
            raise ValueError("save_adapter: a model mixing PSTLinear with other spft layers needs model.spft_config")
        sparsity = max(layer.sparsity for layer in pst)
        return SpftConfig(method="pst", sparsity=sparsity, pst_r1=pst[0].r1, pst_r2=pst[0].r2)
    rows = all(isinstance(layer, RowSparseLinear) for layer in layers.values())
    total = sum(layer.delta.numel() for layer in layers.values())
    block_sizes = {layer.block_size for layer in layers.values() if isinstance(layer, BlockSparseLinear)}
    # Blocks of one size everywhere: a blocks config; the layers carry their own kinds and sizes anyway.
    only_blocks = len(block_sizes) == 1 and all(isinstance(layer, BlockSparseLinear) for layer in layers.values())
    return SpftConfig(method="spruft" if rows else "speft", num_params=max(total, 1),
                      block_size=block_sizes.pop() if only_blocks else None)
