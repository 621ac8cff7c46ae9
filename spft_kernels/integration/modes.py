"""``set_mode``: switch every spft layer of a model to another execution mode, all or nothing."""

from __future__ import annotations

import torch.nn as nn

from ..nn.delta_layer import MODES
from .surgery import spft_layers, unwrap_model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every sparse fine-tuning layer of ``model`` in ``mode`` (``"auto"``, ``"merged"``,
    ``"split"``, ``"fused"``) and return the model. Every layer is checked first (a kind without
    ``mode``, a base that cannot merge), so an error leaves the model unchanged. Leaving merged
    mode unmerges at once (W0 back in the weights, exactly): call ``set_mode(model, "split")``
    before sharding a trained or loaded model with FSDP2 or DeepSpeed ZeRO-3. Kinds that never
    write into W0 (PST) compute one way and are left as they are."""
    if mode not in MODES:
        raise ValueError(f"set_mode: unknown mode {mode!r}; choose one of {MODES}")
    layers = spft_layers(unwrap_model(model))
    if not layers:
        raise ValueError("set_mode: the model has no sparse fine-tuning layers (convert it with get_spft_model)")
    writing = [layer for layer in layers.values() if layer.writes_w0]
    for layer in writing:
        refusal = layer.mode_refusal(mode)
        if refusal is not None:
            raise ValueError(f"set_mode: {refusal} (nothing was changed)")
    for layer in writing:
        layer.set_mode(mode)
    return model
