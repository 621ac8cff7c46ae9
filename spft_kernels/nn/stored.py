"""One layer of an adapter as it is stored: what a position kind writes into an adapter file and
reads back (``docs/architecture.md``, "Position kinds"). The adapter code in ``integration/``
handles the file (metadata, checksum, fingerprints, the model); the kind handles its own tensors:
their names, dtypes, shapes and the encoding of its positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

Tensor = torch.Tensor

# The dtypes trained values may be stored in.
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class AdapterPayload:
    """What a layer puts into an adapter file: ``values`` (its trained tensors by label, e.g.
    ``{"delta": ...}``; the writer may cast them to a smaller float dtype), ``positions`` (its
    position tensors by label, written as they are) and ``fields`` (JSON-able entries of the
    layer's metadata beside the common ``kind``/``shape``/``weight_dtype``/``fingerprint``)."""

    values: dict
    positions: dict
    fields: dict
    canonical: Optional[Tensor] = None  # the positions as written, canonical (for the fingerprint)


@dataclasses.dataclass
class StoredLayer:
    """One layer of an adapter, read and checked without a model: ``positions`` in the kind's
    canonical form as stored (CPU; None for a kind without positions), ``values`` by label, and
    ``options`` (the kind's construction options, e.g. ``{"block_size": (8, 8)}``)."""

    kind: str
    shape: tuple
    weight_dtype: str
    fingerprint: Optional[str]
    positions: Optional[Tensor]
    values: dict
    options: dict = dataclasses.field(default_factory=dict)
    shared_with: Optional[str] = None  # loading: another module holds the weight, so never merge into it
    base: Optional[dict] = None  # the frozen base's description beyond shape and dtype (a quantization)

    @property
    def count(self) -> int:
        """Trainable values."""
        return sum(value.numel() for value in self.values.values())

    def replace(self, **changes: Any) -> "StoredLayer":
        return dataclasses.replace(self, **changes)


def expect_tensor(key: str, tensor: Tensor, dtypes: tuple, shape: tuple) -> None:
    """``ValueError`` naming ``key`` unless ``tensor`` has one of ``dtypes`` and ``shape``."""
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        raise ValueError(
            f"adapter tensor {key!r} must be {'/'.join(dtype_name(d) for d in dtypes)} of shape {shape}, got "
            f"{dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        )


def take_tensors(where: str, name: str, tensors: dict, labels) -> dict:
    """``{label: tensor}`` of ``<name>.<label>`` for every label; ``ValueError`` listing the
    missing ones."""
    keys = {label: f"{name}.{label}" for label in labels}
    missing = [key for key in keys.values() if key not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}")
    return {label: tensors[key] for label, key in keys.items()}
