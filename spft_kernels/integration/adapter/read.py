"""``read_adapter``: read a whole adapter file and check it (integrity, format, structure) without
touching any model."""

from __future__ import annotations

import dataclasses
import os

from ...nn.registry import kind_class
from ...nn.stored import StoredLayer
from ..config import SpftConfig
from ..json_input import loads_json
from .files import PathLike, read_safetensors, resolve_path
from .format import _checksum, FORMAT, FORMAT_VERSION


@dataclasses.dataclass
class _Adapter:
    path: str
    config: SpftConfig
    layers: dict  # name -> StoredLayer
    saved: dict  # module name -> {key: tensor}


def read_adapter(path: PathLike) -> _Adapter:
    """Read and check a whole adapter file (integrity, format, structure); raises ``ValueError``
    naming the file and the problem. The model is not involved."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    metadata, tensors = read_safetensors(path, "adapter file")
    return parse_adapter(path, metadata, tensors)


def parse_adapter(path: str, metadata: dict, tensors: dict) -> _Adapter:
    """Check an adapter file's ``(metadata, tensors)`` (integrity, format, structure) and parse it;
    ``path`` names it in messages."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not an spft adapter file (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: adapter format version {version!r}; this version of spft_kernels reads {FORMAT_VERSION}")
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise ValueError(f"{path}: checksum mismatch: the file is corrupted or was modified after it was written")
    try:
        config = SpftConfig.from_json(metadata["config"])
        layer_entries = loads_json(metadata["layers"])
        saved_keys = loads_json(metadata["saved_modules"])
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


def _parse_layer(path: str, name: str, entry, tensors: dict) -> tuple[StoredLayer, set]:
    """The common fields of one layer's metadata; the kind reads its own fields and tensors."""
    where = f"{path}: layer {name!r}"
    try:
        kind, shape, count = entry["kind"], entry["shape"], entry["count"]
        entry["index"]
        weight_dtype, digest = entry["weight_dtype"], entry["fingerprint"]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: incomplete layer metadata {entry!r}") from None
    cls = kind_class(kind, where)
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ValueError(f"{where}: bad shape {shape!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{where}: bad count {count!r}")
    if not isinstance(weight_dtype, str) or not isinstance(digest, str):
        raise ValueError(f"{where}: bad weight dtype or fingerprint")
    base = entry.get("base")
    if base is not None and not isinstance(base, dict):
        raise ValueError(f"{where}: bad base description {base!r}")
    positions, values, options, keys = cls.read_adapter_payload(where, name, entry, tensors, tuple(shape))
    return StoredLayer(kind, tuple(shape), weight_dtype, digest, positions, values, options, base=base), keys
