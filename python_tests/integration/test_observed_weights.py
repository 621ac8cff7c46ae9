"""No tensor that anything outside a layer can observe is ever changed (nn/frozen_base.py,
``observers``): other models built on the same base tensors, two layers on one linear, state
dicts held across conversions, adapter swaps and training (views, ``keep_vars``, numpy arrays,
storages). Mode 'auto' computes the split form while something else sees the weight (and merges
once it is gone); mode 'merged' merges into a private copy. Plus ``set_mode``, ``load_adapter(...,
mode=)`` and saving a compiled model."""

import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import convert, one_thread, tiny_batches, tiny_model, train  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "entries": dict(method="speft", density=0.2, metric="magnitude"),
    "rows": dict(method="spruft", density=0.3),
    "blocks": dict(method="speft", density=0.3, metric="magnitude", kind="blocks", block_size=(8, 8)),
}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _twin_on_the_same_tensors(model):
    """A second model whose parameters are the first one's tensors (a reference model built on
    the policy's base weights, as DPO / PPO set-ups do)."""
    twin = tiny_model("llama")
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin


def _same_parameters(model):
    """A second model holding the first one's Parameter objects themselves."""
    twin = copy.deepcopy(model)
    for name, parameter in model.named_parameters():
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, parameter)
    return twin


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("share", ["tensors", "parameters"])
def test_a_model_on_the_same_base_tensors_never_sees_the_other_s_delta(kind, share):
    batches = tiny_batches("llama")
    policy = tiny_model("llama")
    reference = (_twin_on_the_same_tensors if share == "tensors" else _same_parameters)(policy)
    expected = _logits(reference, batches[0])
    alone = spft.get_spft_model(tiny_model("llama"), spft.SpftConfig(**CONFIGS[kind]))
    train(alone, batches, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spft.get_spft_model(policy, spft.SpftConfig(**CONFIGS[kind]))
        train(policy, batches, steps=3)
    # on main: the reference's logits moved by ~0.27 (W0 + delta written into the shared tensors)
    assert torch.equal(_logits(reference, batches[0]), expected)
    # the policy trains as it does on its own base (split form: within fp64 rounding)
    torch.testing.assert_close(_logits(policy, batches[1]), _logits(alone, batches[1]), rtol=1e-10, atol=1e-12)
    assert all(not layer.merged for layer in spft_layers(policy).values())
    said = [str(w.message) for w in caught if "mode 'auto' computes the split form" in str(w.message)]
    assert said and len(said) == len(spft_layers(policy))  # once per layer, naming it
    assert all(name in message for name, message in zip(spft_layers(policy), said))


def test_mode_merged_on_shared_tensors_merges_into_a_private_copy():
    batches = tiny_batches("llama")
    policy = tiny_model("llama")
    reference = _twin_on_the_same_tensors(policy)
    expected = _logits(reference, batches[0])
    with pytest.warns(UserWarning, match="merges into a copy of its own"):
        spft.get_spft_model(policy, spft.SpftConfig(mode="merged", **CONFIGS["entries"]))
    train(policy, batches, steps=2)
    assert all(layer.merged for layer in spft_layers(policy).values())
    assert torch.equal(_logits(reference, batches[0]), expected)


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_two_layers_on_one_linear_each_compute_their_own_delta(mode):
    torch.manual_seed(0)
    linear = nn.Linear(16, 12, dtype=torch.float64)
    w0 = linear.weight.detach().clone()
    first = spft.SparseDeltaLinear.from_linear(linear, torch.tensor([0, 5, 40]), mode=mode)
    second = spft.RowSparseLinear.from_linear(linear, torch.tensor([1, 7]), mode=mode)
    with torch.no_grad():
        first.delta.normal_()
        second.delta.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_first, y_second, y_linear = first(x), second(x), linear(x)
    # on main: wrong by up to 3.9 (each layer wrote its W0 + delta into the one weight)
    torch.testing.assert_close(y_first, nn.functional.linear(x, first.merged_weight(), linear.bias))
    torch.testing.assert_close(y_second, nn.functional.linear(x, second.merged_weight(), linear.bias))
    assert torch.equal(linear.weight, w0) and torch.equal(y_linear, nn.functional.linear(x, w0, linear.bias))


def _converted(kind="entries", seed=0):
    model = spft.get_spft_model(tiny_model("llama", seed=seed), spft.SpftConfig(**CONFIGS[kind]))
    train(model, tiny_batches("llama"), steps=2)
    return model


@pytest.mark.parametrize("swap", ["load_adapter", "merge_adapters", "unload_then_convert"])
def test_a_held_state_dict_keeps_w0_across_adapter_swaps(tmp_path, swap):
    model = _converted()
    first = tmp_path / "first.safetensors"
    spft.save_adapter(model, first)
    other = _converted("entries", seed=0)
    with torch.no_grad():
        for layer in spft_layers(other).values():
            layer.delta.add_(0.5)
    second = tmp_path / "second.safetensors"
    spft.save_adapter(other, second)
    held = model.state_dict()
    expected = {key: value.clone() for key, value in held.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if swap == "load_adapter":
            spft.load_adapter(model, second)
        elif swap == "merge_adapters":
            spft.merge_adapters(model, [first, second], weights=[0.5, 0.5])
        else:
            spft.unload(model)
            spft.get_spft_model(model, spft.SpftConfig(**CONFIGS["rows"]))
        train(model, tiny_batches("llama"), steps=2)
    # on main: 14 of 14 weights held W0 + delta_new afterwards
    changed = [key for key in expected if not torch.equal(held[key], expected[key])]
    assert not changed, changed


def test_keep_vars_state_dict_before_the_first_merge_does_not_count_delta_twice():
    indices = {name: spft.random_index(m.out_features, m.in_features, 0.2, torch.Generator().manual_seed(3))
               for name, m in tiny_model("llama").named_modules() if name.endswith("mlp.up_proj")}
    model = convert(tiny_model("llama"), indices, mode="auto")  # merges at its first forward
    held = model.state_dict(keep_vars=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, tiny_batches("llama"), steps=2)
    fresh = convert(tiny_model("llama"), indices, mode="auto")
    fresh.load_state_dict(held)
    # on main: off by ~0.021 (the live weight held W0 + delta, the delta came on top)
    batch = tiny_batches("llama")[1]
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keep", ["numpy", "untyped_storage", "view"])
def test_what_outlives_a_state_dict_keeps_w0(keep):
    model = _converted()
    name = next(iter(spft_layers(model)))
    state = model.state_dict()
    w0 = state[f"{name}.weight"].clone()
    tensor = state[f"{name}.weight"]
    kept = {"numpy": lambda: tensor.numpy(), "untyped_storage": lambda: tensor.untyped_storage(),
            "view": lambda: tensor.view(-1)}[keep]()
    del state, tensor
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, tiny_batches("llama"), steps=2)
    if keep == "untyped_storage":
        seen = torch.tensor([], dtype=w0.dtype).set_(kept).view(w0.shape)
    else:
        seen = torch.as_tensor(kept).view(w0.shape)
    # on main: the loan ended with the state dict's tensor and the array showed W0 + delta
    assert torch.equal(seen, w0)
    del kept, seen
    train(model, tiny_batches("llama"), steps=1)
    assert spft_layers(model)[name].merged and spft_layers(model)[name]._computes_merged()  # merged again


def test_converted_model_merges_and_holds_its_own_weights():
    model = _converted()
    assert all(layer.merged and layer._computes_merged() for layer in spft_layers(model).values())


def test_set_mode_switches_every_layer_all_or_nothing():
    model = _converted()
    batch = tiny_batches("llama")[1]
    expected = _logits(model, batch)
    spft.set_mode(model, "split")
    assert all(not layer.merged and layer.mode == "split" for layer in spft_layers(model).values())
    torch.testing.assert_close(_logits(model, batch), expected, rtol=1e-10, atol=1e-12)
    spft.set_mode(model, "merged")
    torch.testing.assert_close(_logits(model, batch), expected, rtol=1e-10, atol=1e-12)
    assert all(layer.merged for layer in spft_layers(model).values())
    with pytest.raises(ValueError, match="unknown mode"):
        spft.set_mode(model, "fast")
    rows = spft.get_spft_model(tiny_model("llama"), spft.SpftConfig(**CONFIGS["rows"]))
    with pytest.raises(NotImplementedError, match="fused"):
        spft.set_mode(rows, "fused")
    assert all(layer.mode == "auto" for layer in spft_layers(rows).values())  # nothing changed


def test_load_adapter_takes_a_mode(tmp_path):
    model = _converted()
    path = tmp_path / "a.safetensors"
    spft.save_adapter(model, path)
    loaded = spft.load_adapter(tiny_model("llama"), path, mode="split")
    assert all(layer.mode == "split" for layer in spft_layers(loaded).values())
    batch = tiny_batches("llama")[1]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unknown mode"):
        spft.load_adapter(tiny_model("llama"), path, mode="fast")


def test_save_adapter_of_a_compiled_model_loads_back(tmp_path):
    model = _converted()
    compiled = torch.compile(model, backend="eager")
    path = tmp_path / "a.safetensors"
    spft.save_adapter(compiled, path)  # on main: "_orig_mod."-prefixed names that load_adapter refuses
    loaded = spft.load_adapter(tiny_model("llama"), path)
    batch = tiny_batches("llama")[1]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-10, atol=1e-12)
    spft.load_adapter(compiled, path)  # and into the compiled model itself
