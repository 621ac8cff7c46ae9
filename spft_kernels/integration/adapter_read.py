"""``read_adapter``: read a whole adapter file and check it (integrity, format, structure) without
touching any model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Union

import torch

from .adapter_format import (
    _checksum,
    _decode_index,
    _expect,
    FORMAT,
    FORMAT_VERSION,
    _KINDS,
    PathLike,
    _PST_FACTORS,
    _resolve_path,
    _VALUE_DTYPES,
)
from ..ops.block_index import check_block_size
from ..ops.pst_linear import _check_scalars, _check_sparsity
from .config import SpftConfig

# --- reading and checking ------------------------------------------------------------------------


@dataclasses.dataclass
class _LayerRecord:
    kind: str
    shape: tuple
    weight_dtype: str
    fingerprint: str
    positions: Optional[torch.Tensor]  # decoded, as stored (int64 or int32), CPU; None for pst
    values: Union[torch.Tensor, dict]  # CPU, as stored; pst: {factor label: tensor}
    pst: Optional[dict] = None  # pst: r1, r2, sparsity, beta, alpha1, alpha2, abs_score_grad
    block_size: Optional[tuple] = None  # blocks: (bh, bw)


@dataclasses.dataclass
class _Adapter:
    path: str
    config: SpftConfig
    layers: dict  # name -> _LayerRecord
    saved: dict  # module name -> {key: tensor}


def read_safetensors(path: str, what: str) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a whole safetensors file (on the CPU); ``ValueError`` naming
    ``path`` when safetensors cannot read it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every defect
        raise ValueError(f"{path}: not a readable {what} (truncated or corrupted?): {error}") from None
    return metadata, tensors


def read_adapter(path: PathLike) -> _Adapter:
    """Read and check a whole adapter file (integrity, format, structure); raises ``ValueError``
    naming the file and the problem. The model is not involved."""
    path = _resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    metadata, tensors = read_safetensors(path, "adapter file")
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not an spft adapter file (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: adapter format version {version!r}; this version of spft_kernels reads {FORMAT_VERSION}")
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise ValueError(f"{path}: checksum mismatch: the file is corrupted or was modified after it was written")
    try:
        config = SpftConfig.from_json(metadata["config"])
        layer_entries = json.loads(metadata["layers"])
        saved_keys = json.loads(metadata["saved_modules"])
    except (KeyError, ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"{path}: bad adapter metadata: {error}") from None
    if not isinstance(layer_entries, dict) or not isinstance(saved_keys, dict):
        raise ValueError(f"{path}: bad adapter metadata: layers and saved_modules must be JSON objects")
    expected, layers = set(), {}
    for name, entry in layer_entries.items():
        record, keys = _parse_layer(path, name, entry, tensors)
        layers[name] = record
        expected |= keys
    saved = {}
    for module_name, keys in saved_keys.items():
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{path}: bad adapter metadata: saved_modules[{module_name!r}] must list state dict keys")
        names = {key: f"{module_name}.{key}" for key in keys}
        missing = [n for n in names.values() if n not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing[:3]}")
        saved[module_name] = {key: tensors[n] for key, n in names.items()}
        expected |= set(names.values())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:3]}")
    return _Adapter(path, config, layers, saved)


def _parse_layer(path: str, name: str, entry, tensors: dict) -> tuple[_LayerRecord, set]:
    where = f"{path}: layer {name!r}"
    try:
        kind, shape, count = entry["kind"], entry["shape"], entry["count"]
        encoding, weight_dtype, digest = entry["index"], entry["weight_dtype"], entry["fingerprint"]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: incomplete layer metadata {entry!r}") from None
    if kind not in _KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ValueError(f"{where}: bad shape {shape!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{where}: bad count {count!r}")
    if not isinstance(weight_dtype, str) or not isinstance(digest, str):
        raise ValueError(f"{where}: bad weight dtype or fingerprint")
    out_features, in_features = shape
    if kind == "pst":
        return _parse_pst_layer(where, name, entry, tensors)
    block_size = None
    if kind == "entries":
        if encoding not in ("flat", "split16"):
            raise ValueError(f"{where}: unknown index encoding {encoding!r}")
        keys = {"index"} if encoding == "flat" else {"index_low16", "index_high_counts"}
        value_shape = (count,)
    elif kind == "blocks":
        try:
            block_size = check_block_size(tuple(entry.get("block_size") or ()), where)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: a blocks layer needs block_size [bh, bw], got {entry.get('block_size')!r}") from None
        keys = {"blocks"}
        value_shape = (count, *block_size)
    else:
        keys = {"rows"}
        value_shape = (count, in_features)
    names = {key: f"{name}.{key}" for key in keys | {"delta"}}
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}")
    values = tensors[names["delta"]]
    _expect(names["delta"], values, _VALUE_DTYPES, value_shape)
    if kind == "entries":
        parts = {key: tensors[names[key]] for key in keys}
        positions = _decode_index(f"{path}: {name}", encoding, parts, count, out_features * in_features)
    else:
        (key,) = keys
        positions = tensors[names[key]]
        _expect(names[key], positions, (torch.int32, torch.int64), (count,))
    record = _LayerRecord(kind, (out_features, in_features), weight_dtype, digest, positions, values,
                          block_size=block_size)
    return record, set(names.values())


def _parse_pst_layer(where: str, name: str, entry: dict, tensors: dict) -> tuple[_LayerRecord, set]:
    n, k = entry["shape"]
    options = entry.get("pst")
    required = {"r1", "r2", "sparsity", "beta", "alpha1", "alpha2", "abs_score_grad"}
    if not isinstance(options, dict) or set(options) != required:
        raise ValueError(f"{where}: a pst layer's metadata must hold {sorted(required)}, got {options!r}")
    r1, r2 = options["r1"], options["r2"]
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in (r1, r2)):
        raise ValueError(f"{where}: bad ranks r1={r1!r}, r2={r2!r}")
    try:  # the layer's own checks of the sparsity and the scalars
        _check_sparsity(options["sparsity"])
        _check_scalars(options["beta"], options["alpha1"], options["alpha2"], where)
    except ValueError as error:
        raise ValueError(f"{where}: bad pst options: {error}") from None
    if not isinstance(options["abs_score_grad"], bool):
        raise ValueError(f"{where}: abs_score_grad must be a bool")
    if entry["count"] != (n + k) * (r1 + r2 + 1) or entry["index"] is not None:
        raise ValueError(f"{where}: a pst layer of shape {[n, k]} with r1={r1}, r2={r2} has {(n + k) * (r1 + r2 + 1)} values")
    shapes = dict(U=(n, r2), V=(r2, k), A=(n, r1), B=(r1, k), R=(n, 1), C=(1, k))
    names = {label: f"{name}.{label}" for label in _PST_FACTORS}
    missing = [key for key in names.values() if key not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}")
    for label, key in names.items():
        _expect(key, tensors[key], _VALUE_DTYPES, shapes[label])
    values = {label: tensors[key] for label, key in names.items()}
    record = _LayerRecord("pst", (n, k), entry["weight_dtype"], entry["fingerprint"], None, values, dict(options))
    return record, set(names.values())
