"""``model.save_pretrained(d)`` on a converted model, and the merged alternative.

A converted model is the transformers model itself (its class is unchanged), so without this its
``save_pretrained`` would be transformers': the weights W0 plus ``.delta``/positions keys that
``AutoModelForCausalLM.from_pretrained(d)`` drops with a table of "unexpected" keys, silently
giving the base model back. Two conventions are at hand, and this package follows peft's,
since ``get_spft_model`` is its ``get_peft_model``:

- ``model.save_pretrained(d)`` writes the adapter folder, as ``PeftModel.save_pretrained`` does:
  ``d/spft_adapter.safetensors`` + ``d/adapter_config.json`` (``save_adapter``'s folder; an
  adapter of a few MB, not the base), other named adapters in ``d/<name>/`` as peft places them.
  Load it with ``spft.load_adapter(AutoModelForCausalLM.from_pretrained(base), d)`` (or
  ``model.load_adapter(d, adapter_name=...)``). ``AutoModelForCausalLM.from_pretrained(d)``
  fails loudly on such a folder (transformers hands ``adapter_config.json`` to peft, which
  refuses it) instead of returning the base. ``format="peft"`` writes peft's SHiRA folder, which
  ``peft.PeftModel.from_pretrained(base, d)`` loads exactly; not transformers'
  ``AutoModelForCausalLM.from_pretrained(d)``, which (transformers 5.24, peft 0.21) drops SHiRA's
  ``shira_indices`` as "unexpected" keys and computes something else (logits off by 0.29 on a
  2-block Llama).
- ``model.save_pretrained_merged(d)`` is the explicit other path: the class's own
  ``save_pretrained`` with ``W0 + Δ`` (PST: its pruned weight) in place of each layer's weight,
  which ``from_pretrained(d)`` reloads as the trained model, for serving; the converted model is
  unchanged (peft's way, ``merge_and_unload().save_pretrained(d)``, consumes the adapter).

transformers' ``Trainer`` saves through ``model.save_pretrained`` (its final ``save_model()`` and
every checkpoint), so a plain ``Trainer`` writes the adapter folder too; resuming from such a
checkpoint needs ``SpftTrainer`` (or ``SpftTrainerMixin``), which reads it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..masks.targets import weight_sharers
from .adapter.files import ADAPTER_FILE, fs_path, PathLike
from .adapter.save import save_adapter, write_contents
from .named_adapters import aside_adapter, adapter_store, DEFAULT_ADAPTER
from .surgery import spft_layers, unwrap_model


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    selected_adapters: Optional[Sequence[str]] = None,
    format: str = "spft",
    dtype: Optional[torch.dtype] = None,
    is_main_process: bool = True,
    state_dict: Optional[dict] = None,
    safe_serialization: bool = True,
    **unsupported,
) -> str:
    """Write the model's adapters as peft does (module docstring): the "default" adapter into
    ``save_directory``, every other into ``save_directory/<name>``; ``selected_adapters`` limits
    them. ``format`` and ``dtype`` are ``save_adapter``'s (for the active adapter; the others are
    written as they were kept, fp32). ``state_dict`` (what transformers' ``Trainer`` passes) is
    not used: the adapter is read from the layers. Returns ``save_directory``."""
    if unsupported:
        raise TypeError(
            f"save_pretrained of a converted model writes its adapter folder and takes no {sorted(unsupported)}; "
            "for the merged weights with transformers' options use model.save_pretrained_merged(...)"
        )
    if not safe_serialization:
        raise ValueError("save_pretrained: adapters are written as safetensors only (safe_serialization=True)")
    root = unwrap_model(model)
    store = adapter_store(root)
    names = store.names if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in store.names]
    if unknown or not names:
        raise ValueError(f"save_pretrained: selected_adapters {names} must name some of the model's adapters {store.names}")
    if (format != "spft" or dtype is not None) and names != [store.active]:
        raise ValueError(
            f"save_pretrained: format={format!r} and dtype={dtype} apply to the active adapter {store.active!r} only "
            f"(the others are kept as spft files in fp32); pass selected_adapters=[{store.active!r}]"
        )
    directory = fs_path(save_directory)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not is_main_process and not distributed:  # (under torch.distributed save_adapter picks rank 0)
        return directory
    for name in names:
        folder = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
        if name == store.active:
            save_adapter(root, folder, dtype=dtype, format=format)
        elif not distributed or torch.distributed.get_rank() == 0:
            aside = aside_adapter(root, name)
            write_contents(os.path.join(folder, ADAPTER_FILE), folder, aside.tensors, aside.metadata, aside.config, root)
    return directory


def save_pretrained_merged(model: nn.Module, save_directory: PathLike, **kwargs) -> None:
    """Save the trained model as ordinary weights that ``from_pretrained`` loads without this
    package: the model class's own ``save_pretrained`` (``kwargs`` are its options) with each spft
    layer's weight replaced by ``W0 + Δ`` (the weight ``merge_and_unload`` gives: fp32 sum rounded
    once; PST: its pruned weight) and its adapter tensors left out. The model is unchanged. Needs
    memory for one copy of the converted layers' weights while it runs. A layer whose weight
    another module shares (a tied LM head) is refused: one merged tensor cannot hold the two."""
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("save_pretrained_merged: the model has no sparse fine-tuning layers")
    shared = weight_sharers(root, list(layers))
    if shared:
        name, other = next(iter(shared.items()))
        raise ValueError(
            f"save_pretrained_merged: layer {name!r} shares its weight with {other!r} (tied weights): saved merged, "
            "the two would be one tensor again on loading and the delta would be lost or applied twice; save the "
            "adapter (model.save_pretrained) or untie the weights first"
        )
    save = getattr(type(root), "save_pretrained", None)
    if save is None:
        raise ValueError(f"save_pretrained_merged: {type(root).__name__} has no save_pretrained (not a transformers model)")
    state = root.state_dict()
    for name, layer in layers.items():
        for key in [key for key in state if key.startswith(name + ".")]:
            del state[key]
        linear, _ = layer.export()  # new tensors: the layer keeps its state
        for key, tensor in linear.state_dict().items():
            state[f"{name}.{key}"] = tensor.detach()
    save(root, fs_path(save_directory), state_dict=state, **kwargs)
