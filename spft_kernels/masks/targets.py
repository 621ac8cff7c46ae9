"""Which linear layers of a model sparse fine-tuning targets (shared by mask selection, row
importance and model conversion).

Rules, as peft users expect them:

- ``target_modules=None``: every ``nn.Linear`` inside the repeated transformer blocks, i.e. whose
  qualified name has a numeric component (``model.layers.3.mlp.up_proj``,
  ``bert.encoder.layer.0.attention.self.query``); never embeddings, the LM head or a
  classification head, which sit outside the blocks.
- a list of names: a module matches when its qualified name equals an entry or ends with
  ``"." + entry`` (``["q_proj", "v_proj"]``);
- a string: a regular expression that must match the whole qualified name.

``exclude_attention=True`` drops every module under an attention block (a name component
containing "attn" or "attention"): SPruFT's "FA" setting, which tunes only the MLP layers.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

TargetModules = Optional[Union[str, Sequence[str]]]

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def _in_repeated_block(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


def _is_attention(name: str) -> bool:
    return any(_ATTENTION.search(part) for part in name.split("."))


def matches_target(name: str, target_modules: TargetModules) -> bool:
    if target_modules is None:
        return _in_repeated_block(name)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_target_linears(
    model: nn.Module,
    target_modules: TargetModules = None,
    *,
    exclude_attention: bool = False,
    linear_types: tuple = (nn.Linear,),
) -> dict[str, nn.Module]:
    """``{qualified_name: module}`` of the targeted linear layers, in ``named_modules`` order.

    Raises ``ValueError`` when nothing matches, naming what was asked for, so that a typo in
    ``target_modules`` is not silently a no-op.
    """
    found = {
        name: module
        for name, module in model.named_modules()
        if name
        and isinstance(module, linear_types)
        and matches_target(name, target_modules)
        and not (exclude_attention and _is_attention(name))
    }
    if not found and linear_types != (nn.Linear,):
        _require_layers_of(model, linear_types)
    if not found:
        raise ValueError(
            f"no linear layer matches target_modules={target_modules!r}"
            + (" with exclude_attention=True" if exclude_attention else "")
            + f" in {type(model).__name__}"
        )
    return found


def _require_layers_of(model: nn.Module, linear_types: tuple) -> None:
    """A model with no layer of ``linear_types`` at all (e.g. no SparseDeltaLinear: not converted
    yet) gets that said, not "nothing matches target_modules" about its plain linears."""
    if any(isinstance(module, linear_types) for module in model.modules()):
        return
    wanted = " or ".join(t.__name__ for t in linear_types)
    plain = sum(type(module) is nn.Linear for module in model.modules())
    raise ValueError(
        f"{type(model).__name__} has no {wanted} layer (it has {plain} plain nn.Linear); convert it first, e.g. "
        "spft.get_spft_model(model, spft.SpftConfig(...)) or SparseDeltaLinear.from_linear for each target"
    )


# --- targets that are unsafe to convert -----------------------------------------------------------


def check_gradients_possible(who: str, metric: str) -> None:
    """Gradient metrics cannot run under ``torch.inference_mode`` (its tensors never record
    autograd), which would otherwise surface as "the loss does not depend on the weights"."""
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{who}: metric {metric!r} needs gradients, which torch.inference_mode disables; call it outside "
            "inference_mode (torch.no_grad around it is fine: gradients are enabled inside)"
        )


def check_materialised(who: str, modules) -> None:
    """A ``ValueError`` naming the first module whose weight is on the meta device (no values to
    score or to build on), instead of torch's ``.item()`` error deep inside."""
    for name, module in modules.items():
        if module.weight.device.type == "meta":
            raise ValueError(
                f"{who}: {name!r} has its weight on the meta device (no values); materialise the model first "
                "(e.g. load its weights, or model.to_empty(device=...) and load_state_dict)"
            )

# Containers that read a child linear's ``.weight`` (and ``.bias``) themselves instead of calling
# its forward, so a delta there would be silently ignored: nn.MultiheadAttention always reads
# out_proj (F.multi_head_attention_forward); nn.TransformerEncoderLayer's eval fast path
# (torch._transformer_encoder_layer_fwd, also taken by nn.TransformerEncoder) reads linear1,
# linear2 and self_attn.out_proj.
_WEIGHT_READERS = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}


def weight_reading_parent(model: nn.Module, name: str) -> Optional[str]:
    """Why the linear at ``name`` cannot be converted because its parent reads its weight itself
    (see ``_WEIGHT_READERS``), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for container, children in _WEIGHT_READERS.items():
        if isinstance(parent, container) and child in children:
            return (
                f"{name!r} is read directly by its parent {parent_name or '(the model)'!r}, an "
                f"nn.{container.__name__}, which uses {child}.weight itself (never {child}'s forward), so a "
                "delta there would be silently ignored; sparse fine-tuning cannot convert it"
            )
    return None


def _memory_span(tensor: torch.Tensor) -> Optional[tuple]:
    """``(storage key, first byte, end byte)`` of the memory a tensor can touch, or None for a
    tensor without memory of its own to compare (meta, empty, or a wrapper subclass)."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    try:
        storage = tensor.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - DTensor, fake and other wrapper tensors: identity is checked instead
        return None
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    return (tensor.device, storage), start, start + extent * size


def _overlap(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def weight_sharers(model: nn.Module, names) -> dict[str, str]:
    """``{name: other}`` for each module ``name`` whose weight is also a parameter or buffer of
    another module ``other`` anywhere in ``model``, or overlaps one in memory (tied embeddings, a
    module registered under two names, views of one storage), whatever that module's type."""
    holders = [
        (module_name, tensor, _memory_span(tensor))
        for module_name, module in model.named_modules(remove_duplicate=False)
        for tensor in list(module._parameters.values()) + list(module._buffers.values())
        if tensor is not None
    ]
    shared = {}
    for name in names:
        weight = model.get_submodule(name).weight
        span = _memory_span(weight)
        for other, tensor, other_span in holders:
            if other != name and (tensor is weight or _overlap(span, other_span)):
                shared[name] = other
                break
    return shared
