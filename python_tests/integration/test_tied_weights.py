"""A target whose weight another module holds too (a tied LM head and the input embedding) is
never written: get_spft_model and load_adapter compute it in the split form (mode 'auto'),
refuse mode 'merged', dynamic masks and a saved module that trains the shared weight, and
merge_and_unload gives the head its own W0 + Δ while the embedding keeps W0."""

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "sparta": dict(method="sparta", density=0.3),
    "speft": dict(method="speft", density=0.3, metric="magnitude"),
    "spruft": dict(method="spruft", density=0.3),
}


def _tied_llama():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _perturb(model):
    with torch.no_grad():
        for layer in spft_layers(model).values():
            layer.delta.normal_(std=3.0)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["auto", "split"])
def test_a_tied_head_trains_in_split_form_and_never_changes_the_embedding(method, mode):
    model = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    config = spft.SpftConfig(**METHODS[method], target_modules=["lm_head", "up_proj"], mode=mode)
    spft.get_spft_model(model, config)
    head = model.lm_head
    assert head.weight_shared_with == "model.embed_tokens" and not head.merged
    assert model.model.layers[0].mlp.up_proj.weight_shared_with is None
    _perturb(model)
    batch = tiny_batches("llama", count=1)[0]
    first, second = _logits(model, batch), _logits(model, batch)
    assert torch.equal(first, second)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(model.state_dict()["lm_head.weight"], embedding)
    # the head computes x (W0 + Δ)ᵀ exactly: compare with a plain untied copy
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state.detach()
    torch.testing.assert_close(first, head.to_linear()(hidden).detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("config", [
    pytest.param(dict(METHODS["sparta"], mode="merged"), id="merged"),
    pytest.param(dict(method="speft", density=0.3, metric="magnitude", mask_update_interval=5), id="dynamic"),
])
def test_what_would_write_into_the_shared_weight_is_refused_before_anything_changes(config):
    model = _tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
        spft.get_spft_model(model, spft.SpftConfig(**config, target_modules=["lm_head"]))
    assert not spft_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_saved_module_training_the_shared_weight_is_refused():
    model = _tied_llama()
    config = spft.SpftConfig(method="sparta", density=0.3, target_modules=["lm_head"], modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match="modules_to_save"):
        spft.get_spft_model(model, config)


def test_pst_on_a_tied_head_never_writes_w0():
    model = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    spft.get_spft_model(model, spft.SpftConfig(method="pst", sparsity=0.5, pst_r1=1, pst_r2=1, target_modules=["lm_head"]))
    spft.set_pst_sparsity(model, 0.5)
    _logits(model, tiny_batches("llama", count=1)[0])
    spft.merge_and_unload(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize("method", ["sparta", "spruft"])
def test_merge_and_unload_gives_the_head_its_own_weight(method):
    model = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    spft.get_spft_model(model, spft.SpftConfig(**METHODS[method], target_modules=["lm_head"]))
    _perturb(model)
    batch = tiny_batches("llama", count=1)[0]
    trained = _logits(model, batch)
    expected_head = model.lm_head.merged_weight()
    spft.merge_and_unload(model)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(model.lm_head.weight, expected_head)
    torch.testing.assert_close(_logits(model, batch), trained, rtol=0, atol=1e-10)


def test_merge_and_unload_of_a_layer_merged_by_hand_on_a_shared_weight_restores_the_embedding():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = model.embed.weight
    embedding = model.embed.weight.detach().clone()
    model.head = spft.SparseDeltaLinear.from_linear(head, torch.tensor([0, 9, 17]), mode="merged")
    with torch.no_grad():
        model.head.delta.fill_(1.0)
    model.head(torch.randn(1, 4))  # merged by hand: writes into the embedding
    spft.merge_and_unload(model)
    assert torch.equal(model.embed.weight, embedding)
    assert torch.equal(model.head.weight.detach().view(-1)[[0, 9, 17]], embedding.view(-1)[[0, 9, 17]] + 1.0)


@pytest.mark.parametrize("method", ["sparta", "spruft"])
def test_load_adapter_keeps_a_tied_head_in_split_form(method, tmp_path):
    model = _tied_llama()
    spft.get_spft_model(model, spft.SpftConfig(**METHODS[method], target_modules=["lm_head"]))
    _perturb(model)
    batch = tiny_batches("llama", count=1)[0]
    trained = _logits(model, batch)
    path = spft.save_adapter(model, tmp_path / "tied.safetensors")
    fresh = _tied_llama()
    embedding = fresh.model.embed_tokens.weight.detach().clone()
    spft.load_adapter(fresh, path)
    assert fresh.lm_head.weight_shared_with == "model.embed_tokens" and not fresh.lm_head.merged
    torch.testing.assert_close(_logits(fresh, batch), trained, rtol=0, atol=1e-10)
    assert torch.equal(fresh.model.embed_tokens.weight, embedding)
    spft.load_adapter(fresh, path)  # replacing the adapter of a converted model
    assert torch.equal(fresh.model.embed_tokens.weight, embedding)


def test_load_adapter_refuses_mode_merged_on_a_shared_weight_leaving_the_model_unchanged(tmp_path):
    model = _tied_llama()
    spft.get_spft_model(model, spft.SpftConfig(**METHODS["sparta"], target_modules=["lm_head"]))
    path = spft.save_adapter(model, tmp_path / "tied.safetensors")
    fresh = _tied_llama()
    head = spft.SparseDeltaLinear.from_linear(fresh.lm_head, torch.tensor([0]), mode="merged")
    fresh.lm_head = head  # a layer asking for merged mode on the tied weight (not merged yet)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="shares its weight with 'model.embed_tokens'.*mode 'merged'"):
        spft.load_adapter(fresh, path)
    assert fresh.lm_head is head and list(spft_layers(fresh)) == ["lm_head"]
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
