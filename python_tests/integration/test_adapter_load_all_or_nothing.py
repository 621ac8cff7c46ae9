"""``load_adapter`` is all or nothing: whatever fails while installing (memory, an interrupt, a
bug), the model is put back bitwise as it was: modules, weights, merged state, saved modules,
flags, config. And it works, as get_spft_model and merge_and_unload do, under
``torch.inference_mode`` (an evaluation loop), with training possible afterwards."""

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.adapter import load as adapter_load
from spft_kernels.integration.surgery import spft_layers

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "sparta": dict(method="sparta", density=0.1, modules_to_save=["lm_head"]),
    "spruft": dict(method="spruft", density=0.1),
}


def _trained_adapter(method, tmp_path, mode="auto"):
    model = tiny_model("llama")
    spft.get_spft_model(model, spft.SpftConfig(**CONFIGS[method], mode=mode))
    with torch.no_grad():
        for layer in spft_layers(model).values():
            layer.delta.normal_(std=0.1)
        if "modules_to_save" in CONFIGS[method]:
            model.lm_head.weight.add_(0.01)
    batch = tiny_batches("llama", count=1)[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return spft.save_adapter(model, tmp_path / f"{method}.safetensors"), logits, batch


def _live_weight(module):
    # What a merged layer computes with: between state_dict() and its next forward its weight
    # holds W0, lent to the state dict (nn/w0_loan.py), so W0 + delta is merged_weight().
    if getattr(module, "merged", False):
        return module.merged_weight()
    return module.weight.detach().clone()


def _snapshot(model):
    return {
        "modules": dict(model.named_modules()),
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "weights": {n: _live_weight(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)},
        "merged": {n: m.merged for n, m in spft_layers(model).items() if hasattr(m, "merged")},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": dict(model.__dict__),
    }


def _assert_as_before(model, before):
    assert dict(model.named_modules()) == before["modules"]
    for name, weight in before["weights"].items():  # the live weights, merged ones included
        assert torch.equal(_live_weight(model.get_submodule(name)), weight), name
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert {n: m.merged for n, m in spft_layers(model).items() if hasattr(m, "merged")} == before["merged"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["flags"]
    assert model.__dict__.keys() == before["attributes"].keys()
    assert getattr(model, "spft_config", None) is before["attributes"].get("spft_config")


def _fail_on_call(monkeypatch, owner, attribute, call, error):
    original = getattr(owner, attribute)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)
    return calls


FAILURES = {
    "third-layer": lambda mp: _fail_on_call(mp, adapter_load, "set_submodule", 3, MemoryError("out of memory")),
    "saved-module": lambda mp: _fail_on_call(mp, nn.Module, "load_state_dict", 1, RuntimeError("boom")),
    "freezing": lambda mp: _fail_on_call(mp, adapter_load, "prepare_for_training", 1, KeyboardInterrupt()),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("target", ["plain", "converted-merged", "converted-split"])
def test_a_failure_while_installing_leaves_the_model_bitwise_as_it_was(failure, target, tmp_path, monkeypatch):
    path, _, batch = _trained_adapter("sparta", tmp_path)
    model = tiny_model("llama")
    if target != "plain":  # an adapter to replace, merged into the weights or not
        mode = target.split("-")[1]
        spft.get_spft_model(model, spft.SpftConfig(method="spruft", density=0.2, mode=mode))
        with torch.no_grad():
            for layer in spft_layers(model).values():
                layer.delta.normal_()
        model(input_ids=batch["input_ids"])
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    FAILURES[failure](monkeypatch)
    with pytest.raises((MemoryError, RuntimeError, KeyboardInterrupt)):
        spft.load_adapter(model, path)
    monkeypatch.undo()
    _assert_as_before(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, expected)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("onto", ["plain", "converted"])
def test_load_adapter_under_inference_mode_then_train(method, onto, tmp_path):
    path, logits, batch = _trained_adapter(method, tmp_path)
    model = tiny_model("llama")
    if onto == "converted":
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.2, mode="merged"))
    with torch.inference_mode():
        spft.load_adapter(model, path)
        inside = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(inside, logits, rtol=0, atol=1e-10)
    assert not any(t.is_inference() for t in list(model.parameters()) + list(model.buffers()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hf_loss(model, batch).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=batch["input_ids"]).logits, logits)


@pytest.mark.parametrize("method", ["sparta", "spruft", "pst"])
def test_get_spft_model_and_merge_and_unload_under_inference_mode(method):
    config = dict(CONFIGS.get(method, {}), method=method) if method != "pst" else dict(method="pst", sparsity=0.5)
    model = tiny_model("llama")
    batch = tiny_batches("llama", count=1)[0]
    with torch.inference_mode():
        spft.get_spft_model(model, spft.SpftConfig(**config))
        model(input_ids=batch["input_ids"])  # PST: its step cache is made outside inference mode
    assert not any(t.is_inference() for t in list(model.parameters()) + list(model.buffers()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hf_loss(model, batch).backward()
    optimizer.step()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    with torch.inference_mode():
        spft.merge_and_unload(model)
    assert not any(t.is_inference() for t in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, trained, rtol=0, atol=1e-10)
    hf_loss(model, batch).backward()  # a plain model that trains
