"""``save_adapter``: write a converted model's adapter (deltas, positions, saved modules, config,
fingerprints, checksum) in the format of ``adapter_format.py``."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from .adapter_format import (
    _checksum,
    _dtype_name,
    _encode_index,
    _full,
    fingerprint,
    FORMAT,
    FORMAT_VERSION,
    PathLike,
    _PST_FACTORS,
    saved_module_tensors,
    _VALUE_DTYPES,
)
from .adapter_folder import SAVE_FORMATS, save_target, write_folder_config
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
    every rank must call it (the sharded deltas are gathered)."""
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
    if format == "peft":
        return save_shira_folder(root, layers, config, path, dtype=dtype, write=_writes_files())
    tensors, entries = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(layer, PSTLinear):
                for label, factor in zip(_PST_FACTORS, layer.factors()):
                    tensors[f"{name}.{label}"] = _full(factor).detach().to(dtype or factor.dtype).cpu().contiguous()
                entries[name] = _pst_entry(layer)
                continue
            kind = "entries" if isinstance(layer, SparseDeltaLinear) else "rows"
            positions = layer.index if kind == "entries" else layer.rows
            values = _full(layer.delta).detach()
            tensors[f"{name}.delta"] = values.to(dtype or values.dtype).cpu().contiguous()
            encoding = None
            if kind == "entries":
                encoding, parts = _encode_index(positions, layer.out_features, layer.in_features)
            else:
                parts = {"rows": positions.to(torch.int32)}
            for key, tensor in parts.items():
                tensors[f"{name}.{key}"] = tensor.cpu().contiguous()
            entries[name] = {
                "kind": kind,
                "shape": [layer.out_features, layer.in_features],
                "count": int(positions.numel()),
                "index": encoding,
                "weight_dtype": _dtype_name(layer.weight.dtype),
                "fingerprint": fingerprint(layer, kind, positions),
            }
        saved = saved_module_tensors(root, config.modules_to_save, tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "layers": json.dumps(entries, sort_keys=True, separators=(",", ":")),
        "saved_modules": json.dumps(saved, sort_keys=True, separators=(",", ":")),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    target, folder = save_target(path)
    if not _writes_files():
        return target
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    if folder is not None:
        write_folder_config(folder, config, root)
    return target


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
    return SpftConfig(method="spruft" if rows else "speft", num_params=max(total, 1))
