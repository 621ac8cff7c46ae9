"""peft's SHiRA adapters both ways, against the installed peft: ``from_peft`` (a SHiRA model →
SparseDeltaLinear layers, same outputs, training continues), ``load_adapter`` of a folder peft
saved, and ``save_adapter(format="peft")`` → ``PeftModel.from_pretrained`` → same outputs; what
SHiRA cannot express is refused by name."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.adapter.peft_shira import _padding, PEFT_PREFIX
from spft_kernels.integration.surgery import spft_layers

from test_adapter_io import assert_unchanged, snapshot, trained
from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


def magnitude_mask(base_layer, r, **kwargs):
    """A custom SHiRA mask function: the r*(in+out) largest |W0| entries (not peft's random mask)."""
    weight = base_layer.weight
    flat = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    flat[weight.detach().abs().reshape(-1).topk(r * sum(weight.shape)).indices] = 1
    return flat.view(weight.shape)


def shira_model(dtype=torch.float32, r=2, mask=None, targets=("q_proj", "down_proj"), heads=("lm_head",)):
    """A peft SHiRA model on the tiny Llama with nonzero values (as after training) and a trained
    modules_to_save head."""
    config = peft.ShiraConfig(r=r, target_modules=list(targets), init_weights=False, random_seed=3,
                              modules_to_save=list(heads) or None)
    if mask is not None:
        config.mask_type, config.mask_fn = "magnitude", mask
    model = peft.get_peft_model(tiny_model("llama", dtype=dtype), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05)
    return model


def shira_entries(peft_model):
    """{layer name: (sorted flat positions, values)} of the active SHiRA adapter."""
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "shira_indices") and "default" in module.shira_indices:
            rows, cols = module.shira_indices["default"].long()
            flat = rows * module.in_features + cols
            order = flat.argsort()
            found[name] = (flat[order], module.shira_weight["default"].detach()[order])
    return found


# --- peft → spft -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, r, mask", [
    (torch.float32, 2, None), (torch.bfloat16, 1, None), (torch.float64, 3, magnitude_mask),
])
def test_from_peft_holds_the_same_entries_and_gives_bitwise_equal_outputs(dtype, r, mask):
    peft_model = shira_model(dtype, r=r, mask=mask)
    batch = tiny_batches("llama")[0]
    expected, entries = logits(peft_model, batch), shira_entries(peft_model)
    model = spft.from_peft(peft_model)
    layers = spft_layers(model)
    assert sorted(layers) == sorted(entries) and all(isinstance(m, spft.SparseDeltaLinear) for m in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.index.long(), entries[name][0])
        assert torch.equal(layer.delta.to(dtype), entries[name][1]) and layer.nnz == r * (layer.in_features + layer.out_features)
    assert torch.equal(logits(model, batch), expected)  # the merged mode sums what peft sums
    assert model.spft_config.modules_to_save == ["lm_head"] and type(model.lm_head) is nn.Linear
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.delta" for name in layers} | {"lm_head.weight"}


def test_from_peft_split_mode_is_within_budget_and_training_continues_as_in_peft():
    peft_model = shira_model(torch.float64)
    twin = copy.deepcopy(peft_model)
    batch = tiny_batches("llama")[0]
    expected = logits(peft_model, batch)
    model = spft.from_peft(peft_model, mode="split")
    assert all(not layer.merged for layer in spft_layers(model).values())
    assert torch.allclose(logits(model, batch), expected, rtol=0, atol=1e-12)
    # One SGD step each: the same delta gradients (peft's dense dW gathered, ours by SDDMM).
    start = {name: layer.delta.detach().clone() for name, layer in spft_layers(model).items()}
    for trainee in (model, twin):
        optimizer = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.5)
        hf_loss(trainee, batch).backward()
        optimizer.step()
    stepped = shira_entries(twin)
    for name, layer in spft_layers(model).items():
        assert not torch.equal(layer.delta, start[name])
        assert torch.allclose(layer.delta, stepped[name][1], rtol=0, atol=1e-12), name
    assert torch.allclose(logits(model, batch), logits(twin, batch), rtol=0, atol=1e-10)


def test_from_peft_refuses_what_it_cannot_convert():
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LORA adapter"):
        spft.from_peft(lora)
    merged = shira_model()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight"):
        spft.from_peft(merged)
    with pytest.raises(ValueError, match="expects a peft model"):
        spft.from_peft(tiny_model("llama"))
    duplicated = shira_model()
    layer = duplicated.base_model.model.model.layers[1].self_attn.q_proj
    layer.shira_indices["default"][:, 1] = layer.shira_indices["default"][:, 0]
    before = snapshot(duplicated)
    with pytest.raises(ValueError, match="duplicate positions"):
        spft.from_peft(duplicated)
    assert_unchanged(duplicated, before)  # nothing converted, not even the earlier layers


def test_load_adapter_reads_a_folder_peft_saved(tmp_path):
    peft_model = shira_model(r=2)
    batch = tiny_batches("llama")[0]
    expected, entries = logits(peft_model, batch), shira_entries(peft_model)
    peft_model.save_pretrained(tmp_path)
    for path in (tmp_path, tmp_path / "adapter_model.safetensors"):
        model = spft.load_adapter(tiny_model("llama", dtype=torch.float32), path)
        assert torch.equal(logits(model, batch), expected)
        for name, layer in spft_layers(model).items():
            assert torch.equal(layer.index.long(), entries[name][0]) and torch.equal(layer.delta, entries[name][1])
    assert model.spft_config.method == "sparta" and model.spft_config.modules_to_save == ["lm_head"]
    # The same folder through peft (inference mode: nothing trainable), then from_peft on its tuner.
    inference = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), tmp_path)
    converted = spft.from_peft(inference.base_model)
    assert torch.equal(logits(converted, batch), expected)
    assert all(layer.delta.requires_grad for layer in spft_layers(converted).values())
    # A peft folder is an adapter like any other: merged with an spft one by SpaRTA's merging.
    spft_file = spft.save_adapter(trained(method="sparta")[0], tmp_path / "sparta.safetensors")
    spft.merge_adapters(tiny_model("llama", dtype=torch.float32), [tmp_path, spft_file], saved_modules="skip")


def test_foreign_peft_folders_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="peft LORA adapter"):
        spft.load_adapter(model, tmp_path / "lora")
    shira_model().save_pretrained(tmp_path / "shira")
    tensors = load_file(tmp_path / "shira" / "adapter_model.safetensors")
    key = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.shira_indices"
    cases = {
        "out of range": {key: tensors[key] + torch.tensor([[0], [32]], dtype=torch.int32)},  # column 32 of 32
        "duplicate": {key: torch.cat([tensors[key][:, :1], tensors[key][:, :-1]], 1)},
        "unexpected tensor": {f"{PEFT_PREFIX}model.norm.weight": torch.ones(32)},
        "not in the model": {f"{PEFT_PREFIX}model.layers.9.mlp.up_proj.shira_weight": torch.ones(3),
                             f"{PEFT_PREFIX}model.layers.9.mlp.up_proj.shira_indices": torch.zeros(2, 3, dtype=torch.int32)},
    }
    for number, (match, edits) in enumerate(cases.items()):
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text((tmp_path / "shira" / "adapter_config.json").read_text())
        save_file({**tensors, **edits}, folder / "adapter_model.safetensors")
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            spft.load_adapter(model, folder)
        assert_unchanged(model, before)


def test_a_shira_folder_for_another_model_size_is_refused_as_peft_refuses_it(tmp_path):
    # hidden 32 → 48: every index is in range of the larger layers, only the count r*(in+out) differs.
    shira_model(r=2, heads=()).save_pretrained(tmp_path / "small")
    larger = tiny_model("llama", dtype=torch.float32, hidden_size=48)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(copy.deepcopy(larger), tmp_path / "small")
    before = snapshot(larger)
    with pytest.raises(ValueError, match=r"down_proj'.*holds 192 entries.*r=2 has r\*\(in\+out\) = 224.*48x64"):
        spft.load_adapter(larger, tmp_path / "small")
    assert_unchanged(larger, before)
    # The same count rule against the config's r, which must be a positive integer.
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    model = tiny_model("llama", dtype=torch.float32)
    for r, match in ((3, "holds 192 entries.*r=3"), (0, "r must be a positive integer"), ("2", "r must be")):
        (tmp_path / "small" / "adapter_config.json").write_text(json.dumps({**config, "r": r}))
        with pytest.raises(ValueError, match=match):
            spft.load_adapter(model, tmp_path / "small")


# --- spft → peft -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, mode", [("speft", "auto"), ("spruft", "auto"), ("sparta", "split"), ("mixed", "auto")])
def test_peft_format_loads_in_stock_peft_with_the_same_outputs(tmp_path, method, mode):
    if method == "mixed":  # rows in the MLP, entries in attention, one adapter
        model, _ = trained(method="spruft", match_lora_rank=2, target_modules=["gate_proj", "up_proj", "down_proj"])
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
            linear = model.get_submodule(name)
            layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(*linear.weight.shape, 0.2), name=name)
            torch.nn.init.normal_(layer.delta, std=0.1)
            spft.integration.surgery.set_submodule(model, name, layer)
        del model.spft_config  # a hand-made mixture: save_adapter describes it
    else:
        # speft's default global top-k put 690 of 1024 entries into one 32x32 layer of this model:
        # no single SHiRA r fits that (refused below); a local scope spreads them.
        budget = {"density": 0.05} if method == "sparta" else {"match_lora_rank": 2}
        model, _ = trained(method=method, **budget, **({"scope": "local"} if method == "speft" else {}))
    for layer in spft_layers(model).values():
        layer.mode = mode
        layer.unmerge() if mode == "split" else layer.merge()
    batch = tiny_batches("llama")[0]
    expected = logits(model, batch)
    folder = spft.save_adapter(model, tmp_path / "peft", format="peft")
    assert folder == str(tmp_path / "peft") and sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    layers = spft_layers(model)
    counts = {n: (m.nnz if isinstance(m, spft.SparseDeltaLinear) else m.delta.numel()) for n, m in layers.items()}
    assert config["r"] == max(1, max(-(-counts[n] // (m.in_features + m.out_features)) for n, m in layers.items()))
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), folder)
    shira = shira_entries(loaded)
    assert sorted(shira) == sorted(layers)
    for name, layer in layers.items():  # SHiRA's count rule, met with zeros
        assert shira[name][0].numel() == config["r"] * (layer.in_features + layer.out_features)
        assert int((shira[name][1] != 0).sum()) <= counts[name]
    if mode == "split":  # peft sums W0 + Δ first, the split mode x W0ᵀ + x Δᵀ
        assert torch.allclose(logits(loaded, batch), expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits(loaded, batch), expected)
    # And back: the same kinds, positions and values (the padding is dropped), base checked.
    back = spft.load_adapter(tiny_model("llama", dtype=torch.float32), folder)
    for name, layer in spft_layers(back).items():
        assert type(layer) is type(layers[name])
        assert torch.equal(layer.state_dict()["delta"], layers[name].state_dict()["delta"])
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        spft.load_adapter(tiny_model("llama", seed=7, dtype=torch.float32), folder)


def test_peft_format_with_a_head_and_bf16_values(tmp_path):
    model, _ = trained(method="sparta", density=0.05)
    model.spft_config.modules_to_save = ["lm_head"]
    with torch.no_grad():
        model.lm_head.weight.add_(0.05)
    folder = spft.save_adapter(model, tmp_path, format="peft", dtype=torch.bfloat16)
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), folder)
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, model.lm_head.weight)
    for name, layer in spft_layers(model).items():
        flat, values = shira_entries(loaded)[name]
        trained_here = torch.isin(flat, layer.index.long())
        assert torch.equal(values[trained_here], layer.delta.to(torch.bfloat16).float())
        assert not values[~trained_here].any()


def test_peft_format_refuses_what_shira_cannot_express(tmp_path):
    pst = spft.get_spft_model(tiny_model("llama", dtype=torch.float32), spft.SpftConfig(method="pst", sparsity=0.5))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is a PSTLinear.*cannot express"):
        spft.save_adapter(pst, tmp_path / "pst", format="peft")
    # One r for every layer: a dense-ish 64x64 layer needs r = 29, at which the 4x64 one overflows.
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    net[0] = spft.SparseDeltaLinear.from_linear(net[0], spft.random_index(64, 64, 0.9))
    net[1] = spft.SparseDeltaLinear.from_linear(net[1], spft.random_index(4, 64, 0.1))
    with pytest.raises(ValueError, match=r"one r for the whole adapter.*layer '0'.*needs r >= 29.*layer '1' \(4x64\)"):
        spft.save_adapter(net, tmp_path / "dense", format="peft")
    with pytest.raises(ValueError, match="must be a folder"):
        spft.save_adapter(trained()[0], tmp_path / "a.safetensors", format="peft")
    with pytest.raises(ValueError, match="format must be one of"):
        spft.save_adapter(trained()[0], tmp_path / "x", format="lora")
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


def test_padding_positions_are_free_distinct_and_spread():
    flat = torch.tensor([0, 1, 2, 3, 50, 99])
    padding = _padding(flat, 100, 20)
    assert padding.numel() == 20 and torch.equal(padding, padding.unique())
    assert not bool(torch.isin(padding, flat).any()) and int(padding.max()) >= 80
    assert torch.equal(_padding(torch.arange(10), 12, 2), torch.tensor([10, 11]))  # the only free ones
    assert _padding(flat, 100, 0).numel() == 0


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_from_peft_never_writes_a_tied_head_into_the_embedding(mode):
    """A SHiRA adapter on a tied LM head (its weight is the input embedding's): from_peft computes
    that layer in the split form, so the embedding keeps W0 and the outputs stay peft's; mode
    'merged' is refused before the peft model changes."""
    model = tiny_model("llama", dtype=torch.float64, tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight
    w0 = embedding.detach().clone()
    peft_model = peft.get_peft_model(model, peft.ShiraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                             init_weights=False, random_seed=3))
    batch = tiny_batches("llama")[0]
    expected = logits(peft_model, batch)
    if mode == "merged":
        with pytest.raises(ValueError, match="lm_head.*shares its weight"):
            spft.from_peft(peft_model, mode=mode)
        assert torch.equal(logits(peft_model, batch), expected)  # the peft model is untouched
        return
    converted = spft.from_peft(peft_model, mode=mode)
    layers = spft_layers(converted)
    head = next(layer for name, layer in layers.items() if name.endswith("lm_head"))
    assert not head.merged and head.weight_shared_with is not None
    assert any(layer.merged for name, layer in layers.items() if not name.endswith("lm_head"))
    torch.testing.assert_close(logits(converted, batch), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(converted.model.embed_tokens.weight, w0)
