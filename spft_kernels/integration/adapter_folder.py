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
import stat
from typing import Callable, Optional

import torch.nn as nn

from .adapter_format import ADAPTER_FILE, FORMAT, FORMAT_VERSION, fs_path, PathLike
from .adapter_read import _Adapter, read_adapter
from .config import SpftConfig

SAVE_FORMATS = ("spft", "peft")
CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"  # peft's tensors file in its adapter folders


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
        "base_model_name_or_path": _name_or_path(root),
        "config": config.to_dict(),
    }
    _replace(os.path.join(folder, CONFIG_FILE), lambda target: _write_json(target, data))


def _name_or_path(root: nn.Module) -> Optional[str]:
    name = getattr(getattr(root, "config", None), "_name_or_path", None) or getattr(root, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _write_json(target: str, data: dict) -> None:
    with open(target, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _replace(target: str, write: Callable[[str], None]) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file.
    safetensors' write errors become ``OSError`` (what users catch for I/O failures)."""
    from safetensors import SafetensorError

    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, target)
    except SafetensorError as error:
        raise OSError(f"save_adapter: could not write {target!r}: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_writable(files: list, folder: Optional[str]) -> None:
    """Before anything is written: the directory of each file exists (or is the ``folder`` that
    will be made), and an existing file is a writable regular file: a read-only adapter is
    refused (``PermissionError``), never silently replaced by the rename."""
    if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"save_adapter: {folder!r} exists and is not a folder")
    for target in files:
        directory = os.path.dirname(os.path.abspath(target))
        if folder is None and not os.path.isdir(directory):
            raise FileNotFoundError(f"save_adapter: the directory {directory!r} does not exist (writing {target!r})")
        if not os.path.exists(target):
            continue
        mode = os.stat(target).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"save_adapter: {target!r} exists and is not a regular file")
        # No write bit at all, or none for this user (os.access alone says yes to root).
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(target, os.W_OK):
            raise PermissionError(
                f"save_adapter: {target!r} exists and is read-only; it is not overwritten (make it writable or "
                "choose another path)"
            )


def read_config(path: str) -> dict:
    """An ``adapter_config.json`` as a dict; ``ValueError`` if it is not a JSON object."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable adapter config: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an adapter config must be a JSON object")
    return data


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
    from .peft_shira import read_shira_folder  # here: peft_shira builds on this module's helpers

    return read_shira_folder(folder, data, root)
