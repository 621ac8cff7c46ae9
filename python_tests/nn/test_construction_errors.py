"""Bad or unusual construction input gets a named ``ValueError`` before anything changes: meta
positions, a non-floating ``delta_dtype``, an ``nn.MultiheadAttention.out_proj`` (which its
parent reads itself); numpy integers are valid sizes."""

import re

import numpy as np
import pytest
import torch

import spft_kernels as spft

LAYERS = {
    "entries": (spft.SparseDeltaLinear, torch.tensor([0, 7])),
    "rows": (spft.RowSparseLinear, torch.tensor([1, 4])),
}


def _flags(linear):
    return linear.weight.requires_grad, linear.bias.requires_grad


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("delta_dtype", [torch.int32, torch.bool, torch.complex64, "float32", None])
def test_a_non_floating_delta_dtype_fails_early_leaving_the_linear_as_it_was(kind, delta_dtype):
    cls, positions = LAYERS[kind]
    linear = torch.nn.Linear(5, 6)
    weight = linear.weight.detach().clone()
    with pytest.raises(ValueError, match="delta_dtype must be a floating-point torch.dtype"):
        cls.from_linear(linear, positions, delta_dtype=delta_dtype)
    assert _flags(linear) == (True, True)
    assert torch.equal(linear.weight.detach(), weight)
    with pytest.raises(ValueError, match="delta_dtype"):
        cls(5, 6, positions, delta_dtype=delta_dtype)


@pytest.mark.parametrize("kind", LAYERS)
def test_a_failure_while_installing_restores_the_linears_flags(kind, monkeypatch):
    cls, positions = LAYERS[kind]
    linear = torch.nn.Linear(5, 6)

    def fail(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(cls, "_adopt", fail)
    with pytest.raises(MemoryError):
        cls.from_linear(linear, positions)
    assert _flags(linear) == (True, True)


@pytest.mark.parametrize("kind", LAYERS)
def test_meta_positions_are_named(kind):
    cls, positions = LAYERS[kind]
    with pytest.raises(ValueError, match="meta device"):
        cls(5, 6, positions.to("meta"), device="meta")
    with pytest.raises(ValueError, match="on meta but the weight is on cpu"):
        cls.from_linear(torch.nn.Linear(5, 6), positions.to("meta"))
    with pytest.raises(ValueError, match="meta device"):
        cls.from_linear(torch.nn.Linear(5, 6, device="meta"), positions)
    layer = cls.from_linear(torch.nn.Linear(5, 6), positions)
    key = "index" if kind == "entries" else "rows"
    state = dict(layer.state_dict(), **{key: positions.to("meta")})
    with pytest.raises(ValueError, match="on meta"):
        layer.load_state_dict(state)


def test_meta_index_in_the_functional_op_is_named():
    with pytest.raises(ValueError, match="meta device"):
        spft.SparseIndex.build(torch.tensor([1, 2], device="meta"), 4, 4)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint16])
def test_numpy_integers_are_sizes(kind, integer):
    cls, positions = LAYERS[kind]
    layer = cls(integer(5), integer(6), positions)
    assert (layer.in_features, layer.out_features) == (5, 6)
    assert type(layer.in_features) is int  # uint16 arithmetic would wrap in the index metadata
    layer = cls.from_linear(torch.nn.Linear(integer(5), integer(6)), positions)
    assert type(layer.in_features) is int
    assert type(spft.PSTLinear(integer(5), integer(6), r1=integer(1), r2=1).in_features) is int
    index = spft.random_index(integer(6), integer(5), np.float32(0.5), generator=torch.Generator().manual_seed(0))
    assert index.numel() == 15
    assert torch.equal(index, spft.random_index(6, 5, 0.5, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("bad", [5.0, "5", True, np.float64(5.0), -1])
def test_refused_sizes_are_shown_with_their_type(bad):
    shown = re.escape(f"{bad!r} ({type(bad).__name__})")
    with pytest.raises(ValueError, match=r"must be non-negative integers, got out_features=" + shown):
        spft.random_index(bad, 5, 0.5)
    with pytest.raises(ValueError, match=r"must be non-negative integers, got 5 \(int\) and " + shown):
        spft.SparseDeltaLinear(5, bad, None)


def test_multihead_attention_out_proj_is_refused():
    attention = torch.nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention.*silently ignored"):
        spft.SparseDeltaLinear.from_linear(attention.out_proj, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        spft.RowSparseLinear.from_linear(attention.out_proj, torch.tensor([0]))
    assert attention.out_proj.weight.requires_grad
