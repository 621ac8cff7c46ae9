"""``load_state_dict`` into the delta layers is all or nothing: positions, delta and every other
entry are checked before the layer changes, and new positions without their delta are an error
naming the key (strict or not: there is nothing to train from). The layer, its merged weight and
its forward are bitwise what they were after any refused load."""

import pytest
import torch

import spft_kernels as spft

KINDS = {
    "entries": (spft.SparseDeltaLinear, torch.tensor([0, 7, 12]), torch.tensor([1, 2, 3, 20]), "index"),
    "rows": (spft.RowSparseLinear, torch.tensor([0, 3]), torch.tensor([1, 2, 5]), "rows"),
}


def _layer(kind, mode):
    cls, positions, _, _ = KINDS[kind]
    torch.manual_seed(0)
    layer = cls.from_linear(torch.nn.Linear(5, 6, dtype=torch.float64), positions, mode=mode)
    with torch.no_grad():
        layer.delta.normal_()
    layer(torch.randn(1, 5, dtype=torch.float64))  # merges in mode merged
    return layer


def _snapshot(layer):
    return {
        # W0 + delta as the layer computes it: a merged layer's state_dict() writes W0 back into
        # its weight and lends it (nn/w0_loan.py) until the next forward re-syncs.
        "weight": layer.merged_weight(),
        "state": {k: v.clone() for k, v in layer.state_dict().items()},
        "buffers": {k: v.clone() for k, v in layer.named_buffers()},
        "merged": layer.merged,
        "delta": layer.delta,
    }


def _assert_unchanged(layer, before):
    assert torch.equal(layer.merged_weight(), before["weight"])
    assert layer.merged == before["merged"]
    assert layer.delta is before["delta"]
    state = layer.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), key
    for key, value in layer.named_buffers():
        assert torch.equal(value, before["buffers"][key]), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["merged", "split"])
@pytest.mark.parametrize("strict", [True, False])
def test_new_positions_without_delta_are_refused_naming_the_key(kind, mode, strict):
    layer = _layer(kind, mode)
    _, _, new_positions, key = KINDS[kind]
    before = _snapshot(layer)
    state = {"weight": before["state"]["weight"], "bias": before["state"]["bias"], key: new_positions}
    with pytest.raises(RuntimeError, match=rf"{key} gives new positions .* but delta is missing"):
        layer.load_state_dict(state, strict=strict)
    _assert_unchanged(layer, before)
    x = torch.randn(3, 5, dtype=torch.float64)
    reference = _layer(kind, mode)
    assert torch.equal(layer(x), reference(x))  # no garbage merged into the weight


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_positions_without_delta_keep_the_delta(kind):
    layer = _layer(kind, "merged")
    before = _snapshot(layer)
    state = {k: v for k, v in before["state"].items() if k != "delta"}
    with pytest.raises(RuntimeError, match="Missing key.*delta"):
        layer.load_state_dict(state)
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["delta"]
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda s, k: s.update(weight=torch.zeros(6, 4, dtype=torch.float64)), id="weight-shape"),
        pytest.param(lambda s, k: s.update(bias=torch.zeros(7, dtype=torch.float64)), id="bias-shape"),
        pytest.param(lambda s, k: s.update(delta=s["delta"][:1]), id="delta-shape"),
        pytest.param(lambda s, k: s.update(delta=s["delta"].long()), id="integer-delta"),
        pytest.param(lambda s, k: (s.pop(k), s.update(delta=s["delta"][:1])), id="delta-without-positions"),
    ],
)
def test_any_bad_entry_leaves_the_layer_as_it_was(kind, corrupt):
    layer = _layer(kind, "merged")
    source = _layer(kind, "split")
    _, _, new_positions, key = KINDS[kind]
    count = new_positions.numel()
    shape = (count,) if kind == "entries" else (count, 5)
    state = dict(source.state_dict())
    state.update({key: new_positions, "delta": torch.randn(shape, dtype=torch.float64)})
    corrupt(state, key)
    before = _snapshot(layer)
    with pytest.raises((RuntimeError, ValueError)):
        layer.load_state_dict(state)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strict", [True, False])
def test_bad_positions_raise_before_anything_changes(kind, strict):
    layer = _layer(kind, "merged")
    _, _, new_positions, key = KINDS[kind]
    before = _snapshot(layer)
    state = dict(before["state"])
    state[key] = torch.tensor([0, 0])  # duplicates
    state["delta"] = torch.zeros((2,) if kind == "entries" else (2, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match="duplicate"):
        layer.load_state_dict(state, strict=strict)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["merged", "split"])
def test_a_good_state_dict_with_new_positions_still_loads(kind, mode):
    layer = _layer(kind, mode)
    cls, _, new_positions, key = KINDS[kind]
    torch.manual_seed(3)
    source = cls.from_linear(torch.nn.Linear(5, 6, dtype=torch.float64), new_positions.flip(0).sort().values)
    with torch.no_grad():
        source.delta.normal_()
    layer.load_state_dict(source.state_dict())
    assert torch.equal(getattr(layer, key).long(), new_positions.long())
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=1e-12)
