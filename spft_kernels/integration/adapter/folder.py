"""Adapter folders, peft-style: where ``save_adapter`` writes and what ``load_adapter`` reads.

- ``save_adapter(model, "x.safetensors")`` (or an existing file) writes that single file, as
  before.
- ``save_adapter(model, "folder")`` (any other path) writes a folder, like peft: the tensors as
  ``folder/spft_adapter.safetensors`` (the file a directory always got, so folders written
  before still load) and ``folder/adapter_config.json`` beside them: ``{"format":
  "spft_adapter", "format_version": 1, "adapter_file": "spft_adapter.safetensors",
  "base_model_name_or_path": ..., "config": {SpftConfig}}``. The tensors file stays the source of
  truth (its metadata holds the config, fingerprints and checksum); the JSON is for people and
  tools, and a JSON that disagrees with it is refused on load.
- ``save_adapter(model, "folder", format="peft")``: peft's SHiRA folder (``peft_shira.py``).

``load_adapter`` reads a file, a folder of either layout, a folder without ``adapter_config.json``
(written before it existed), and a peft SHiRA folder (``adapter_config.json`` with
``"peft_type": "SHIRA"``), or its ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch.nn as nn

from ..config import SpftConfig
from .files import ADAPTER_FILE, CONFIG_FILE, fs_path, name_or_path, PathLike, PEFT_TENSORS, read_config
from .files import replace_atomically, write_json
from .format import FORMAT, FORMAT_VERSION
from .peft_shira import read_shira_folder
from .read import _Adapter, read_adapter

SAVE_FORMATS = ("spft", "peft")


def save_target(path: PathLike) -> tuple[str, Optional[str]]:
    """``(tensors file, folder or None)`` for ``save_adapter(model, path)``: a folder unless the
    path ends in ``.safetensors`` or is an existing file."""
    path = fs_path(path)
    if os.path.isdir(path) or not (path.endswith(".safetensors") or os.path.isfile(path)):
        return os.path.join(path, ADAPTER_FILE), path
    return path, None


def write_folder_config(folder: str, config: SpftConfig, root: nn.Module) -> None:
    """``adapter_config.json`` beside the tensors file (module docstring), written atomically."""
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_file": ADAPTER_FILE,
        "base_model_name_or_path": name_or_path(root),
        "config": config.to_dict(),
    }
    replace_atomically(os.path.join(folder, CONFIG_FILE), lambda target: write_json(target, data))


def read_any_adapter(path: PathLike, root: nn.Module) -> _Adapter:
    """The adapter at ``path`` (a file or a folder of any layout above), checked, without touching
    ``root`` (it gives a peft folder's layer shapes)."""
    path = fs_path(path)
    if os.path.isfile(path):  # a file; peft's adapter_model.safetensors stands for its folder
        folder = os.path.dirname(path) or "."
        config_path = os.path.join(folder, CONFIG_FILE)
        if os.path.basename(path) == PEFT_TENSORS and os.path.isfile(config_path):
            data = read_config(config_path)
            if "peft_type" in data:
                return _read_peft_folder(folder, data, root)
        return read_adapter(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return read_adapter(path)  # a folder written before adapter_config.json, or nothing there
    data = read_config(config_path)
    if "peft_type" in data:
        return _read_peft_folder(path, data, root)
    if data.get("format") != FORMAT:
        raise ValueError(f"{config_path}: neither an spft adapter config nor a peft one (format={data.get('format')!r})")
    adapter = read_adapter(os.path.join(path, ADAPTER_FILE))
    if data.get("config") != json.loads(adapter.config.to_json()):
        raise ValueError(
            f"{config_path}: its config disagrees with {ADAPTER_FILE} (edited after saving?); the tensors file is "
            "the source of truth: restore the JSON or delete it"
        )
    return adapter


def _read_peft_folder(folder: str, data: dict, root: nn.Module) -> _Adapter:
    if data["peft_type"] != "SHIRA":
        raise ValueError(
            f"{folder}: a peft {data['peft_type']} adapter; spft loads peft's sparse adapters (SHiRA) only "
            "(load this one with peft, or merge it into the base with peft's merge_and_unload first)"
        )
    return read_shira_folder(folder, data, root)
