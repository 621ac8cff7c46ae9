"""SpftConfig(method="pst") through the model-level API: conversion (exactly the magnitude-pruned
model), the trainable count, a cubic-schedule training run, adapters, merge_and_unload / unload
and the config's validation. Reference backend throughout (the Triton interpreter is slow)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers, trainable_parameters
from spft_kernels.masks.targets import find_target_linears

import tiny_models
from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def head(kind):
    return ["classifier"] if kind == "bert" else None


def pst_config(kind="llama", sparsity=0.5, **overrides):
    options = dict(method="pst", sparsity=sparsity, pst_r1=2, pst_r2=3, backend="reference", modules_to_save=head(kind))
    return spft.SpftConfig(**{**options, **overrides})


def converted(kind="llama", seed=0, **overrides):
    model = tiny_model(kind, seed=seed, dtype=torch.float32)
    return spft.get_spft_model(model, pst_config(kind, **overrides)), tiny_batches(kind)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


def magnitude_pruned(weight, sparsity):
    """W0 with its top-v |entries| kept (ties: the lower flat position), v = round((1 - s) n k)."""
    keep = round((1.0 - sparsity) * weight.numel())
    order = torch.sort(weight.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return torch.where(mask.view_as(weight), weight, 0.0)


def train(model, batches, config, steps=16, lr=2e-2):
    """AdamW with the paper's cubic schedule driving every PST layer's sparsity."""

    def schedule(step):
        spft.set_pst_sparsity(model, spft.cubic_sparsity(step, steps, config.sparsity, warmup=0.1, cooldown=0.2))

    return tiny_models.train(model, batches, steps, lr, before_step=schedule)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_conversion_is_exactly_the_magnitude_pruned_model(kind):
    model = tiny_model(kind, dtype=torch.float32)
    batches = tiny_batches(kind)
    original = [logits(model, b) for b in batches]
    reference = copy.deepcopy(model)
    targets = list(find_target_linears(model))
    assert spft.get_spft_model(model, pst_config(kind, sparsity=0.6)) is model  # no batches: data-free
    layers = spft_layers(model)
    assert list(layers) == targets and all(type(m) is spft.PSTLinear for m in layers.values())
    assert all(layer.sparsity == 0.0 and (layer.r1, layer.r2) == (2, 3) for layer in layers.values())
    for batch, expected in zip(batches, original):  # sparsity 0: exactly the original
        assert torch.equal(logits(model, batch), expected)
    for sparsity in (0.3, 0.6):
        assert spft.set_pst_sparsity(model, sparsity) == len(targets)
        pruned = copy.deepcopy(reference)
        with torch.no_grad():
            for name in targets:
                linear = pruned.get_submodule(name)
                linear.weight.copy_(magnitude_pruned(linear.weight, sparsity))
        for batch in batches:
            assert torch.equal(logits(model, batch), logits(pruned, batch))


def test_trainable_count_is_the_factors_and_the_head():
    model, _ = converted("bert")
    r1, r2 = 2, 3
    factors = sum((m.in_features + m.out_features) * (r1 + r2 + 1) for m in spft_layers(model).values())
    head_count = sum(p.numel() for p in model.classifier.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.{f}" for name in spft_layers(model) for f in "UVABRC"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert trainable_parameters(model)[0] == factors + head_count
    assert spft.print_trainable_parameters(model)[0] == factors + head_count


def test_match_lora_rank_picks_equal_ranks_within_the_lora_count():
    for rank, expected in ((1, 0), (2, 0), (3, 1), (8, 3), (9, 4)):
        config = spft.SpftConfig(method="pst", sparsity=0.5, match_lora_rank=rank)
        assert config.pst_ranks == (expected, expected) and 2 * expected + 1 <= rank
    assert spft.SpftConfig(method="pst", sparsity=0.5).pst_ranks == (8, 8)
    assert spft.SpftConfig(method="pst", sparsity=0.5, pst_r2=4).pst_ranks == (8, 4)


def test_cubic_schedule_reaches_the_target_and_lowers_the_loss():
    config = pst_config(sparsity=0.5)
    model, batches = converted()
    start = [hf_loss(model, b).item() for b in batches]
    train(model, batches, config)
    layers = spft_layers(model).values()
    assert all(layer.sparsity == 0.5 and int(layer.mask().sum()) == layer.kept for layer in layers)
    with torch.no_grad():
        end = [hf_loss(model, b).item() for b in batches]
    assert sum(end) < sum(start)


def test_merge_and_unload_exports_the_pruned_layers_and_reports_them():
    config = pst_config(sparsity=0.5)
    model, batches = converted()
    train(model, batches, config, steps=6)
    spft.set_pst_sparsity(model, 0.4)  # not the configured final sparsity: exported as it is
    expected = {name: layer.masked_weight() for name, layer in spft_layers(model).items()}
    before = [logits(model, b) for b in batches]
    result, reports = spft.merge_and_unload(model, return_report=True)
    assert result is model and not spft_layers(model) and not hasattr(model, "spft_config")
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight)
        assert reports[name]["target_sparsity"] == 0.4 and reports[name]["kept"] == round(0.6 * weight.numel())
    for batch, expected_logits in zip(batches, before):
        assert torch.equal(logits(model, batch), expected_logits)
    assert not any(p.requires_grad is False for p in model.parameters())  # the original flags


def test_unload_restores_w0_exactly():
    model = tiny_model("llama", dtype=torch.float32)
    batches = tiny_batches("llama")
    original = [logits(model, b) for b in batches]
    weights = {name: m.weight for name, m in find_target_linears(model).items()}
    snapshot = {name: w.detach().clone() for name, w in weights.items()}
    spft.get_spft_model(model, pst_config())
    train(model, batches, pst_config(), steps=4)
    spft.unload(model)
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight is weight and torch.equal(weight, snapshot[name])
    for batch, expected in zip(batches, original):
        assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_adapter_round_trip_is_bitwise_and_refuses_another_base(kind, tmp_path):
    config = pst_config(kind, sparsity=0.5)
    model, batches = converted(kind)
    train(model, batches, config, steps=6)
    spft.set_pst_sparsity(model, 0.3)
    path = spft.save_adapter(model, tmp_path / "pst.safetensors")
    expected = [logits(model, b) for b in batches]

    fresh = tiny_model(kind, dtype=torch.float32)  # a plain model is converted
    assert spft.load_adapter(fresh, path) is fresh
    assert fresh.spft_config == config
    for name, layer in spft_layers(model).items():
        loaded = fresh.get_submodule(name)
        assert type(loaded) is spft.PSTLinear and loaded.get_extra_state() == layer.get_extra_state()
        assert all(torch.equal(a, b) for a, b in zip(loaded.factors(), layer.factors()))
    for batch, logit in zip(batches, expected):
        assert torch.equal(logits(fresh, batch), logit)
    assert trainable_parameters(fresh)[0] == trainable_parameters(model)[0]

    other = tiny_model(kind, seed=1, dtype=torch.float32)
    types = {name: type(m) for name, m in other.named_modules()}
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        spft.load_adapter(other, path)
    assert {name: type(m) for name, m in other.named_modules()} == types  # all or nothing
    spft.load_adapter(other, path, check_base=False)
    assert spft_layers(other)


def test_adapter_replaces_a_converted_models_adapter_and_refuses_merging(tmp_path):
    model, batches = converted()
    train(model, batches, pst_config(), steps=3)
    path = spft.save_adapter(model, tmp_path / "pst.safetensors")
    speft = tiny_model("llama", dtype=torch.float32)
    spft.get_spft_model(speft, spft.SpftConfig(method="sparta", density=0.05))
    spft.load_adapter(speft, path)
    assert all(type(m) is spft.PSTLinear for m in spft_layers(speft).values())
    for batch in batches:
        assert torch.equal(logits(speft, batch), logits(model, batch))
    with pytest.raises(ValueError, match="not additive"):
        spft.merge_adapters(tiny_model("llama", dtype=torch.float32), [path, path])


def test_config_json_round_trip_and_old_json():
    config = pst_config(match_lora_rank=5, pst_r1=None, pst_r2=None, exclude_attention=True)
    assert spft.SpftConfig.from_json(config.to_json()) == config
    old = spft.SpftConfig(method="speft", density=0.1).to_dict()
    for key in ("sparsity", "pst_r1", "pst_r2"):
        del old[key]
    assert spft.SpftConfig.from_dict(old) == spft.SpftConfig(method="speft", density=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="pst"), "needs sparsity"),
        (dict(method="pst", sparsity=1.0), "sparsity must be a number in"),
        (dict(method="pst", sparsity=-0.1), "sparsity must be a number in"),
        (dict(method="pst", sparsity=True), "sparsity must be a number in"),
        (dict(method="pst", sparsity=0.5, density=0.1), "takes no density"),
        (dict(method="pst", sparsity=0.5, num_params=100), "takes no density or num_params"),
        (dict(method="pst", sparsity=0.5, match_lora_rank=4, pst_r1=2), "not both"),
        (dict(method="pst", sparsity=0.5, pst_r1=-1), "pst_r1 must be an integer >= 0"),
        (dict(method="pst", sparsity=0.5, pst_r2=1.5), "pst_r2 must be an integer"),
        (dict(method="pst", sparsity=0.5, mode="merged"), "mode applies"),
        (dict(method="pst", sparsity=0.5, metric="gradient"), "does not apply"),
        (dict(method="pst", sparsity=0.5, scope="global"), "takes scope"),
        (dict(method="pst", sparsity=0.5, mask_update_interval=10), "'speft' only"),
        (dict(method="speft", density=0.1, sparsity=0.5), "pst' only"),
        (dict(method="spruft", density=0.1, pst_r1=2), "pst' only"),
    ],
)
def test_config_rejects_bad_pst_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spft.SpftConfig(**kwargs)


def test_set_pst_sparsity_needs_pst_layers():
    with pytest.raises(ValueError, match="no PSTLinear"):
        spft.set_pst_sparsity(tiny_model("llama"), 0.5)
    model, _ = converted()
    with pytest.raises(ValueError, match="sparsity"):
        spft.set_pst_sparsity(model, 1.0)
