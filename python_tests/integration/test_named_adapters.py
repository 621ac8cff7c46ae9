"""Named adapters and ``disable_adapter()`` as peft users know them: several adapters on one base,
one active, switched exactly (bitwise) in merged and split modes, every layer on the base's own
W0 tensors; inside ``disable_adapter()`` the outputs are bitwise the base model's and nothing of
the training (deltas, gradients, optimizer state, the merged weight) changes."""

from __future__ import annotations

import copy
import os
import weakref

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "entries-merged": dict(method="sparta", density=0.1, mode="merged"),
    "entries-split": dict(method="sparta", density=0.1, mode="split"),
    "rows": dict(method="spruft", density=0.1),
    "blocks": dict(method="sparta", density=0.25, block_size=(4, 4)),
    "pst": dict(method="pst", sparsity=0.3, pst_r1=2, pst_r2=3, backend="reference"),
}


def _converted(name="entries-merged", **overrides):
    return spft.get_spft_model(tiny_model("llama", dtype=torch.float32),
                               spft.SpftConfig(**{**CONFIGS[name], **overrides}))


def _train(model, steps=2, seed=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in tiny_batches("llama", count=steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _training_state(model, optimizer):
    """Copies of everything training depends on, and the identities of the tensors."""
    layers = spft_layers(model)
    values = {f"{n}.{label}": t.detach().clone() for n, l in layers.items() for label, t in l.trainable_tensors().items()}
    grads = {f"{n}.{label}": t.grad.clone() for n, l in layers.items() for label, t in l.trainable_tensors().items()}
    weights = {n: l.weight.detach().clone() for n, l in layers.items()}
    moments = {(id(p), k): v.clone() for p, state in optimizer.state.items() for k, v in state.items()}
    identity = {n: (l, l.weight, *l.trainable_tensors().values()) for n, l in layers.items()}
    merged = {n: getattr(l, "merged", None) for n, l in layers.items()}
    return values, grads, weights, moments, identity, merged


def _same_state(model, optimizer, before):
    values, grads, weights, moments, identity, merged = _training_state(model, optimizer)
    assert values.keys() == before[0].keys() and all(torch.equal(values[k], before[0][k]) for k in values)
    assert all(torch.equal(grads[k], before[1][k]) for k in grads)
    assert all(torch.equal(weights[k], before[2][k]) for k in weights)
    assert moments.keys() == before[3].keys() and all(torch.equal(moments[k], before[3][k]) for k in moments)
    assert all(a is b for n in identity for a, b in zip(identity[n], before[4][n]))
    assert merged == before[5]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_disable_adapter_gives_the_base_bitwise_and_leaves_the_training(name):
    model = _converted(name)
    optimizer = _train(model)
    batch = tiny_batches("llama", seed=7)[0]
    model(**batch).loss.backward()  # gradients pending for the next step
    model.eval()
    trained = _logits(model, batch)
    base = _logits(tiny_model("llama", dtype=torch.float32), batch)
    assert not torch.equal(trained, base)
    before = _training_state(model, optimizer)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), base)
        with model.disable_adapter():  # nested: still the base, and the outer context still holds after it
            assert torch.equal(_logits(model, batch), base)
        assert torch.equal(_logits(model, batch), base)
    _same_state(model, optimizer, before)
    assert torch.equal(_logits(model, batch), trained)


def test_disable_adapter_between_a_forward_and_its_backward():
    """DPO's order: policy forward, reference forward with the adapter disabled, policy backward. In
    merged mode the policy's forward saved the merged weight; its gradients are those of a twin
    that never ran the reference."""
    model = _converted("entries-merged")
    _train(model)
    twin = copy.deepcopy(model)
    batch = tiny_batches("llama", seed=7)[0]
    loss = model(**batch).loss
    with torch.no_grad(), model.disable_adapter():
        model(**batch)
    loss.backward()
    twin(**batch).loss.backward()
    for (name, layer), other in zip(spft_layers(model).items(), spft_layers(twin).values()):
        assert torch.equal(layer.delta.grad, other.delta.grad), name


@pytest.mark.parametrize("name", ["entries-merged", "entries-split", "rows"])
def test_named_adapters_switch_exactly_on_the_same_base(name):
    model = _converted(name)
    # Weak references: a strong one would hold the weights too, and a layer merges only into a
    # weight nothing else holds (it would merge into a copy of its own instead).
    weights = {n: weakref.ref(layer.weight) for n, layer in spft_layers(model).items()}
    _train(model)
    batch = tiny_batches("llama", seed=7)[0]
    model.eval()
    trained_a = _logits(model, batch)
    base = _logits(tiny_model("llama", dtype=torch.float32), batch)
    deltas_a = {n: layer.trainable_tensors() for n, layer in spft_layers(model).items()}

    model.add_adapter("b", spft.SpftConfig(**{**CONFIGS[name], "seed": 5}))
    assert model.adapter_names() == ["default", "b"] and model.active_adapters() == ["default"]
    # The active adapter's own layers and deltas are back: an optimizer over them still trains them.
    assert {n: layer.trainable_tensors() for n, layer in spft_layers(model).items()} == deltas_a
    assert torch.equal(_logits(model, batch), trained_a)

    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    assert torch.equal(_logits(model, batch), base)  # a new adapter starts at zero
    model.train()
    _train(model, seed=3)
    model.eval()
    trained_b = _logits(model, batch)
    assert not torch.equal(trained_b, trained_a) and not torch.equal(trained_b, base)

    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), trained_a)
    model.set_adapter("b")
    assert torch.equal(_logits(model, batch), trained_b)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), base)
    # No adapter ever copied the base: every layer computes on the weight tensors the base had.
    for n, layer in spft_layers(model).items():
        assert layer.weight is weights[n]()
    del layer  # (a layer of adapter b held here would hold its weight too: the next layers would merge into copies)
    model.set_adapter("default")
    for n, layer in spft_layers(model).items():
        assert layer.weight is weights[n]()


def test_load_adapter_under_a_name_and_save_them_all(tmp_path):
    source = _converted("entries-merged")
    _train(source, seed=4)
    source.eval()
    batch = tiny_batches("llama", seed=7)[0]
    expected = _logits(source, batch)
    path = spft.save_adapter(source, tmp_path / "x")

    model = _converted("entries-merged", seed=2)  # other positions, the same mode: bitwise
    _train(model)
    model.eval()
    trained = _logits(model, batch)
    model.load_adapter(path, adapter_name="x")
    assert torch.equal(_logits(model, batch), trained)  # loaded aside
    model.set_adapter("x")
    assert torch.equal(_logits(model, batch), expected)
    model.set_adapter("default")

    model.save_pretrained(tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["adapter_config.json", "spft_adapter.safetensors", "x"]
    default = spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path / "all")
    other = spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path / "all" / "x")
    assert torch.equal(_logits(default.eval(), batch), trained)
    assert torch.equal(_logits(other.eval(), batch), expected)


def test_delete_adapter():
    model = _converted()
    model.add_adapter("b", spft.SpftConfig(**CONFIGS["entries-merged"]))
    model.add_adapter("c", spft.SpftConfig(**CONFIGS["entries-merged"]))
    model.delete_adapter("c")
    assert model.adapter_names() == ["default", "b"]
    with pytest.warns(UserWarning, match="'b' is active now"):
        model.delete_adapter("default")
    assert model.adapter_names() == ["b"]
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        model.set_adapter("zz")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        model.add_adapter("b", spft.SpftConfig(**CONFIGS["entries-merged"]))
    with pytest.raises(ValueError, match="folder name"):
        model.add_adapter("a/b", spft.SpftConfig(**CONFIGS["entries-merged"]))


def test_nothing_switches_inside_disable_adapter():
    model = _converted()
    model.add_adapter("b", spft.SpftConfig(**CONFIGS["entries-merged"]))
    with model.disable_adapter():
        for call in (lambda: model.set_adapter("b"), lambda: model.delete_adapter("b"),
                     lambda: model.add_adapter("c", spft.SpftConfig(**CONFIGS["entries-merged"]))):
            with pytest.raises(RuntimeError, match="disable_adapter"):
                call()
    model.set_adapter("b")  # fine after it


def test_modules_to_save_cannot_be_disabled_or_switched_to_adapters_without_them(tmp_path):
    config = spft.SpftConfig(method="sparta", density=0.1, modules_to_save=["classifier"])
    model = spft.get_spft_model(tiny_model("bert", dtype=torch.float32), config)
    with pytest.raises(ValueError, match="modules_to_save"):
        with model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_adapter("b", spft.SpftConfig(method="sparta", density=0.1))
    plain = spft.get_spft_model(tiny_model("bert", dtype=torch.float32), spft.SpftConfig(method="sparta", density=0.1))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.load_adapter(spft.save_adapter(plain, tmp_path / "plain"), adapter_name="plain")
    # Adapters with the same saved head switch, each with its own head.
    other = spft.get_spft_model(tiny_model("bert", seed=3, dtype=torch.float32), config)
    with torch.no_grad():
        other.classifier.weight.add_(0.5)
    other_path = spft.save_adapter(other, tmp_path / "other")
    batch = tiny_batches("bert")[0]
    head = model.classifier.weight.detach().clone()
    model.load_adapter(other_path, adapter_name="other", check_base=False)
    assert torch.equal(model.classifier.weight, head)
    model.set_adapter("other")
    assert torch.equal(model.classifier.weight, other.classifier.weight)
    model.set_adapter("default")
    assert torch.equal(model.classifier.weight, head)
    assert model(**batch).logits.shape[0] == batch["input_ids"].shape[0]


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_disable_adapter_after_dynamic_mask_folds_gives_the_original_base(mode):
    """A dynamic mask folds trained values into W0; the base model is the one before any fold."""
    model = spft.get_spft_model(tiny_model("llama"), spft.SpftConfig(
        method="speft", density=0.05, metric="magnitude", mask_update_interval=1, mode=mode))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    mask = spft.make_dynamic_mask(model, optimizer, None, None)
    batches = tiny_batches("llama", count=3)
    for step, batch in enumerate(batches, 1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mask.step(step)
    assert all(layer.folded_w0() is not None for layer in spft_layers(model).values())
    with model.disable_adapter():
        assert torch.equal(_logits(model, batches[0]), _logits(tiny_model("llama"), batches[0]))
    with pytest.raises(ValueError, match="folded"):
        model.add_adapter("b", spft.SpftConfig(method="sparta", density=0.05))


def test_add_adapter_waits_for_a_state_dict_that_holds_w0():
    """A live state dict of a merged layer holds W0 from its weight (nn/w0_loan.py): building another
    adapter on that weight is refused before anything changes, and works once it is gone."""
    model = _converted("entries-merged")
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="state dict"):
        model.add_adapter("b", spft.SpftConfig(**CONFIGS["entries-merged"]))
    assert model.adapter_names() == ["default"]
    del state
    model.add_adapter("b", spft.SpftConfig(**CONFIGS["entries-merged"]))
    assert model.adapter_names() == ["default", "b"]
