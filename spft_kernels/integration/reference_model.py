"""The reference model of preference trainers (TRL's ``DPOTrainer``, ...) as the policy with its
adapter disabled, as peft users get it with ``ref_model=None``.

How TRL decides (trl 1.16, ``DPOTrainer``): with ``ref_model=None`` it computes the reference
log-probs under ``model.disable_adapter()`` only when accelerate's ``is_peft_model(model)`` holds,
i.e. ``isinstance(model, peft.PeftModel)``. A converted model is the transformers model itself
(``model_methods.py``), so TRL instead loads a second copy of the base from
``config._name_or_path`` (or fails when there is none). ``SpftTrainerMixin`` therefore passes a
``DisabledAdapterReference`` when ``ref_model`` is None: a module that runs the policy itself
inside ``disable_adapter()``, so the reference is the base model bitwise, with no second copy of
the weights, whatever the policy's mode (merged layers compute the base without writing their
weight, so the policy's pending backward is intact; ``disabled_adapter.py``).

The reference is the base model, as TRL's own reference is without peft (a fresh copy of the
base) and with peft when the adapter is new; for an adapter that was already trained (loaded)
when the trainer starts, pass ``ref_model`` yourself if the reference should be that adapter.
The policy's LM head must not be an spft layer: TRL's fused LM head reads ``lm_head.weight``
directly, never the layer's forward.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from .named_adapters import disable_adapter
from .surgery import spft_layers, unwrap_model


class DisabledAdapterReference(nn.Module):
    """The policy with its adapter disabled, as a reference model (module docstring). It holds the
    policy without registering it (no parameters of its own, so nothing is optimised, moved or
    wrapped twice) and hands every other attribute (``config``, ``base_model``,
    ``get_output_embeddings``, ...) to it; its state dict is the policy's (what TRL hashes to cache
    precomputed reference log-probs)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        policy = unwrap_model(policy)
        if not spft_layers(policy):
            raise ValueError("DisabledAdapterReference: the policy has no sparse fine-tuning layers")
        head = getattr(policy, "get_output_embeddings", lambda: None)()
        if head is not None and head in spft_layers(policy).values():
            raise ValueError(
                "DisabledAdapterReference: the policy's LM head is a sparse fine-tuning layer; TRL's fused LM head "
                "reads its weight directly (never the layer), so leave the head out of target_modules"
            )
        self.__dict__["policy"] = policy  # not a submodule

    def __call__(self, *args, **kwargs):
        with disable_adapter(self.__dict__["policy"]):
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.__dict__["policy"](*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.__dict__["policy"].state_dict(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            policy = self.__dict__.get("policy")
            if policy is None:
                raise
            return getattr(policy, name)


def with_disabled_adapter_reference(init, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for a trainer's ``init``: when it takes a ``ref_model`` that is None and
    its ``model`` is a converted model, the reference becomes ``DisabledAdapterReference(model)``;
    otherwise unchanged."""
    try:
        bound = inspect.signature(init).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs  # the trainer raises its own error for the call
    if "ref_model" not in inspect.signature(init).parameters or bound.arguments.get("ref_model") is not None:
        return args, kwargs
    model = bound.arguments.get("model")
    if not isinstance(model, nn.Module) or not spft_layers(model):
        return args, kwargs
    bound.arguments["ref_model"] = DisabledAdapterReference(model)
    return bound.args, bound.kwargs
