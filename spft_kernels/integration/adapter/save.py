"""``save_adapter``: write a converted model's adapter (deltas, positions, saved modules, config,
fingerprints, checksum) in the format of ``format.py``."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ...nn.registry import universal_kind
from ...nn.stored import dtype_name, VALUE_DTYPES
from ..config import SpftConfig
from ..surgery import CONFIG_ATTR, saved_module_names, spft_layers, unwrap_model
from .files import check_writable, CONFIG_FILE, fs_path, PathLike, PEFT_TENSORS, replace_atomically
from .folder import SAVE_FORMATS, save_target, write_folder_config
from .format import (
    _checksum,
    cast_values,
    _full,
    fingerprint,
    FORMAT,
    FORMAT_VERSION,
    saved_module_tensors,
)
from .collective import check_all_ranks_called, gathered, is_sharded
from .peft_shira import save_shira_folder


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
    ``adapter_config.json`` (``folder.py``). Returns the tensors file's path.
    ``format="peft"`` writes peft's SHiRA folder instead (``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained``; see
    ``peft_shira.py``, which also says what SHiRA cannot express) and returns the folder.
    ``dtype`` stores the values in another precision, e.g.
    ``torch.bfloat16`` for 4 bytes per trainable entry (default: the deltas' own fp32). The file
    is written to a temporary name and renamed, so a crash never leaves a half-written adapter.
    Wrapped models (DDP, FSDP1, DeepSpeed, ``torch.compile``) are unwrapped; under
    torch.distributed only rank 0 writes, and a sharded model (FSDP2, DeepSpeed ZeRO-3: its
    shards are gathered, layer by layer) needs every rank to call it: a rank that does not is
    named in a ``RuntimeError`` after ``collective.COLLECTIVE_TIMEOUT_S`` instead of a hang.

    Everything is checked before a file is touched: a value that does not fit ``dtype`` (|Δ| >
    65504 in float16) is a ``ValueError`` naming the layer and the value, and an existing file
    is replaced unless it is read-only (``PermissionError``). Failures to write (a missing
    directory, a full disk) are ``OSError`` subclasses; an existing file is then left as it was.
    After dynamic-mask updates (``SparseDeltaLinear.fold_delta``) the adapter is written for the
    original base: every position ever trained, with ``W_trained - W0_original`` (``format="peft"``
    refuses such a model). Paths may be ``str``, ``bytes`` or ``os.PathLike``."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"save_adapter: format must be one of {SAVE_FORMATS}, got {format!r}")
    if dtype is not None and dtype not in VALUE_DTYPES:
        raise ValueError(f"save_adapter: dtype must be one of {[dtype_name(d) for d in VALUE_DTYPES]}, got {dtype!r}")
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("save_adapter: the model has no sparse fine-tuning layers (convert it with get_spft_model)")
    config = model_config(root, layers)
    path = fs_path(path)
    if is_sharded(root):  # gathering the shards is a collective: a rank missing would hang the others
        check_all_ranks_called("save_adapter", "the model is sharded (FSDP2 or DeepSpeed ZeRO-3) and its shards are gathered")
    if format == "peft":
        folded = [n for n, m in layers.items() if m.folded_w0() is not None]
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
    tensors, metadata = adapter_contents(root, layers, config, dtype)
    if not _writes_files():
        return target
    write_contents(target, folder, tensors, metadata, config, root)
    return target


def model_config(root: nn.Module, layers: dict) -> SpftConfig:
    """The config an adapter of ``root`` records: ``root.spft_config``, or a description of layers
    converted by hand."""
    config = getattr(root, CONFIG_ATTR, None)
    return config if config is not None else _describe(layers)


def adapter_contents(root: nn.Module, layers: dict, config: SpftConfig, dtype: Optional[torch.dtype] = None):
    """``(tensors, metadata)``: the adapter file of ``layers`` (``format.py``), checksum included,
    tensors on the CPU; nothing is written."""
    tensors, entries = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            with gathered([layer]):  # ZeRO-3: this layer's partitions whole, on every rank
                entries[name] = _layer_entry(name, layer, tensors, dtype)
        with gathered([root.get_submodule(n) for n in saved_module_names(root, config.modules_to_save)]):
            saved = saved_module_tensors(root, config.modules_to_save, tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "layers": json.dumps(entries, sort_keys=True, separators=(",", ":")),
        "saved_modules": json.dumps(saved, sort_keys=True, separators=(",", ":")),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    return tensors, metadata


def write_contents(target: str, folder: Optional[str], tensors: dict, metadata: dict, config: SpftConfig,
                   root: nn.Module) -> None:
    """Write an adapter file's ``(tensors, metadata)`` to ``target`` (atomically), and the folder's
    ``adapter_config.json`` when ``folder`` is given."""
    from safetensors.torch import save_file

    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    replace_atomically(target, lambda temporary: save_file(tensors, temporary, metadata=metadata))
    if folder is not None:
        write_folder_config(folder, config, root)


def _layer_entry(name: str, layer: nn.Module, tensors: dict, dtype: Optional[torch.dtype]) -> dict:
    """Put one layer's adapter tensors into ``tensors``; returns its metadata entry."""
    payload = layer.adapter_payload()
    for label, values in payload.values.items():
        tensors[f"{name}.{label}"] = cast_values(name, label, _full(values).detach(), dtype)
    for label, positions in payload.positions.items():
        tensors[f"{name}.{label}"] = positions.cpu().contiguous()
    shape = (layer.out_features, layer.in_features)
    trained = torch.empty(0, dtype=torch.int64)
    if payload.canonical is not None:
        trained = layer.flat_positions(payload.canonical, shape, layer.options())
    entry = {
        "kind": layer.kind,
        "shape": list(shape),
        "weight_dtype": dtype_name(layer.weight.dtype),
        "fingerprint": fingerprint(layer, trained, original=True),
        **payload.fields,
    }
    described = layer.base_kind.describe(layer)
    if described:  # (a quantized base: its quantization; a dense one records nothing)
        entry["base"] = described
    return entry


def _describe(layers: dict) -> SpftConfig:
    """A config for layers converted by hand (no ``spft_config``): what their kind says
    (``config_for``); layers of several kinds are described as scattered entries, which needs
    every kind to be additive."""
    kinds = {type(layer) for layer in layers.values()}
    if len(kinds) == 1:
        return SpftConfig(**kinds.pop().config_for(list(layers.values())))
    odd = sorted(cls.kind for cls in kinds if not cls.additive)
    if odd:
        raise ValueError(f"save_adapter: a model mixing {odd[0]!r} layers with other kinds needs model.spft_config")
    return SpftConfig(**universal_kind().config_for(list(layers.values())))
