"""Block-sparse deltas through the model API: SpftConfig(block_size=...), get_spft_model, adapters
(save/load, fingerprints, all-or-nothing), merge_and_unload, unload and merge_adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.ops.block_index import block_entries
from spft_kernels.integration.surgery import spft_layers
from spft_kernels.masks.targets import find_target_linears

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model, train  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny Llama's targets are 32x32, 16x32 (k, v), 64x32 and 32x64: blocks of 8 x 12 clip the
# columns of every one of them (32 = 2 x 12 + 8).
BLOCK = (8, 12)


def convert(method="speft", model_seed=0, seed=0, **overrides):
    model = tiny_model("llama", seed=model_seed, dtype=torch.float32)
    batches = tiny_batches("llama")
    budget = {} if {"density", "num_params", "match_lora_rank"} & set(overrides) else {"match_lora_rank": 2}
    config = spft.SpftConfig(method=method, block_size=overrides.pop("block_size", BLOCK), seed=seed, **budget,
                             **overrides)
    return spft.get_spft_model(model, config, batches, hf_loss), batches


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


def dense_delta(layer):
    """The dense Δ of a block layer in fp64 (live entries only)."""
    delta = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    flat, where = block_entries(layer.blocks, (layer.out_features, layer.in_features), layer.block_size)
    delta[flat] = layer.delta.detach().double().reshape(-1)[where]
    return delta.view(layer.out_features, layer.in_features)


def randomised(model, seed):
    with torch.no_grad():
        for layer in spft_layers(model).values():
            layer.delta.normal_(generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("method", ["speft", "sparta"])
def test_converted_model_equals_the_original_and_trains(method):
    original = tiny_model("llama", dtype=torch.float32)
    model, batches = convert(method)
    layers = spft_layers(model)
    assert layers and all(type(layer) is spft.BlockSparseLinear and layer.block_size == BLOCK and layer.merged
                          for layer in layers.values())
    for batch in batches:
        assert torch.equal(logits(model, batch), logits(original, batch))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.delta" for n in layers}
    losses = train(model, batches[:1], steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_budgets_in_whole_blocks():
    sizes = {n: (m.out_features, m.in_features) for n, m in find_target_linears(tiny_model("llama")).items()}
    area = BLOCK[0] * BLOCK[1]
    count = lambda model: sum(layer.num_blocks for layer in spft_layers(model).values())  # noqa: E731
    lora = sum(2 * (o + i) for o, i in sizes.values())
    assert count(convert("sparta", match_lora_rank=2)[0]) == int(lora / area + 0.5)  # closest total, half up
    local, _ = convert("speft", match_lora_rank=2, scope="local")
    for name, layer in spft_layers(local).items():
        assert layer.num_blocks == int(2 * sum(sizes[name]) / area + 0.5)
    assert count(convert("sparta", num_params=10 * area)[0]) == 10
    assert sum(l.delta.numel() for l in spft_layers(convert("speft", num_params=10 * area)[0]).values()) == 10 * area
    grid = {n: -(-o // BLOCK[0]) * -(-i // BLOCK[1]) for n, (o, i) in sizes.items()}
    assert count(convert("sparta", density=0.25)[0]) == round(0.25 * sum(grid.values()))


def test_speft_blocks_are_the_top_summed_salience():
    model = tiny_model("llama", dtype=torch.float32)
    batches = tiny_batches("llama")
    scores = spft.salience_scores(model, batches, hf_loss, "gradient")
    expected = spft.select_blocks(scores, BLOCK, num_params=12 * BLOCK[0] * BLOCK[1])
    converted, _ = convert("speft", num_params=12 * BLOCK[0] * BLOCK[1])
    for name, layer in spft_layers(converted).items():
        assert torch.equal(layer.blocks, expected[name])


def test_config_json_round_trip_and_rejections():
    config = spft.SpftConfig(method="sparta", density=0.1, block_size=[16, 32])
    assert config.block_size == (16, 32)
    assert spft.SpftConfig.from_json(config.to_json()) == config
    assert spft.SpftConfig(method="speft", density=0.1, block_size=64).block_size == (64, 64)
    for kwargs, message in (
        (dict(method="spruft", density=0.1, block_size=(8, 8)), "block_size applies to methods 'speft' and 'sparta'"),
        (dict(method="pst", sparsity=0.5, block_size=(8, 8)), "sparsity, pst_r1 and pst_r2|block_size"),
        (dict(method="speft", density=0.1, block_size=(8, 8), mode="fused"), "fused"),
        (dict(method="speft", density=0.1, block_size=(8, 8), mask_update_interval=5), "dynamic masks"),
        (dict(method="speft", density=0.1, block_size=(8, -1)), "block_size must be a pair"),
    ):
        with pytest.raises(ValueError, match=message):
            spft.SpftConfig(**kwargs)


def test_adapter_round_trip_is_bitwise_and_checked(tmp_path):
    model, batches = convert("sparta")
    train(model, batches, steps=3)
    expected = [logits(model, b) for b in batches]
    path = spft.save_adapter(model, tmp_path / "blocks.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        layers = json.loads(handle.metadata()["layers"])
        name = next(iter(layers))
        assert layers[name]["kind"] == "blocks" and layers[name]["block_size"] == list(BLOCK)
        assert handle.get_tensor(f"{name}.blocks").dtype == torch.int32
    fresh = tiny_model("llama", dtype=torch.float32)
    spft.load_adapter(fresh, path)
    assert fresh.spft_config == model.spft_config
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(fresh, batch), out)
    for a, b in zip(spft_layers(model).values(), spft_layers(fresh).values()):
        assert type(b) is spft.BlockSparseLinear and torch.equal(a.blocks, b.blocks) and torch.equal(a.delta, b.delta)
    # Another base: refused before anything changes (the fingerprint covers W0 at the blocks).
    other = tiny_model("llama", seed=7, dtype=torch.float32)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        spft.load_adapter(other, path)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    assert not spft_layers(other)


def test_fingerprint_is_taken_on_w0_in_every_mode(tmp_path):
    model, _ = convert("speft", mode="split")
    randomised(model, 0)
    split_path = spft.save_adapter(model, tmp_path / "split.safetensors")
    for layer in spft_layers(model).values():
        layer.merge()  # the weight now holds W0 + Δ; the fingerprint must not change
    merged_path = spft.save_adapter(model, tmp_path / "merged.safetensors")
    from safetensors import safe_open

    def fingerprints(path):
        with safe_open(path, framework="pt") as handle:
            return {n: e["fingerprint"] for n, e in json.loads(handle.metadata()["layers"]).items()}

    assert fingerprints(split_path) == fingerprints(merged_path)
    # An entries adapter loads onto a model whose block layers are merged (W0 read from the blocks aside).
    entries_model = tiny_model("llama", dtype=torch.float32)
    spft.get_spft_model(entries_model, spft.SpftConfig(method="sparta", density=0.2))
    entries_path = spft.save_adapter(randomised(entries_model, 1), tmp_path / "entries.safetensors")
    spft.load_adapter(model, entries_path)
    assert all(type(layer) is spft.SparseDeltaLinear for layer in spft_layers(model).values())


def test_merge_and_unload_and_unload():
    original = tiny_model("llama", dtype=torch.float32)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    model, batches = convert("sparta")
    train(model, batches, steps=3)
    weights = {name: layer.merged_weight() for name, layer in spft_layers(model).items()}
    expected = [logits(model, b) for b in batches]
    spft.merge_and_unload(model)
    assert not spft_layers(model)
    for name, weight in weights.items():
        assert type(model.get_submodule(name)) is nn.Linear and torch.equal(model.get_submodule(name).weight, weight)
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(model, batch), out)
    model, _ = convert("sparta")
    train(model, batches, steps=3)
    spft.unload(model)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_merge_adapters_of_blocks_and_with_entries(tmp_path):
    paths, deltas = [], []
    for number, (seed, block_size) in enumerate(((0, BLOCK), (1, BLOCK), (2, (4, 4)))):
        model, _ = convert("sparta", seed=seed, block_size=block_size, density=0.3)
        randomised(model, number)
        paths.append(spft.save_adapter(model, tmp_path / f"{number}.safetensors"))
        deltas.append({name: dense_delta(layer) for name, layer in spft_layers(model).items()})
    same = tiny_model("llama", dtype=torch.float32)
    spft.merge_adapters(same, paths[:2], weights=[0.5, 2.0])
    assert same.spft_config.block_size == BLOCK
    for name, layer in spft_layers(same).items():
        assert type(layer) is spft.BlockSparseLinear
        expected = 0.5 * deltas[0].get(name, 0) + 2.0 * deltas[1].get(name, 0)
        assert torch.equal(dense_delta(layer), expected.float().double()), name
    mixed = tiny_model("llama", dtype=torch.float32)
    spft.merge_adapters(mixed, paths)  # another block size: merged as entries
    assert mixed.spft_config.block_size is None
    for name, layer in spft_layers(mixed).items():
        assert type(layer) is spft.SparseDeltaLinear
        dense = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
        dense[layer.index.long()] = layer.delta.detach().double()
        expected = sum(d.get(name, 0) for d in deltas)
        assert torch.equal(dense.view_as(expected), expected.float().double()), name


def test_peft_shira_folder_holds_the_blocks_live_entries(tmp_path):
    peft = pytest.importorskip("peft")
    model, batches = convert("sparta")
    randomised(model, 3)
    expected = [logits(model, b) for b in batches]
    folder = spft.save_adapter(model, tmp_path / "shira", format="peft")
    fresh = tiny_model("llama", dtype=torch.float32)
    spft.load_adapter(fresh, folder)  # back as scattered entries: SHiRA has no blocks
    for (name, layer), loaded in zip(spft_layers(model).items(), spft_layers(fresh).values()):
        assert type(loaded) is spft.SparseDeltaLinear and loaded.nnz == layer.trained_entries, name
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(fresh, batch), out)
    stock = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), folder)
    torch.testing.assert_close(logits(stock, batches[0]), expected[0], rtol=1e-5, atol=1e-6)
