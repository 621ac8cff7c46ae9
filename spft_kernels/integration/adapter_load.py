"""Adapter files: ``save_adapter``, ``load_adapter`` and ``merge_adapters`` (SpaRTA's model
merging), in safetensors.

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

and, for a PSTLinear, ``<name>.U``, ``.V``, ``.A``, ``.B``, ``.R``, ``.C`` (its trained factors, in
their fp32 masters or ``dtype``); and, for every module in ``modules_to_save``, its state dict as
``<module>.<key>``.

Metadata (safetensors' string map):

- ``format`` = ``"spft_adapter"``, ``format_version`` = ``"1"``;
- ``config``: the ``SpftConfig`` as JSON;
- ``layers``: JSON ``{name: {"kind": "entries"|"rows"|"pst", "shape": [out, in], "count": nnz or R
  (pst: the trainable count (out + in)(r1 + r2 + 1)), "index": "flat"|"split16"|null,
  "weight_dtype": "float32", "fingerprint": sha256 hex}}``; a ``pst`` layer adds ``"pst": {"r1",
  "r2", "sparsity" (the layer's current one), "beta", "alpha1", "alpha2", "abs_score_grad"}``;
- ``saved_modules``: JSON ``{module: [state dict keys]}``;
- ``checksum``: sha256 over every other metadata entry and every tensor (name, dtype, shape,
  bytes), so that a truncated file, a flipped byte or an edited entry is reported instead of
  loaded. It detects corruption and accidental edits; it is not a signature.

Base-weight fingerprint (per layer): sha256 of the weight's shape and dtype, of W0 at 256 fixed
pseudo-random positions spread over the whole matrix (the same for every file of that shape), and
of W0 at every position the adapter trains (its entries, or its whole rows; none for a PST
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

import dataclasses
import hashlib
import json
import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .index import SparseIndex, canonical_rows, index_dtype_for
from .layers import RowSparseLinear, SparseDeltaLinear
from .pst import PSTLinear, _check_scalars, _check_sparsity
from .model import (
    CONFIG_ATTR,
    SPFT_LAYER_TYPES,
    SpftConfig,
    plain_linear,
    prepare_for_training,
    remember_requires_grad,
    saved_module_names,
    set_submodule,
    spft_layers,
    unwrap_model,
)

FORMAT = "spft_adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "spft_adapter.safetensors"  # the file name used when a directory is given
SAMPLE_POSITIONS = 256
_BLOCK = 1 << 16  # flat positions per high-count block of the split index form
_KINDS = {"entries": SparseDeltaLinear, "rows": RowSparseLinear, "pst": PSTLinear}
_PST_FACTORS = ("U", "V", "A", "B", "R", "C")
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

PathLike = Union[str, os.PathLike]


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


def _w0_entries(module: nn.Linear, flat: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W0 at the flat positions (any weight layout); a merged spft layer's own positions read the
    W0 values it keeps aside. ``weight``: the module's weight as a plain tensor (default: its own)."""
    weight = (module.weight if weight is None else weight).detach()
    flat = flat.to(weight.device, torch.int64)
    rows = torch.div(flat, module.in_features, rounding_mode="floor")
    cols = flat - rows * module.in_features
    values = weight[rows, cols]
    if isinstance(module, SPFT_LAYER_TYPES) and getattr(module, "merged", False) and flat.numel():
        aside = module._w0_at_index
        if isinstance(module, SparseDeltaLinear):
            hit, where = _lookup(module.index.long(), flat)
            values[hit] = aside[where[hit]]
        else:
            hit, where = _lookup(module.rows, rows)
            values[hit] = aside[where[hit], cols[hit]]
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
        else:
            index = module.index.long()
            entry_rows = torch.div(index, module.in_features, rounding_mode="floor")
            hit, where = _lookup(rows, entry_rows)  # which merged entries fall in the asked rows
            values[where[hit], (index - entry_rows * module.in_features)[hit]] = aside[hit]
    return values


def _lookup(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hit, where)``: whether each query is in the sorted unique keys, and at which position."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(queries, dtype=torch.bool), torch.zeros_like(queries)
    where = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[where] == queries, where


def fingerprint(module: nn.Linear, kind: str, positions: torch.Tensor) -> str:
    """The base-weight fingerprint of an adapter layer (module docstring): sha256 hex."""
    digest = hashlib.sha256()
    weight = _full(module.weight)
    digest.update(f"{module.out_features}x{module.in_features}:{_dtype_name(weight.dtype)}".encode())
    sample = _sample_positions(module.out_features, module.in_features)
    digest.update(_tensor_bytes(_w0_entries(module, sample, weight)))
    if kind == "pst":
        trained = weight.new_empty(0)
    elif kind == "entries":
        trained = _w0_entries(module, positions, weight)
    else:
        trained = _w0_rows(module, positions, weight)
    digest.update(_tensor_bytes(trained))
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    total = out_features * in_features
    blocks = -(-total // _BLOCK)
    flat_bytes = index.numel() * index.element_size()
    if 2 * index.numel() + 4 * blocks >= flat_bytes:
        return "flat", {"index": index}
    wide = index.long()
    counts = torch.bincount(torch.div(wide, _BLOCK, rounding_mode="floor"), minlength=blocks).to(torch.int32)
    return "split16", {"index_low16": (wide % _BLOCK).to(torch.uint16), "index_high_counts": counts}


def _decode_index(where: str, encoding: str, parts: dict, count: int, total: int) -> torch.Tensor:
    if encoding == "flat":
        index = parts["index"]
        _expect(where + ".index", index, (torch.int32, torch.int64), (count,))
        return index
    low, counts = parts["index_low16"], parts["index_high_counts"]
    blocks = -(-total // _BLOCK)
    _expect(where + ".index_low16", low, (torch.uint16,), (count,))
    _expect(where + ".index_high_counts", counts, (torch.int32,), (blocks,))
    if bool((counts < 0).any()) or int(counts.long().sum()) != count:
        raise ValueError(f"{where}.index_high_counts: the block counts must be non-negative and sum to {count}")
    high = torch.repeat_interleave(torch.arange(blocks, dtype=torch.int64), counts.long())
    return high * _BLOCK + low.to(torch.int64)


def _expect(key: str, tensor: torch.Tensor, dtypes: tuple, shape: tuple) -> None:
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        raise ValueError(
            f"adapter tensor {key!r} must be {'/'.join(_dtype_name(d) for d in dtypes)} of shape {shape}, got "
            f"{_dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        )


# --- saving ------------------------------------------------------------------------------------


def _resolve_path(path: PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path


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


def _writes_files() -> bool:
    """Under torch.distributed (DDP, FSDP2) rank 0 writes; every other rank only takes part in the
    gathers."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def save_adapter(model: nn.Module, path: PathLike, *, dtype: Optional[torch.dtype] = None) -> str:
    """Write the model's adapter (every spft layer's delta and positions, the ``modules_to_save``
    and the config) to ``path`` (a file, or a directory that gets ``spft_adapter.safetensors``);
    returns the file's path. ``dtype`` stores the values in another precision, e.g.
    ``torch.bfloat16`` for 4 bytes per trainable entry (default: the deltas' own fp32). The file
    is written to a temporary name and renamed, so a crash never leaves a half-written adapter.
    DDP-wrapped models are unwrapped; under torch.distributed only rank 0 writes, and with FSDP2
    every rank must call it (the sharded deltas are gathered)."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in _VALUE_DTYPES:
        raise ValueError(f"save_adapter: dtype must be one of {[_dtype_name(d) for d in _VALUE_DTYPES]}, got {dtype!r}")
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("save_adapter: the model has no sparse fine-tuning layers (convert it with get_spft_model)")
    config = getattr(root, CONFIG_ATTR, None)
    if config is None:
        config = _describe(layers)
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
        saved = {}
        for module_name in saved_module_names(root, config.modules_to_save):
            state = root.get_submodule(module_name).state_dict()
            saved[module_name] = sorted(state)
            for key, tensor in state.items():
                tensors[f"{module_name}.{key}"] = _full(tensor).detach().cpu().contiguous().clone()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "layers": json.dumps(entries, sort_keys=True, separators=(",", ":")),
        "saved_modules": json.dumps(saved, sort_keys=True, separators=(",", ":")),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    target = _resolve_path(path)
    if not _writes_files():
        return target
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
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


@dataclasses.dataclass
class _Adapter:
    path: str
    config: SpftConfig
    layers: dict  # name -> _LayerRecord
    saved: dict  # module name -> {key: tensor}


def read_adapter(path: PathLike) -> _Adapter:
    """Read and check a whole adapter file (integrity, format, structure); raises ``ValueError``
    naming the file and the problem. The model is not involved."""
    from safetensors import safe_open

    path = _resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every defect
        raise ValueError(f"{path}: not a readable adapter file (truncated or corrupted?): {error}") from None
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
    if kind == "entries":
        if encoding not in ("flat", "split16"):
            raise ValueError(f"{where}: unknown index encoding {encoding!r}")
        keys = {"index"} if encoding == "flat" else {"index_low16", "index_high_counts"}
        value_shape = (count,)
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
        positions = tensors[names["rows"]]
        _expect(names["rows"], positions, (torch.int32, torch.int64), (count,))
    record = _LayerRecord(kind, (out_features, in_features), weight_dtype, digest, positions, values)
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


@dataclasses.dataclass
class _Plan:
    """One layer, checked against the model and ready to install."""

    kind: str
    positions: Optional[torch.Tensor]  # canonical, on the weight's device; None for pst
    values: Union[torch.Tensor, dict]  # sorted like the positions, master dtype, on the weight's device
    pst: Optional[dict] = None


_BASE_DIFFERS = (
    "{where}: the model's base weight differs from the one the adapter was trained on (fingerprint "
    "mismatch: same shape and dtype, different values); load it onto the base model it was trained on"
)


def _check_against(root: nn.Module, adapter: _Adapter, check_base: bool) -> dict:
    """``{name: _Plan}``: every layer of the adapter checked against the model (module, shape,
    dtype, positions, fingerprint) and its saved modules' state dict keys and shapes. Reads the
    model only."""
    modules = dict(root.named_modules())
    plans = {}
    for name, record in adapter.layers.items():
        where = f"{adapter.path}: layer {name!r}"
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{where} is not in the model ({type(root).__name__}); the adapter was made for another architecture")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{where}: the model's module is a {type(module).__name__}, not a linear layer")
        shape = (module.out_features, module.in_features)
        if shape != record.shape:
            raise ValueError(f"{where}: the adapter is for a weight of shape {record.shape}, the model's is {shape}")
        weight = module.weight
        if _is_dtensor(weight):
            raise ValueError(f"{where}: the model is sharded (FSDP2); load the adapter before fully_shard")
        if weight.device.type == "meta":
            raise ValueError(f"{where}: the model's weight is on the meta device; materialise the model first")
        if check_base and _dtype_name(weight.dtype) != record.weight_dtype:
            raise ValueError(
                f"{where}: the adapter was trained on a {record.weight_dtype} base, the model's weight is "
                f"{_dtype_name(weight.dtype)}; load onto a {record.weight_dtype} model and cast afterwards, or pass "
                "check_base=False"
            )
        device = weight.device
        master = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if record.kind == "pst":
            if check_base and fingerprint(module, "pst", None) != record.fingerprint:
                raise ValueError(_BASE_DIFFERS.format(where=where))
            values = {label: t.to(device, master) for label, t in record.values.items()}
            plans[name] = _Plan("pst", None, values, record.pst)
            continue
        positions = record.positions.to(device)
        if record.kind == "entries":
            if not weight.is_contiguous() and _layer_mode(module, adapter.config) == "merged":
                raise ValueError(f"{where}: mode 'merged' needs a contiguous weight")
            sparse_index, order = SparseIndex.build(positions, *shape, device=device, name=where)
            positions = sparse_index.flat
        else:
            positions, order = canonical_rows(positions, shape[0], device=device, name=where)
        values = record.values.to(device)
        if order is not None:
            values = values[order]
        if check_base and fingerprint(module, record.kind, positions) != record.fingerprint:
            raise ValueError(_BASE_DIFFERS.format(where=where))
        plans[name] = _Plan(record.kind, positions, values.to(master))
    for module_name, state in adapter.saved.items():
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"{adapter.path}: saved module {module_name!r} is not in the model")
        own = module.state_dict()
        if set(own) != set(state):
            raise ValueError(
                f"{adapter.path}: saved module {module_name!r} has keys {sorted(state)}, the model's has {sorted(own)}"
            )
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise ValueError(
                    f"{adapter.path}: saved {module_name}.{key} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(own[key].shape)}"
                )
    return plans


def _layer_mode(module: nn.Module, config: SpftConfig) -> str:
    return module.mode if isinstance(module, (SparseDeltaLinear, RowSparseLinear)) else config.mode


# --- installing --------------------------------------------------------------------------------


def _install(root: nn.Module, plans: dict, saved: dict, config: SpftConfig) -> None:
    """Write checked plans into the model (nothing here can fail on checked input): each planned
    layer is rebuilt on its W0 with the new positions and values, spft layers the adapter does not
    have become plain linears again, saved modules get their state, and the model is frozen for
    training as get_spft_model leaves it."""
    remember_requires_grad(root)
    modules = dict(root.named_modules())
    for name, layer in spft_layers(root).items():
        if name not in plans:
            set_submodule(root, name, plain_linear(layer))
    for name, plan in plans.items():
        current = modules[name]
        backend = current.backend if isinstance(current, SPFT_LAYER_TYPES) else config.backend
        if plan.kind == "pst":
            set_submodule(root, name, _pst_layer(plain_linear(current), plan, backend, name))
            continue
        mode = _layer_mode(current, config)
        layer = _KINDS[plan.kind].from_linear(plain_linear(current), plan.positions, mode=mode, backend=backend, name=name)
        with torch.no_grad():
            layer.delta.copy_(plan.values)
        set_submodule(root, name, layer)
    for module_name, state in saved.items():
        root.get_submodule(module_name).load_state_dict(state)
    prepare_for_training(root, list(saved))
    setattr(root, CONFIG_ATTR, config)


def _pst_layer(linear: nn.Linear, plan: _Plan, backend: str, name: str) -> PSTLinear:
    options = plan.pst
    layer = PSTLinear.from_linear(
        linear, options["sparsity"], options["r1"], options["r2"], beta=options["beta"], alpha1=options["alpha1"],
        alpha2=options["alpha2"], abs_score_grad=options["abs_score_grad"], backend=backend, name=name,
    )
    with torch.no_grad():
        for label, factor in zip(_PST_FACTORS, layer.factors()):
            factor.copy_(plan.values[label])
    return layer


def load_adapter(model: nn.Module, path: PathLike, *, check_base: bool = True) -> nn.Module:
    """Load an adapter file into ``model`` and return it (the same object).

    A plain model is converted (its linears become spft layers at the stored positions, as
    ``PeftModel.from_pretrained`` does for LoRA); a converted model gets its adapter replaced
    (spft layers the file does not have become plain linears again). The deltas and the
    ``modules_to_save`` are trainable afterwards, everything else frozen. Everything is checked
    before anything is written (see the module docstring), so a ``ValueError`` leaves the model
    unchanged. ``check_base=False`` skips the base-weight fingerprint and dtype check (shapes are
    still checked)."""
    adapter = read_adapter(path)
    root = unwrap_model(model)
    plans = _check_against(root, adapter, check_base)
    _install(root, plans, adapter.saved, adapter.config)
    return model


def merge_adapters(
    model: nn.Module,
    paths: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    saved_modules: str = "error",
    check_base: bool = True,
) -> nn.Module:
    """SpaRTA's model merging: put ``Σ_i weights[i] · Δ_i`` of several sparse adapters onto one
    base and return the model (the same object).

    Every adapter is checked against the model's W0 (as ``load_adapter`` does) before anything is
    written. Per layer the positions are the union of the adapters' positions and overlapping
    entries are summed (in fp64, rounded once to fp32). The result is a converted model with one
    adapter (new SparseDeltaLinear layers, or RowSparseLinear where every adapter trained rows of
    that layer; row adapters count as their entries when mixed with entry adapters), so W0 stays
    intact: save it with ``save_adapter``, or fold it into plain linears with ``merge_and_unload``.
    A model that already has an adapter gets it replaced, as ``load_adapter`` does.

    ``saved_modules``: the adapters' fully trained modules (e.g. classification heads) cannot be
    summed without interference (SpaRTA keeps one head per task); ``"error"`` loads a module saved
    by exactly one adapter and refuses one saved by several, ``"skip"`` loads none of them.
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or not paths:
        raise ValueError("merge_adapters: paths must be a non-empty list of adapter files")
    if weights is None:
        weights = [1.0] * len(paths)
    if isinstance(weights, (str, bytes)) or len(weights) != len(paths):
        raise ValueError(f"merge_adapters: weights must give one number per adapter ({len(paths)})")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"merge_adapters: weights must be finite numbers, got {w!r}")
    if saved_modules not in ("error", "skip"):
        raise ValueError(f"merge_adapters: saved_modules must be 'error' or 'skip', got {saved_modules!r}")
    root = unwrap_model(model)
    adapters = [read_adapter(p) for p in paths]
    for adapter in adapters:
        if any(record.kind == "pst" for record in adapter.layers.values()):
            raise ValueError(
                f"merge_adapters: {adapter.path} is a PST adapter; PST adapters are not additive (each prunes W0 "
                "with its own learned mask), so they cannot be merged: load one with load_adapter"
            )
    checked = [_check_against(root, adapter, check_base) for adapter in adapters]
    order = {name: position for position, (name, _) in enumerate(root.named_modules())}
    names = sorted({name for plans in checked for name in plans}, key=order.__getitem__)
    merged = {}
    for name in names:
        parts = [(plans[name], float(w)) for plans, w in zip(checked, weights) if name in plans]
        merged[name] = _merge_layer(root.get_submodule(name), parts)
    saved = {}
    if saved_modules == "error":
        owners: dict = {}
        for adapter in adapters:
            for module_name, state in adapter.saved.items():
                owners.setdefault(module_name, []).append(adapter.path)
                saved[module_name] = state
        shared = {m: p for m, p in owners.items() if len(p) > 1}
        if shared:
            module_name, owner_paths = next(iter(shared.items()))
            raise ValueError(
                f"merge_adapters: module {module_name!r} is saved whole by several adapters ({owner_paths}); it "
                "cannot be merged without interference. Pass saved_modules='skip' and attach each head yourself"
            )
    total = sum(plan.values.numel() for plan in merged.values())
    config = adapters[0].config
    method = config.method
    if method == "spruft" and any(plan.kind == "entries" for plan in merged.values()):
        method = "speft"
    config = dataclasses.replace(
        config,
        method=method,
        metric=config.metric if method == config.method else None,
        scope=config.scope if method == config.method else None,
        density=None,
        num_params=max(total, 1),
        match_lora_rank=None,
        mask_update_interval=None,
        modules_to_save=sorted(saved) or None,
    )
    _install(root, merged, saved, config)
    return model


def _merge_layer(module: nn.Linear, parts: list) -> _Plan:
    """The union of the parts' positions with the weighted values summed (fp64, rounded once)."""
    in_features = module.in_features
    master = parts[0][0].values.dtype
    if all(plan.kind == "rows" for plan, _ in parts):
        union = torch.unique(torch.cat([plan.positions for plan, _ in parts]))
        acc = torch.zeros(union.numel(), in_features, dtype=torch.float64, device=union.device)
        for plan, w in parts:
            acc.index_add_(0, torch.searchsorted(union, plan.positions), plan.values.to(torch.float64) * w)
        return _Plan("rows", union, acc.to(master))
    flats, values = [], []
    for plan, w in parts:
        if plan.kind == "rows":
            columns = torch.arange(in_features, device=plan.positions.device)
            flats.append((plan.positions[:, None] * in_features + columns).reshape(-1))
            values.append(plan.values.reshape(-1).to(torch.float64) * w)
        else:
            flats.append(plan.positions.long())
            values.append(plan.values.to(torch.float64) * w)
    union = torch.unique(torch.cat(flats))
    acc = torch.zeros(union.numel(), dtype=torch.float64, device=union.device)
    for flat, value in zip(flats, values):
        acc.index_add_(0, torch.searchsorted(union, flat), value)
    index = union.to(index_dtype_for(module.out_features, in_features))
    return _Plan("entries", index, acc.to(master))
