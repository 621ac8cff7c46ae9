"""The peft-style methods live on the converted model instance: present after get_spft_model,
load_adapter, merge_adapters and from_peft, gone after unload and merge_and_unload; the model's
class never changes (``type``, ``isinstance(model, PreTrainedModel)``, the architecture
transformers records), and pickle, ``torch.save`` and ``copy.deepcopy`` give a model whose
methods act on the copy."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.model_methods import METHODS, ModelMethod
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_batches, tiny_model, train  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(method="sparta", density=0.1)


def _has_methods(model) -> bool:
    present = [name for name in METHODS if isinstance(model.__dict__.get(name), ModelMethod)]
    assert present in ([], list(METHODS))
    return bool(present)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _trained():
    model = spft.get_spft_model(tiny_model("llama", dtype=torch.float32), spft.SpftConfig(**CONFIG))
    train(model, tiny_batches("llama", count=2), steps=2)
    return model.eval()


def test_the_class_stays_and_the_methods_come_and_go(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    cls = type(model)
    assert not _has_methods(model)
    spft.get_spft_model(model, spft.SpftConfig(**CONFIG))
    assert type(model) is cls and isinstance(model, transformers.PreTrainedModel) and _has_methods(model)
    path = spft.save_adapter(model, tmp_path / "a")
    model.unload()
    assert type(model) is cls and not _has_methods(model)
    assert model.save_pretrained.__func__ is transformers.PreTrainedModel.save_pretrained
    spft.load_adapter(model, path)
    assert _has_methods(model)
    merged = model.merge_and_unload()
    assert merged is model and type(model) is cls and not _has_methods(model) and not spft_layers(model)
    spft.merge_adapters(model, [path])
    assert _has_methods(model)
    model.save_pretrained_merged(tmp_path / "merged")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "merged").architectures == [cls.__name__]


def test_from_peft_gives_the_methods():
    peft = pytest.importorskip("peft")
    config = peft.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=3)
    model = spft.from_peft(peft.get_peft_model(tiny_model("llama", dtype=torch.float32), config))
    assert type(model).__name__ == "LlamaForCausalLM" and _has_methods(model)


def test_trainable_parameter_counts():
    model = _trained()
    deltas = sum(layer.delta.numel() for layer in spft_layers(model).values())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (deltas, total)


def test_print_trainable_parameters(capsys):
    model = _trained()
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_copies_carry_methods_that_act_on_the_copy(tmp_path, how):
    model = _trained()
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    else:
        twin = copy.deepcopy(model)
    assert type(twin) is type(model) and _has_methods(twin)
    assert all(twin.__dict__[name].__self__ is twin for name in METHODS)
    batch = tiny_batches("llama", seed=5)[0]
    assert torch.equal(_logits(twin, batch), _logits(model, batch))
    with torch.no_grad():  # the copy trains on its own; its methods save its adapter, not the original's
        for layer in spft_layers(twin).values():
            layer.delta.add_(0.01)
    twin.save_pretrained(tmp_path / "twin")
    loaded = spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path / "twin").eval()
    assert torch.equal(_logits(loaded, batch), _logits(twin, batch))
    assert not torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_a_method_refers_to_its_model_weakly():
    model = _trained()
    method = model.save_pretrained
    assert method.__self__ is model and "save_directory" in str(method.__signature__)
    del model
    import gc

    gc.collect()
    with pytest.raises(ReferenceError):
        method("unused")
