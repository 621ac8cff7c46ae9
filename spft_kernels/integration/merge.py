"""The way back to plain linears: ``merge_and_unload`` (W0 + Δ folded into the weights, or PST's
pruned weight) and ``unload`` (W0 exactly, the deltas dropped)."""

from __future__ import annotations

import gc
import warnings

import torch.nn as nn

from ..masks.targets import weight_sharers
from ..ops._guards import builds_state
from .surgery import _finish_unload, plain_linear, set_submodule, spft_layers, unwrap_model


@builds_state
def merge_and_unload(model: nn.Module, *, return_report: bool = False, requantize: bool = False):
    """Replace every spft layer with a plain ``nn.Linear`` holding ``W0 + Δ`` and return the model
    (the same object): bitwise the layer's ``merged_weight()`` (fp32 sum, rounded once to the
    weight's dtype), written in place into the layer's own weight tensor (O(nnz); no copy of the
    weight, except where the layer's frozen base refuses merging: a flat-entries layer on a
    non-contiguous weight, a weight another module shares (a tied LM head: the new linear gets
    its own weight, and the embedding keeps W0) and an inference tensor weight, which get a new
    one).
    The original ``requires_grad`` flags come back; ``modules_to_save`` keep their trained values.

    A ``PSTLinear`` becomes its pruned linear ``(W0 + βUV) ⊙ M`` (``to_linear``: new tensors) at
    the sparsity the layer holds now, which need not be ``config.sparsity`` (e.g. a run stopped
    before the schedule reached it): it exports what it has. ``return_report=True`` returns
    ``(model, {name: PSTLinear.sparsity_report()})`` (achieved ``mask_sparsity``,
    ``weight_sparsity``, ...; empty for the other methods) so that this can be checked.

    A layer on a quantized base (bitsandbytes 4-bit / 8-bit) cannot hold W0 + Δ in its weight: it
    becomes a dense ``nn.Linear`` holding ``dequant(Wq) + Δ`` in the compute dtype (new tensors),
    and a ``UserWarning`` says so with the bytes it adds. ``requantize=True`` quantizes that
    weight again with the base's own settings (a bitsandbytes layer again; the rounding to 4 or 8
    bits then absorbs much of a small delta: keep the dense model, or the adapter, to be exact).

    Raises ``RuntimeError``, before any layer changes, while a state dict that shares the weight
    of a layer merged in place is alive (it holds W0 from that weight, nn/w0_loan.py)."""
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("merge_and_unload: the model has no sparse fine-tuning layers")
    reports, densified = {}, {}
    shared = weight_sharers(root, list(layers))
    in_place = {name for name, layer in layers.items() if _merges_in_place(name, layer, shared)}
    _refuse_lent_weights(layers, in_place)  # before any layer changes: never a half-merged model
    for name, layer in layers.items():
        if name not in in_place:
            layer.unmerge()  # W0 back in the weight (a layer merged by hand on a shared weight)
            linear, report = layer.export()  # new tensors: a shared weight keeps W0
            if report is not None:
                reports[name] = report  # (PST: what the pruned weight holds)
            if layer.base_kind.weight_for_ops(layer) is None:  # a quantized base: dense now, or again quantized
                if requantize:
                    linear = layer.base_kind.requantize(layer, linear)
                else:
                    densified[name] = (layer.base_kind.name, linear.weight.nbytes - layer.weight.nbytes)
        else:
            layer.merge()  # W0 + Δ in the weight, rounded once; a stale merge re-syncs first
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = layer.weight
            if layer.bias is not None:
                linear.bias = layer.bias
        set_submodule(root, name, linear)
    _finish_unload(root)
    if densified:
        kinds = sorted({kind for kind, _ in densified.values()})
        grown = sum(extra for _, extra in densified.values())
        warnings.warn(
            f"merge_and_unload: {len(densified)} layer(s) on a quantized base ({', '.join(kinds)}) are now dense "
            f"nn.Linear holding dequant(Wq) + delta in their compute dtype ({grown / 2**20:.1f} MiB more than the "
            "quantized weights); pass requantize=True to quantize them again",
            stacklevel=2,
        )
    return (model, reports) if return_report else model


def _merges_in_place(name: str, layer: nn.Module, shared) -> bool:
    """Whether ``merge_and_unload`` writes W0 + Δ into the layer's own weight (else: new tensors)."""
    return layer.writes_w0 and name not in shared and layer.base_kind.merge_refusal(layer) is None


def _refuse_lent_weights(layers: dict, in_place: set) -> None:
    """A live state dict that shares a layer's weight (holding W0 for it, nn/w0_loan.py) would see
    W0 + Δ after an in-place merge: refused, for every such layer at once, before anything changes."""
    lent = [name for name in in_place if layers[name].w0_lent]
    if lent:
        gc.collect()  # a state dict caught in a reference cycle
        lent = [name for name in lent if layers[name].w0_lent]
    if lent:
        raise RuntimeError(
            f"merge_and_unload: a state dict of {len(lent)} layer(s) ({', '.join(lent[:3])}"
            f"{', ...' if len(lent) > 3 else ''}) is still alive and shares their weights, which hold W0 for it; "
            "merging writes W0 + delta into those weights. Delete it (or copy its tensors) first; nothing was changed"
        )


@builds_state
def unload(model: nn.Module) -> nn.Module:
    """Undo ``get_spft_model``: every spft layer becomes the plain ``nn.Linear`` it was built on,
    holding W0 exactly (its own tensors), and the original ``requires_grad`` flags come back. The
    deltas are dropped (save them first); ``modules_to_save`` keep their trained values. After
    dynamic-mask updates W0 is the folded weight (``SparseDeltaLinear.fold_delta``)."""
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("unload: the model has no sparse fine-tuning layers")
    for name, layer in layers.items():
        set_submodule(root, name, plain_linear(layer))
    _finish_unload(root)
    return model
