"""File-system helpers shared by the adapter writers and readers: paths, atomic replacement,
writability checks, JSON and safetensors reading."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Callable, Optional, Union

import torch.nn as nn

from ..json_input import loads_json

PathLike = Union[str, bytes, os.PathLike]

ADAPTER_FILE = "spft_adapter.safetensors"  # the tensors file's name when a directory is given
CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"  # peft's tensors file in its adapter folders


def fs_path(path: PathLike) -> str:
    """``path`` as a ``str`` (``bytes`` and ``os.PathLike`` decoded as ``os.fsdecode`` does), so
    that messages and derived names (temporary files) never show ``b'...'``."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ValueError(f"adapter path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def resolve_path(path: PathLike) -> str:
    """A ``str`` path (``fs_path``); a directory gets the default file name."""
    path = fs_path(path)
    return os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path


def name_or_path(root: nn.Module) -> Optional[str]:
    """The model's ``name_or_path`` (transformers' config), recorded in adapter configs."""
    name = getattr(getattr(root, "config", None), "_name_or_path", None) or getattr(root, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def write_json(target: str, data: dict) -> None:
    with open(target, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def replace_atomically(target: str, write: Callable[[str], None]) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file.
    The temporary file is made by ``tempfile.mkstemp`` beside the target: an unpredictable name,
    created exclusively (an existing name, a planted symlink included, is never opened), so the
    write cannot be redirected; it gets the mode a new file would get (``0o666`` less the umask).
    safetensors' write errors become ``OSError`` (what users catch for I/O failures)."""
    from safetensors import SafetensorError

    directory, name = os.path.split(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        try:
            if hasattr(os, "fchmod"):  # POSIX (mkstemp's 0o600 would hide the adapter from the group)
                os.fchmod(handle, 0o666 & ~_umask())
        finally:
            os.close(handle)
        write(temporary)
        os.replace(temporary, target)
    except SafetensorError as error:
        raise OSError(f"save_adapter: could not write {target!r}: {error}") from error
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def _umask() -> int:
    """The process umask (readable only by setting it: briefly the restrictive 0o077)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


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
            data = loads_json(handle.read())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable adapter config: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an adapter config must be a JSON object")
    return data


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
