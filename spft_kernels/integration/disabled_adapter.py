"""``disable_adapter()``: a context in which a converted model computes its base model exactly, as
peft's ``PeftModel.disable_adapter()`` does (TRL's DPO uses it for the reference log-probs).

Inside it every spft layer computes ``F.linear(x, W0, b)``, the forward of the ``nn.Linear`` it
was built on, so the outputs are bitwise the base model's. Nothing of the layer changes: its
forward is replaced on the instance for the duration and put back after, and no tensor is
written. That matters in merged mode, where the weight holds ``W0 + Δ``: unmerging and merging
again would be exact, but both write into the weight, and a forward of the policy whose backward
is still pending (DPO computes the policy, then the reference, then the loss's backward) saved
that weight: its backward would fail on the version counter. A merged layer therefore computes
with a temporary W0 of its own size (the weight with W0 written back where the layer keeps it
aside, ``SpftLayer.w0_at``): one layer's weight at a time, freed after its forward under
``no_grad``. Split-mode layers (and kinds that never write W0) read their weight as it is.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .surgery import unwrap_model, spft_layers

_NO_FORWARD = object()


def base_weight(layer: nn.Module) -> torch.Tensor:
    """W0 of an spft layer as the linear it was built on held it (before any dynamic-mask fold):
    the weight itself when it holds W0 everywhere, else a new tensor of its size with W0 written
    back where the layer keeps it aside."""
    weight = layer.base_kind.weight_for_ops(layer)
    if weight is None:
        raise NotImplementedError(
            f"{layer.layer_name}: its frozen base ({layer.base_kind.name}) computes its own term, so it has no dense "
            "W0 to run the base model with"
        )
    kept, folded = (_nonempty(held) for held in (layer.kept_w0(), layer.folded_w0()))
    if folded is None and kept is None:
        return weight
    if folded is None:  # a merged layer: W0 at its positions is what it keeps aside
        flat, values = kept
    else:  # the original W0 where a dynamic mask folded values into the weight (and where merged)
        flat = torch.cat([held[0] for held in (kept, folded) if held is not None]).unique()
        values = layer.w0_at(flat, original=True)
    flat = flat.to(weight.device)
    rows = torch.div(flat, layer.in_features, rounding_mode="floor")
    base = weight.detach().clone()  # the layer's own weight is never written
    base[rows, flat - rows * layer.in_features] = values.to(device=base.device, dtype=base.dtype)
    return base


def _nonempty(held):
    return held if held is not None and held[0].numel() else None


def _base_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, base_weight(layer), layer.bias)


@contextlib.contextmanager
def layers_disabled(model: nn.Module):
    """Every spft layer of ``model`` computes its base linear inside the context (module
    docstring); on exit each layer's own forward is back (an instance ``forward`` another tool put
    there, e.g. accelerate's hooks, included). Nested contexts are fine."""
    layers = [layer for layer in spft_layers(unwrap_model(model)).values() if not _is_disabled(layer)]
    previous = []
    try:
        for layer in layers:
            previous.append((layer, layer.__dict__.get("forward", _NO_FORWARD)))
            layer.forward = types.MethodType(_base_forward, layer)
        yield model
    finally:
        for layer, forward in previous:
            if forward is _NO_FORWARD:
                del layer.forward
            else:
                layer.forward = forward


def _is_disabled(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _base_forward
