"""A delta layer built with no positions (``positions=None``) is a valid layer with nothing to
train: it prints, computes the plain linear and takes a state dict, on a real device or as a
meta-device skeleton materialised with ``to_empty`` (how large models are built without
allocating twice)."""

import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft

IN, OUT = 32, 48
KINDS = {
    "entries": (spft.SparseDeltaLinear, torch.tensor([1, 5, 40, 1500]), {}),
    "rows": (spft.RowSparseLinear, torch.tensor([1, 5]), {}),
    "blocks": (spft.BlockSparseLinear, torch.tensor([0, 3]), {"block_size": (16, 16)}),
}


def _trained(kind):
    cls, positions, options = KINDS[kind]
    torch.manual_seed(0)
    layer = cls.from_linear(torch.nn.Linear(IN, OUT), positions, **options)
    with torch.no_grad():
        layer.delta.normal_()
    return layer


@pytest.mark.parametrize("kind", KINDS)
def test_no_positions_is_an_empty_layer(kind):
    cls, _, options = KINDS[kind]
    layer = cls(IN, OUT, None, **options)
    assert layer.delta.numel() == 0 and "mode=auto" in repr(layer)
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on_meta", [False, True])
def test_a_skeleton_takes_a_state_dict(kind, on_meta):
    cls, _, options = KINDS[kind]
    source = _trained(kind)
    if on_meta:
        skeleton = cls(IN, OUT, None, device="meta", **options)  # (see the assignment test below)
        assert skeleton.weight.is_meta
        skeleton = skeleton.to_empty(device="cpu")
    else:
        skeleton = cls(IN, OUT, None, **options)
    result = skeleton.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, IN)
    torch.testing.assert_close(skeleton(x), source(x))


def _state(layer):
    """A copy of the layer's state dict (the layers under test never share tensors with it)."""
    return {key: value.clone() for key, value in layer.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_meta_skeleton_takes_a_state_dict_by_assignment(kind):
    cls, _, options = KINDS[kind]
    source = _trained(kind)
    # (device= rather than `with torch.device("meta")`, which conftest's poisoned torch.empty escapes)
    skeleton = cls(IN, OUT, None, device="meta", **options)
    assert skeleton.weight.is_meta and skeleton.positions().is_meta
    result = skeleton.load_state_dict(_state(source), assign=True)  # CPU tensors into a meta layer
    assert not result.missing_keys and not result.unexpected_keys
    assert all(t.device.type == "cpu" for t in list(skeleton.parameters()) + list(skeleton.buffers()))
    assert torch.equal(skeleton.positions(), source.positions())
    x = torch.randn(3, IN)
    torch.testing.assert_close(skeleton(x), source(x), rtol=0, atol=0)
    skeleton(x).square().sum().backward()
    assert skeleton.delta.grad is not None and skeleton.delta.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [False, True])
def test_a_layer_moved_to_meta_and_emptied_takes_a_state_dict(kind, merged):
    cls, positions, options = KINDS[kind]
    source = _trained(kind)
    x = torch.randn(3, IN)
    torch.manual_seed(1)
    layer = cls.from_linear(torch.nn.Linear(IN, OUT), positions, **options)
    if merged:
        layer(x)  # merges W0 + Δ into its weight and keeps W0 at the positions aside
    layer = layer.to("meta").to_empty(device="cpu")  # uninitialised values everywhere
    assert not layer.merged  # nothing holds W0 + Δ or the kept W0 any more
    result = layer.load_state_dict(_state(source))
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)
    layer.unmerge()
    assert torch.equal(layer.weight, source.state_dict()["weight"])  # W0 exactly
