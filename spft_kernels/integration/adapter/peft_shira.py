"""peft's SHiRA adapter folders, both ways: ``save_adapter(model, folder, format="peft")`` writes
one that stock ``peft.PeftModel.from_pretrained(base, folder)`` loads, and ``load_adapter`` reads
one that peft saved (``folder.py`` tells the folders apart).

peft's SHiRA format (read from peft 0.21's ``tuners/shira``; the tests check it against the
installed peft):

- ``adapter_config.json``: ``{"peft_type": "SHIRA", "r": r, "mask_type": "random",
  "target_modules": [...], "modules_to_save": [...] | null, ...}``;
- ``adapter_model.safetensors``: for every targeted linear ``<name>`` (its qualified name in the
  base model) ``base_model.model.<name>.shira_weight`` (the values, ``[K]``) and
  ``base_model.model.<name>.shira_indices`` (int32 ``[2, K]``: output rows, then input columns);
  for every ``modules_to_save`` module its state dict as ``base_model.model.<module>.<key>``.
- The count rule: every targeted layer holds exactly ``K = r * (in + out)`` entries, with one
  ``r`` for the whole adapter (``ShiraConfig`` has no per-layer rank), and ``K <= in * out``
  (peft refuses more). peft builds each layer with a random mask of K entries and then takes the
  file's indices and values, so any K distinct positions load, in any order.
- The forward: ``W0.clone() += sparse_coo(indices, shira_weight * scaling)``, then ``F.linear``:
  the sum the merged mode writes, so fp32 outputs are bitwise equal.

Writing: every spft layer kind whose delta is a set of weight entries gives its flat entries
(the kind's ``entries_of``: scattered entries as they are, rows as their ``in`` entries each,
blocks as their live entries, which load back as scattered entries since SHiRA has no blocks;
``shira_kind`` says which kind they come back as, ``from_entries`` how). ``r`` is the smallest that holds every layer's entries
(``ceil(count / (in + out))``, at least 1); a layer's remaining ``K - count`` entries are zeros at
untrained positions spread evenly over the weight, so peft's output is the model's. The real
entries come first, then the padding, and the safetensors metadata (which peft ignores) keeps the
spft description (kind, count, base fingerprint per layer, config, checksum), so that
``load_adapter`` gets back exactly the adapter that was saved: the padding is dropped, rows are
rows again and the base is checked. A folder peft wrote (or re-saved after training) has no such
metadata: all of its entries load as scattered entries and the base weights cannot be checked.

Not expressible, with a ``ValueError`` naming the layer: PST (its output is a pruned weight
``(W0 + βUV) ⊙ M``, not W0 plus entries), and a set of layers that no single ``r`` fits (a layer
needing ``r`` entries beyond the size of a smaller layer).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from ...nn.registry import kind_class, universal_kind
from ...nn.stored import dtype_name, StoredLayer, VALUE_DTYPES
from ..config import SpftConfig
from ..json_input import loads_json
from ..surgery import saved_module_names
from .files import CONFIG_FILE, name_or_path, PathLike, PEFT_TENSORS, read_safetensors, replace_atomically, write_json
from .format import cast_values, _checksum, _full, fingerprint, saved_module_tensors
from .read import _Adapter

PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (the tuner) .model (the base model)
SPFT_IN_PEFT = "spft_adapter_in_peft_shira"  # metadata["spft_format"] of a folder spft wrote
_WEIGHT, _INDICES = "shira_weight", "shira_indices"


def _layer_entries(name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's sorted flat entries and values; ``ValueError`` for a kind SHiRA cannot express."""
    if layer.shira_kind is None:
        raise ValueError(
            f"save_adapter(format='peft'): layer {name!r} is a {type(layer).__name__}; {layer.shira_refusal} "
            "(save it in spft's own format, or export the merged model with merge_and_unload)"
        )
    trained = {label: _full(value).detach() for label, value in layer.trainable_tensors().items()}
    flat, values = layer.entries_of(layer.positions(), trained, (layer.out_features, layer.in_features), layer.options())
    return flat, values.reshape(-1)


def shira_rank(shapes: dict) -> int:
    """The smallest ``r`` for which every layer's entries fit in ``r * (in + out)`` and no layer
    gets more than ``in * out`` (peft's count rule). ``shapes``: ``{name: (out, in, count)}``."""
    needed = {name: max(1, -(-count // (o + i))) for name, (o, i, count) in shapes.items()}
    widest = max(needed, key=needed.get)
    rank = needed[widest]
    for name, (o, i, _) in shapes.items():
        if rank * (o + i) > o * i:
            raise ValueError(
                f"save_adapter(format='peft'): SHiRA stores r*(in+out) entries in every layer with one r for the "
                f"whole adapter (peft's ShiraConfig has no per-layer rank); layer {widest!r} "
                f"({shapes[widest][2]} entries, {shapes[widest][0]}x{shapes[widest][1]}) needs r >= {rank}, at which "
                f"layer {name!r} ({o}x{i}) would need {rank * (o + i)} entries, more than its {o * i} weights "
                "(a global top-k can concentrate entries like this; scope='local' spreads them evenly)"
            )
    return rank


def _padding(flat: torch.Tensor, total: int, need: int) -> torch.Tensor:
    """``need`` sorted positions not in the sorted ``flat``, spread evenly over ``[0, total)``:
    ``need + nnz`` evenly spaced candidates (distinct, as ``need + nnz <= total``), of which at most
    nnz are taken. O(need + nnz), no temporary of the weight's size."""
    if need == 0:
        return flat.new_empty(0)
    count = need + flat.numel()
    candidates = torch.div(torch.arange(count, device=flat.device) * total, count, rounding_mode="floor")
    if flat.numel():
        where = torch.searchsorted(flat, candidates).clamp_(max=flat.numel() - 1)
        candidates = candidates[flat[where] != candidates]
    return candidates[:need]


def shira_flat(where: str, indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """SHiRA's ``[2, K]`` (row; column) indices as flat positions ``row * in + col`` (int64, in
    their order); ``ValueError`` for a row or column outside the weight (which a flat range check
    would miss: column ``in`` is the next row's column 0)."""
    rows, cols = indices.long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features or int(cols.min()) < 0
                         or int(cols.max()) >= in_features):
        raise ValueError(f"{where}: SHiRA indices out of range for a {out_features}x{in_features} weight")
    return rows * in_features + cols


# --- writing -------------------------------------------------------------------------------------


def save_shira_folder(
    root: nn.Module, layers: dict, config: SpftConfig, folder: PathLike, *, dtype: Optional[torch.dtype], write: bool
) -> str:
    """``save_adapter(..., format="peft")`` (see the module docstring); returns the folder.
    ``write``: whether this process writes (rank 0 under torch.distributed)."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    if folder.endswith(".safetensors") or os.path.isfile(folder):
        raise ValueError(f"save_adapter(format='peft'): {folder!r} must be a folder (peft adapters are folders)")
    with torch.no_grad():
        flat = {name: _layer_entries(name, layer) for name, layer in layers.items()}
        shapes = {name: (layer.out_features, layer.in_features, flat[name][0].numel()) for name, layer in layers.items()}
        rank = shira_rank(shapes)
        tensors, described = {}, {}
        for name, layer in layers.items():
            kind = layer.shira_kind
            positions, values = flat[name]
            out_features, in_features, count = shapes[name]
            per_position = kind_class(kind).entries_per_position((out_features, in_features), {})
            fingerprinted = fingerprint(layer, positions)  # W0 at the entries (rows: whole rows, row-major)
            total = out_features * in_features
            padding = _padding(positions, total, rank * (out_features + in_features) - count)
            positions = torch.cat([positions, padding]).cpu()
            values = cast_values(name, "values", values, dtype)
            values = torch.cat([values, values.new_zeros(padding.numel())])
            rows = torch.div(positions, in_features, rounding_mode="floor")
            tensors[f"{PEFT_PREFIX}{name}.{_INDICES}"] = torch.stack([rows, positions - rows * in_features]).to(torch.int32)
            tensors[f"{PEFT_PREFIX}{name}.{_WEIGHT}"] = values.contiguous()
            described[name] = {
                "kind": kind, "shape": [out_features, in_features], "count": count // per_position,
                "weight_dtype": dtype_name(layer.weight.dtype), "fingerprint": fingerprinted,
            }
        saved = saved_module_tensors(root, config.modules_to_save, tensors, PEFT_PREFIX)
    metadata = {
        "format": "pt",  # what peft's own files say
        "spft_format": SPFT_IN_PEFT,
        "spft_format_version": "1",
        "spft_config": config.to_json(),
        "spft_layers": json.dumps(described, sort_keys=True, separators=(",", ":")),
        "spft_saved_modules": json.dumps(saved, sort_keys=True, separators=(",", ":")),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    peft_config = {
        "peft_type": "SHIRA",
        "r": rank,
        "mask_type": "random",  # peft's only named mask; the file's indices replace the mask on load
        "random_seed": None,
        "target_modules": sorted(layers),  # whole qualified names: peft matches them exactly
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": sorted(saved) or None,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": name_or_path(root),
        "revision": None,
    }
    if write:
        os.makedirs(folder, exist_ok=True)
        replace_atomically(os.path.join(folder, PEFT_TENSORS), lambda target: save_file(tensors, target, metadata=metadata))
        replace_atomically(os.path.join(folder, CONFIG_FILE), lambda target: write_json(target, peft_config))
    return folder


# --- reading -------------------------------------------------------------------------------------


def read_shira_folder(folder: str, peft_config: dict, root: nn.Module) -> _Adapter:
    """A peft SHiRA folder as an adapter ``load_adapter`` installs; raises ``ValueError`` naming
    the folder and the problem. Shapes come from ``root`` (peft's files do not store them)."""
    path = os.path.join(folder, PEFT_TENSORS)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise ValueError(
                f"{folder}: the SHiRA adapter is a pickled adapter_model.bin; spft reads safetensors only (save it "
                "with peft's default safe_serialization=True)"
            )
        raise FileNotFoundError(f"no {PEFT_TENSORS} in the peft adapter folder {folder!r}")
    metadata, tensors = read_safetensors(path, "safetensors file")
    ours = metadata.get("spft_format") == SPFT_IN_PEFT
    if ours and metadata.get("checksum") != _checksum(metadata, tensors):
        raise ValueError(f"{path}: checksum mismatch: the file is corrupted or was modified after spft wrote it")
    stray = [key for key in tensors if not key.startswith(PEFT_PREFIX)]
    if stray:
        raise ValueError(f"{path}: tensors outside {PEFT_PREFIX!r}: {stray[:3]}")
    tensors = {key[len(PEFT_PREFIX):]: tensor for key, tensor in tensors.items()}
    names = sorted({key.rpartition(".")[0] for key in tensors if key.rpartition(".")[2] in (_WEIGHT, _INDICES)})
    if ours:
        try:
            described = loads_json(metadata["spft_layers"])
            config = SpftConfig.from_json(metadata["spft_config"])
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{path}: bad spft metadata: {error}") from None
        if not isinstance(described, dict) or sorted(described) != names:
            raise ValueError(f"{path}: the spft metadata does not describe the file's layers")
    rank = _config_rank(folder, peft_config)
    modules = dict(root.named_modules())
    layers = {}
    for name in names:
        where = f"{path}: layer {name!r}"
        entry = described[name] if ours else None
        layers[name] = _read_layer(where, tensors.pop(f"{name}.{_WEIGHT}", None), tensors.pop(f"{name}.{_INDICES}", None),
                                   modules.get(name), entry, rank)
    saved = _saved_modules(path, peft_config.get("modules_to_save"), tensors, root)
    if not ours:
        count = sum(record.count for record in layers.values())
        method = "sparta" if peft_config.get("mask_type") == "random" else "speft"
        config = SpftConfig(method=method, num_params=max(count, 1), target_modules=names or None,
                            modules_to_save=sorted(saved) or None)
    return _Adapter(folder, config, layers, saved)


def _config_rank(folder: str, peft_config: dict) -> int:
    """The folder's ``r`` (peft's ``ShiraConfig`` default, 32, when the config has none)."""
    rank = peft_config.get("r", 32)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{folder}: adapter_config.json: r must be a positive integer, got {rank!r}")
    return rank


def _read_layer(where: str, values, indices, module, entry: Optional[dict], rank: int) -> StoredLayer:
    if values is None or indices is None:
        raise ValueError(f"{where}: needs both {_WEIGHT} and {_INDICES}")
    if not isinstance(module, nn.Linear):
        found = "not in the model" if module is None else f"a {type(module).__name__} in the model, not a linear layer"
        raise ValueError(f"{where} is {found}; the adapter was made for another architecture")
    out_features, in_features = module.out_features, module.in_features
    if values.dim() != 1 or values.dtype not in VALUE_DTYPES:
        raise ValueError(f"{where}: {_WEIGHT} must be a 1-D float tensor, got {dtype_name(values.dtype)} {tuple(values.shape)}")
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != values.numel():
        raise ValueError(f"{where}: {_INDICES} must have shape (2, {values.numel()}), got {tuple(indices.shape)}")
    # peft builds every layer with exactly r*(in+out) entries and refuses a file with another count:
    # a folder for a smaller model (in-range indices, too few entries) must not load here either.
    if values.numel() != rank * (out_features + in_features):
        raise ValueError(
            f"{where}: holds {values.numel()} entries, but SHiRA with r={rank} has r*(in+out) = "
            f"{rank * (out_features + in_features)} for this model's {out_features}x{in_features} layer (peft refuses "
            "it too): the adapter was made for a model of another size"
        )
    if indices.is_floating_point() and not bool((indices == indices.round()).all()):  # float32 on Windows
        raise ValueError(f"{where}: {_INDICES} holds non-integer values")
    flat = shira_flat(where, indices, out_features, in_features)
    weight_dtype = dtype_name(module.weight.dtype)
    if entry is None:  # a folder peft wrote: every entry trains, nothing to check the base against
        return StoredLayer(universal_kind().kind, (out_features, in_features), weight_dtype, None, flat, {"delta": values})
    return _described_layer(where, entry, flat, values)


def _described_layer(where: str, entry: dict, flat: torch.Tensor, values: torch.Tensor) -> StoredLayer:
    """The layer spft saved: its real entries first (``count`` positions of its kind), then zero
    padding; anything else is refused rather than silently dropped."""
    try:
        kind, shape, count = entry["kind"], tuple(entry["shape"]), entry["count"]
        weight_dtype, digest = entry["weight_dtype"], entry["fingerprint"]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: incomplete spft metadata {entry!r}") from None
    try:
        cls = kind_class(kind)
    except ValueError:
        cls = None
    if (cls is None or cls.shira_kind != kind or isinstance(count, bool) or not isinstance(count, int) or count < 0
            or len(shape) != 2):
        raise ValueError(f"{where}: bad spft metadata kind={kind!r}, count={count!r}, shape={shape!r}")
    real = count * cls.entries_per_position(shape, {})
    if real > values.numel() or bool(values[real:].any()):
        raise ValueError(f"{where}: the entries after the first {real} must be zero padding")
    positions, values = cls.from_entries(where, count, shape, flat[:real], values[:real])
    return StoredLayer(kind, shape, weight_dtype, digest, positions, values)


def _saved_modules(path: str, patterns, tensors: dict, root: nn.Module) -> dict:
    """``{module: {key: tensor}}`` for the remaining tensors, each under a module that
    ``modules_to_save`` names (peft's task types list heads, e.g. ``classifier`` and ``score``,
    of which a model has one: patterns matching nothing are skipped)."""
    names = []
    for pattern in patterns or []:
        try:
            names += saved_module_names(root, [pattern])
        except ValueError:
            continue
    saved = {}
    for key in sorted(tensors):
        owner = max((n for n in names if key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            raise ValueError(f"{path}: unexpected tensor {PEFT_PREFIX + key!r} (neither SHiRA nor a module to save)")
        saved.setdefault(owner, {})[key[len(owner) + 1:]] = tensors[key]
    return saved
