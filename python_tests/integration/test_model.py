"""get_spft_model, SpftConfig, print_trainable_parameters, merge_and_unload and unload on tiny
transformers models of four families (BERT, Llama, OPT, Qwen2), built from configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers, trainable_parameters
from spft_kernels.masks.targets import find_target_linears

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model, train  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("bert", "llama", "opt", "qwen2")
BUDGETS = {"speft": dict(match_lora_rank=2), "sparta": dict(density=0.05), "spruft": dict(match_lora_rank=2)}


def head(kind):
    return ["classifier"] if kind == "bert" else None


def convert(kind, method="speft", model_seed=0, dtype=torch.float32, **overrides):
    model = tiny_model(kind, seed=model_seed, dtype=dtype)
    batches = tiny_batches(kind)
    budget_given = {"density", "num_params", "match_lora_rank"} & set(overrides)
    budget = {} if budget_given else BUDGETS[method]
    config = spft.SpftConfig(method=method, modules_to_save=head(kind), **budget, **overrides)
    return spft.get_spft_model(model, config, batches, hf_loss), batches


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


# --- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["speft", "sparta", "spruft"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_converted_model_equals_original_exactly(kind, method):
    model = tiny_model(kind, dtype=torch.float32)
    batches = tiny_batches(kind)
    before = [logits(model, b) for b in batches]
    targets = list(find_target_linears(model))
    config = spft.SpftConfig(method=method, modules_to_save=head(kind), **BUDGETS[method])
    assert spft.get_spft_model(model, config, batches, hf_loss) is model
    layers = spft_layers(model)
    # Every target with a trained position is converted; one a global top-k left empty stays plain.
    assert layers and [name for name in targets if name in layers] == list(layers)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in targets if name not in layers)
    layer_type = spft.RowSparseLinear if method == "spruft" else spft.SparseDeltaLinear
    assert all(type(layer) is layer_type and layer.merged and layer.delta.numel() for layer in layers.values())
    for batch, expected in zip(batches, before):
        assert torch.equal(logits(model, batch), expected)
    # Only the deltas (and the classification head) train; embeddings, LM head, norms are frozen.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.delta" for name in layers}
    if kind == "bert":
        expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert model.spft_config is config


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_reduces_loss(kind):
    model, batches = convert(kind)
    batch = batches[0]
    losses = train(model, [batch], steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("method", ["sparta", "spruft"])
def test_training_reduces_loss_other_methods(method):
    model, batches = convert("llama", method)
    losses = train(model, batches[:1], steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_empty_targets_stay_plain_unless_the_mask_is_dynamic():
    model, _ = convert("llama", "speft", num_params=50)  # global top-50 over 14 layers: some get none
    targets = find_target_linears(tiny_model("llama"))
    assert 0 < len(spft_layers(model)) < len(targets)
    dynamic, _ = convert("llama", "speft", num_params=50, mask_update_interval=10)
    assert list(spft_layers(dynamic)) == list(targets)
    assert sum(layer.nnz for layer in spft_layers(dynamic).values()) == 50


def test_split_mode_and_a_single_target():
    model, batches = convert("llama", mode="split", target_modules=["model.layers.1.self_attn.q_proj"])
    (layer,) = spft_layers(model).values()
    assert layer.mode == "split" and not layer.merged
    losses = train(model, batches[:1], steps=4)
    assert losses[-1] < losses[0]


def test_fused_mode_trains_and_never_writes_w0():
    original = tiny_model("llama", dtype=torch.float32)
    model, batches = convert("llama", "sparta", mode="fused")
    layers = spft_layers(model)
    assert layers and all(layer.mode == "fused" and not layer.merged for layer in layers.values())
    torch.testing.assert_close(logits(model, batches[0]), logits(original, batches[0]), rtol=0, atol=0)
    w0 = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    losses = train(model, batches[:1], steps=4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(layer.weight, w0[name]) for name, layer in layers.items())


# --- budgets -----------------------------------------------------------------------------------


def target_sizes(kind, **kwargs):
    return {n: (m.out_features, m.in_features) for n, m in find_target_linears(tiny_model(kind), **kwargs).items()}


def test_budget_density_num_params_and_lora_rank_speft_sparta():
    sizes = target_sizes("llama")
    total = sum(o * i for o, i in sizes.values())
    lora = sum(4 * (o + i) for o, i in sizes.values())
    for method in ("speft", "sparta"):
        for budget, expected in ((dict(density=0.1), round(0.1 * total)), (dict(num_params=777), 777),
                                 (dict(match_lora_rank=4), lora)):
            model, _ = convert("llama", method, **budget)
            assert sum(layer.nnz for layer in spft_layers(model).values()) == expected, (method, budget)
    model, _ = convert("llama", "speft", density=0.1, scope="local")
    for name, layer in spft_layers(model).items():
        assert layer.nnz == round(0.1 * sizes[name][0] * sizes[name][1])


def test_budget_spruft_rows():
    sizes = target_sizes("llama")
    model, _ = convert("llama", "spruft", match_lora_rank=2)
    for name, layer in spft_layers(model).items():
        out_f, in_f = sizes[name]
        assert layer.num_rows == min(out_f, int(2 * (in_f + out_f) / in_f + 0.5))
    model, _ = convert("llama", "spruft", density=0.25)
    assert all(layer.num_rows == round(0.25 * sizes[n][0]) for n, layer in spft_layers(model).items())
    total = sum(o * i for o, i in sizes.values())
    model, _ = convert("llama", "spruft", num_params=total // 8)
    assert all(layer.num_rows == round(sizes[n][0] / 8) for n, layer in spft_layers(model).items())


def test_spruft_taylor_uses_the_data_and_exclude_attention():
    model, batches = convert("llama", "spruft", metric="taylor", exclude_attention=True)
    names = list(spft_layers(model))
    assert names and all(".mlp." in name for name in names)
    scores = spft.row_importance(tiny_model("llama", dtype=torch.float32), batches, hf_loss, "taylor",
                                 exclude_attention=True)
    expected = spft.select_rows(scores, lora_rank=2, model=tiny_model("llama", dtype=torch.float32))
    for name, layer in spft_layers(model).items():
        assert torch.equal(layer.rows, expected[name])


def test_speft_positions_are_the_salience_top_k():
    model, batches = convert("llama", "speft", density=0.05, metric="snip")
    scores = spft.salience_scores(tiny_model("llama", dtype=torch.float32), batches, hf_loss, "snip", progress=False)
    expected = spft.select_topk(scores, density=0.05)
    for name, layer in spft_layers(model).items():
        assert torch.equal(layer.index, expected[name])


def test_sparta_seed_decides_the_positions():
    def index(model):
        return torch.cat([layer.index.long() for layer in spft_layers(model).values()])

    first, again, other = (convert("llama", "sparta", seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(index(first), index(again))
    assert not torch.equal(index(first), index(other))


# --- config ------------------------------------------------------------------------------------


def test_config_defaults_and_json_round_trip():
    assert spft.SpftConfig(density=0.01).metric == "gradient"
    assert spft.SpftConfig(method="sparta", density=0.01).metric == "random"
    config = spft.SpftConfig(method="spruft", match_lora_rank=8, target_modules=("q_proj", "v_proj"),
                             modules_to_save=["score"])
    assert (config.metric, config.scope, config.target_modules) == ("l2", "local", ["q_proj", "v_proj"])
    assert spft.SpftConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["match_lora_rank"] == 8
    regex = spft.SpftConfig(num_params=10, target_modules=r".*\.mlp\..*")
    assert spft.SpftConfig.from_json(regex.to_json()) == regex


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of density"),
        (dict(density=0.1, num_params=5), "exactly one of density"),
        (dict(density=1.5), "density must be"),
        (dict(num_params=0), "num_params must be"),
        (dict(match_lora_rank=2.0), "match_lora_rank must be"),
        (dict(method="lora", density=0.1), "unknown method"),
        (dict(density=0.1, metric="l2"), "does not apply to method 'speft'"),
        (dict(method="sparta", density=0.1, metric="gradient"), "does not apply to method 'sparta'"),
        (dict(method="spruft", density=0.1, scope="global"), "SPruFT chooses rows per layer"),
        (dict(density=0.1, scope="everywhere"), "takes scope"),
        (dict(density=0.1, target_modules="("), "regular expression"),
        (dict(density=0.1, target_modules=[]), "target_modules must be"),
        (dict(density=0.1, modules_to_save="classifier"), "modules_to_save must be"),
        (dict(method="sparta", density=0.1, mask_update_interval=10), "method='speft' only"),
        (dict(density=0.1, mode="fast"), "unknown mode"),
        (dict(density=0.1, backend="npu"), "backend"),
        (dict(density=0.1, seed=-1), "seed must be"),
        (dict(density=0.1, num_calibration_batches=0), "num_calibration_batches must be"),
    ],
)
def test_config_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spft.SpftConfig(**kwargs)


def test_config_fused_is_for_sparse_deltas_and_pst_takes_no_density():
    # pst is in (test_model_pst.py); its trainable count is fixed by the ranks, not by a density.
    with pytest.raises(ValueError, match="pst.*takes no density"):
        spft.SpftConfig(method="pst", density=0.1, sparsity=0.5)
    assert spft.SpftConfig(density=0.1, mode="fused").mode == "fused"
    with pytest.raises(ValueError, match="mode='fused'.*spruft"):
        spft.SpftConfig(method="spruft", density=0.1, mode="fused")
    with pytest.raises(ValueError, match="unknown fields"):
        spft.SpftConfig.from_dict({"density": 0.1, "rank": 4})
    with pytest.raises(ValueError, match="not valid JSON"):
        spft.SpftConfig.from_json("{")


def test_get_spft_model_rejects_bad_input():
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="needs|scores with data"):
        spft.get_spft_model(model, spft.SpftConfig(density=0.1))  # gradient salience without data
    with pytest.raises(ValueError, match="no linear layer matches"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1, target_modules=["nope"]))
    with pytest.raises(ValueError, match="modules_to_save: no module"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="contain target layers"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1, modules_to_save=["layers"]))
    with pytest.raises(ValueError, match="must be an SpftConfig"):
        spft.get_spft_model(model, {"method": "sparta"})
    assert not spft_layers(model)  # every failure above left the model as it was
    spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1))
    with pytest.raises(ValueError, match="already has sparse fine-tuning layers"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1))


def test_a_layer_that_cannot_be_built_leaves_the_model_as_it_was():
    model = tiny_model("llama", dtype=torch.float32)
    last = list(find_target_linears(model))[-1]
    linear = model.get_submodule(last)
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # same values, not contiguous
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="contiguous"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.5, mode="merged"))
    assert not spft_layers(model) and not hasattr(model, "spft_config")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.5))  # auto: split for that layer
    assert spft_layers(model)[last].mode == "auto" and not spft_layers(model)[last].merged


def test_gpt2_conv1d_gets_a_clear_error():
    config = pytest.importorskip("transformers").GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)
    model = pytest.importorskip("transformers").GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="Conv1D"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1))


# --- printing, merging, unloading ------------------------------------------------------------------


def test_print_trainable_parameters(capsys):
    model, _ = convert("bert")
    trainable, total = spft.print_trainable_parameters(model)
    deltas = sum(layer.delta.numel() for layer in spft_layers(model).values())
    classifier = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == deltas + classifier
    assert total == sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


@pytest.mark.parametrize("method", ["speft", "spruft"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_merge_and_unload_is_bitwise_the_adapter(kind, method):
    model, batches = convert(kind, method)
    train(model, batches, steps=3)
    expected_weights = {name: layer.merged_weight() for name, layer in spft_layers(model).items()}
    expected = [logits(model, b) for b in batches]
    assert spft.merge_and_unload(model) is model
    assert not spft_layers(model) and not hasattr(model, "spft_config")
    for name, weight in expected_weights.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight)
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(model, batch), out)
    # The original flags are back: the plain model trains fully again.
    assert all(p.requires_grad for p in model.parameters())


def test_merge_and_unload_of_a_stale_split_layer():
    model, batches = convert("llama", mode="split")
    train(model, batches, steps=2)
    expected = [logits(model, b) for b in batches]
    spft.merge_and_unload(model)
    for batch, out in zip(batches, expected):
        torch.testing.assert_close(logits(model, batch), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["speft", "spruft"])
def test_merge_and_unload_refuses_while_a_state_dict_holds_w0_and_changes_nothing(method):
    """A live state dict shares the weights (holding W0 for it): merging in place would write
    W0 + delta under it. Refused before any layer is replaced, naming the layers."""
    original = tiny_model("llama", dtype=torch.float32).state_dict()
    model, batches = convert("llama", method)
    train(model, batches, steps=2)
    names = list(spft_layers(model))
    expected = [logits(model, b) for b in batches]
    last = names[-1]  # the others would be merged (and replaced) first if the check came late
    state = model.get_submodule(last).state_dict()
    with pytest.raises(RuntimeError, match=r"merge_and_unload: a state dict of 1 layer\(s\) \(" + last):
        spft.merge_and_unload(model)
    assert list(spft_layers(model)) == names  # no layer replaced
    assert torch.equal(state["weight"], original[last + ".weight"])  # still W0
    for batch, out in zip(batches, expected):
        torch.testing.assert_close(logits(model, batch), out, rtol=1e-5, atol=1e-6)
    del state
    spft.merge_and_unload(model)
    assert not spft_layers(model)
    for batch, out in zip(batches, expected):
        torch.testing.assert_close(logits(model, batch), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["speft", "spruft"])
def test_unload_restores_w0_exactly(method):
    original = tiny_model("llama", dtype=torch.float32)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    model, batches = convert("llama", method)
    train(model, batches, steps=3)  # merged mode wrote W0 + Δ into the weights meanwhile
    spft.unload(model)
    assert not spft_layers(model)
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="no sparse fine-tuning layers"):
        spft.unload(model)
    with pytest.raises(ValueError, match="no sparse fine-tuning layers"):
        spft.merge_and_unload(model)


def test_dynamic_mask_from_the_config():
    model, batches = convert("llama", density=0.05, mask_update_interval=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mask = spft.make_dynamic_mask(model, optimizer, batches, hf_loss, progress=False)
    before = torch.cat([layer.index.long() for layer in spft_layers(model).values()])
    for step in range(1, 3):
        hf_loss(model, batches[0]).backward()
        optimizer.step()
        optimizer.zero_grad()
        mask.step(step)
    assert mask.num_updates == 1
    after = torch.cat([layer.index.long() for layer in spft_layers(model).values()])
    assert after.numel() == before.numel()
    plain, _ = convert("llama", density=0.05)
    with pytest.raises(ValueError, match="mask_update_interval"):
        spft.make_dynamic_mask(plain, optimizer, batches, hf_loss)
