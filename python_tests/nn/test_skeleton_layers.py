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
        with torch.device("meta"):
            skeleton = cls(IN, OUT, None, **options)
        skeleton = skeleton.to_empty(device="cpu")
    else:
        skeleton = cls(IN, OUT, None, **options)
    result = skeleton.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, IN)
    torch.testing.assert_close(skeleton(x), source(x))
