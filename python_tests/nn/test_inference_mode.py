"""The layers under ``torch.inference_mode`` and ``no_grad``: built, merged, re-indexed, loaded,
cast or evaluated inside an evaluation block, they still evaluate correctly afterwards and train
(no inference tensor is kept as state: they have no version counter and cannot be saved for
backward)."""

import pytest
import torch

import spft_kernels as spft
from spft_kernels.ops._guards import as_int, is_inference, outside_inference_mode

from helpers import dense_weight



class _Blocks:
    """BlockSparseLinear in 2x2 blocks (a 3x3 grid on the 6x5 weight; block 5 is clipped)."""

    @staticmethod
    def from_linear(linear, blocks, **kwargs):
        return spft.BlockSparseLinear.from_linear(linear, blocks, block_size=(2, 2), **kwargs)


LAYERS = {
    "entries": (spft.SparseDeltaLinear, torch.tensor([0, 7, 12, 29])),
    "rows": (spft.RowSparseLinear, torch.tensor([1, 4])),
    "blocks": (_Blocks, torch.tensor([1, 5, 6])),
}
SET_POSITIONS = {"entries": "set_index", "rows": "set_rows", "blocks": "set_blocks"}
CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 6, dtype=torch.float64)


def _expected(layer, x):
    """fp64 oracle of the layer's current function."""
    if isinstance(layer, spft.SparseDeltaLinear):
        weight = dense_weight(_w0(layer), layer.delta, layer.index)
    elif isinstance(layer, spft.BlockSparseLinear):  # its live entries, dead ones of block 5 dropped
        flat, values = layer.entries_of(layer.blocks, {"delta": layer.delta.detach()}, tuple(layer.weight.shape),
                                        layer.options())
        weight = _w0(layer).clone()
        weight.view(-1)[flat] += values.to(weight.dtype)
    else:
        weight = _w0(layer).clone()
        weight[layer.rows] += layer.delta.detach().to(weight.dtype)
    return x @ weight.T + layer.bias.detach()


def _w0(layer):
    state = layer.state_dict()  # W0 whatever the mode
    return state["weight"].to(torch.float64)


def _train_step(layer, x):
    optimizer = torch.optim.SGD([layer.delta], lr=0.1)
    before = layer.delta.detach().clone()
    layer(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.delta.detach(), before), "the optimizer step changed nothing"
    torch.testing.assert_close(layer(x).detach(), _expected(layer, x), rtol=0, atol=1e-12)


def _state_is_normal(layer):
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert not any(is_inference(t) for t in tensors if t is not layer.weight and t is not layer.bias)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("mode", ["auto", "merged", "split"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_built_and_used_inside_an_evaluation_block_then_trained(kind, mode, context):
    cls, positions = LAYERS[kind]
    linear = _linear()
    x = torch.randn(3, 5, dtype=torch.float64)
    with CONTEXTS[context]():
        layer = cls.from_linear(linear, positions, mode=mode)
        with torch.no_grad():
            layer.delta.add_(0.5)
        inside = layer(x)
    _state_is_normal(layer)
    torch.testing.assert_close(inside, _expected(layer, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x).detach(), inside, rtol=0, atol=0)
    _train_step(layer, x)


@pytest.mark.parametrize("kind", LAYERS)
def test_the_issue_reproducer_linear_made_in_inference_mode(kind):
    """The whole linear made inside inference_mode (its weight is an inference tensor, which
    torch forbids writing outside inference mode): auto computes the split form, merged refuses
    with a clear error, and the delta still trains when the input needs no gradient (as
    F.linear does)."""
    cls, positions = LAYERS[kind]
    with torch.inference_mode():
        layer = cls.from_linear(torch.nn.Linear(5, 6), positions)
        layer(torch.randn(2, 5))
    x = torch.randn(2, 5)
    assert layer(x).shape == (2, 6)
    assert not layer.merged
    optimizer = torch.optim.SGD([layer.delta], lr=0.1)
    layer(x).sum().backward()
    optimizer.step()
    assert layer.delta.abs().sum() > 0
    with pytest.raises(ValueError, match="inference tensor"):
        layer.merge()
    with torch.inference_mode():
        linear = torch.nn.Linear(5, 6)
    with pytest.raises(ValueError, match="inference tensor"):
        cls.from_linear(linear, positions, mode="merged")


@pytest.mark.parametrize("kind", LAYERS)
def test_merge_unmerge_and_resync_inside_inference_mode(kind):
    cls, positions = LAYERS[kind]
    layer = cls.from_linear(_linear(), positions, mode="split")
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.inference_mode():
        layer.merge()
        with torch.no_grad():
            layer.delta.add_(0.25)  # stale: the next forward re-syncs inside inference mode
        inside = layer(x)
    _state_is_normal(layer)
    torch.testing.assert_close(inside, _expected(layer, x), rtol=0, atol=1e-12)
    _train_step(layer, x)
    with torch.inference_mode():
        layer.unmerge()
    assert torch.equal(layer.weight.detach(), w0)


@pytest.mark.parametrize("kind", LAYERS)
def test_new_positions_and_state_dict_loaded_inside_inference_mode(kind):
    cls, positions = LAYERS[kind]
    source = cls.from_linear(_linear(), positions, mode="merged")
    with torch.no_grad():
        source.delta.normal_()
    state = source.state_dict()
    target = cls.from_linear(_linear(), positions[:1], mode="merged")
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.inference_mode():
        target(x)
        target.load_state_dict(state)
        target(x)
    _state_is_normal(target)
    torch.testing.assert_close(target(x).detach(), source(x).detach(), rtol=0, atol=1e-12)
    _train_step(target, x)
    with torch.inference_mode():
        getattr(target, SET_POSITIONS[kind])(positions[1:])
    _state_is_normal(target)
    _train_step(target, x)


def test_cast_and_to_linear_inside_inference_mode_give_normal_tensors():
    layer = spft.SparseDeltaLinear.from_linear(torch.nn.Linear(5, 6), torch.tensor([1, 2]))
    with torch.inference_mode():
        layer.to(torch.float64)
        plain = layer.to_linear()
    _state_is_normal(layer)
    assert not plain.weight.is_inference()
    assert layer.delta.dtype == torch.float64  # the master follows the base into fp64 only
    _train_step(layer, torch.randn(2, 5, dtype=torch.float64))


def test_delta_replaced_inside_inference_mode_resyncs_instead_of_raising():
    layer = spft.SparseDeltaLinear.from_linear(_linear(), torch.tensor([3, 4]), mode="merged")
    x = torch.randn(2, 5, dtype=torch.float64)
    layer(x)
    with torch.inference_mode():
        layer.delta.data = torch.full((2,), 2.0, dtype=torch.float32)
    with torch.no_grad():  # (autograd cannot save an inference tensor: torch's rule, not the layer's)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=1e-6)
        layer.delta.data = torch.full((2,), -1.0, dtype=torch.float32)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=1e-6)


def test_pst_layer_built_inside_inference_mode_trains():
    # (an inference tensor W0 and the threshold cache under inference_mode: PST's cache, issue 19)
    linear = _linear()
    with torch.inference_mode():
        layer = spft.PSTLinear.from_linear(linear, 0.0, r1=2, r2=2)
    assert not any(factor.is_inference() for factor in layer.factors())
    optimizer = torch.optim.SGD(layer.factors(), lr=0.1)
    layer(torch.randn(3, 5, dtype=torch.float64)).square().sum().backward()
    optimizer.step()


def test_guards():
    with torch.inference_mode():
        with outside_inference_mode():
            made = torch.zeros(2)
            assert not torch.is_grad_enabled()  # the caller's grad mode, not inference_mode(False)'s
        assert torch.zeros(2).is_inference()
    assert not made.is_inference()
    assert as_int(True) is None and as_int(2.0) is None and as_int(torch.tensor(3)) == 3
