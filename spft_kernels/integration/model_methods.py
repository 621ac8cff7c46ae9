"""The peft-style methods of a converted model: ``model.save_pretrained``,
``model.print_trainable_parameters()``, ``model.merge_and_unload()``, ``model.disable_adapter()``,
... (``METHODS``), on the model itself.

``get_spft_model``, ``load_adapter``, ``from_peft`` and ``merge_adapters`` put them on the model
*instance* (its ``__dict__``, where an attribute shadows the class's method of the same name) and
``unload`` / ``merge_and_unload`` take them off again (``surgery.finish_conversion`` and
``_finish_unload`` run these hooks). The model's class is never changed, so ``type(model)`` is
still ``LlamaForCausalLM``, ``isinstance(model, PreTrainedModel)`` holds, ``config.json`` records
the real architecture, and a plain model's ``save_pretrained`` is transformers' again after
``merge_and_unload``. The other way, a subclass made on the fly (as peft's ``PeftModel`` wraps the
model instead), would change ``type(model)`` and the class name transformers writes into
``config.json`` ("architectures"), which ``from_pretrained`` then cannot find, and needs
registering for pickling.

Each method is a ``ModelMethod``: it calls its function with the model, refers to the model
weakly (a method in the model's own ``__dict__`` holding it strongly would keep a deleted model,
and its GPU memory, alive until the garbage collector finds the cycle), and pickles and deep-copies
as a reference to the function plus the model, so ``torch.save(model)``, ``pickle`` and
``copy.deepcopy`` give a model whose methods act on the copy. (A bound method would pickle as
``getattr(model, name)``, which, unpickled before the model's ``__dict__`` is, finds the class's
method instead.)
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch.nn as nn

from . import merge, named_adapters, pretrained, surgery

METHODS = {
    "save_pretrained": pretrained.save_pretrained,
    "save_pretrained_merged": pretrained.save_pretrained_merged,
    "merge_and_unload": merge.merge_and_unload,
    "unload": merge.unload,
    "print_trainable_parameters": surgery.print_trainable_parameters,
    "get_nb_trainable_parameters": surgery.trainable_parameters,
    "add_adapter": named_adapters.add_adapter,
    "load_adapter": named_adapters.load_named_adapter,
    "set_adapter": named_adapters.set_adapter,
    "delete_adapter": named_adapters.delete_adapter,
    "disable_adapter": named_adapters.disable_adapter,
    "active_adapters": named_adapters.active_adapters,
    "adapter_names": named_adapters.adapter_names,
}


class ModelMethod:
    """``function`` as a method of one model instance (module docstring)."""

    def __init__(self, function, model: nn.Module) -> None:
        functools.update_wrapper(self, function)
        self.__func__ = function
        self._model = weakref.ref(model)
        parameters = list(inspect.signature(function).parameters.values())[1:]
        self.__signature__ = inspect.signature(function).replace(parameters=parameters)

    @property
    def __self__(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError(f"{self.__name__}: the model this method belonged to was deleted")
        return model

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return ModelMethod, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        model = self._model()
        owner = type(model).__name__ if model is not None else "deleted"
        return f"<spft method {self.__name__} of {owner} model>"


def attach(root: nn.Module) -> None:
    """Put the methods on ``root`` (again: idempotent)."""
    for name, function in METHODS.items():
        root.__dict__[name] = ModelMethod(function, root)


def detach(root: nn.Module) -> None:
    """Take the methods (and the named adapters) off ``root``."""
    for name in METHODS:
        if isinstance(root.__dict__.get(name), ModelMethod):
            del root.__dict__[name]
    named_adapters.forget_adapters(root)


surgery.add_conversion_hooks(attach, detach)
