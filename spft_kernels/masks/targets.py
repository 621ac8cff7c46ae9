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
    if not found:
        raise ValueError(
            f"no linear layer matches target_modules={target_modules!r}"
            + (" with exclude_attention=True" if exclude_attention else "")
            + f" in {type(model).__name__}"
        )
    return found
