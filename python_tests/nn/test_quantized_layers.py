"""Every position kind over a bitsandbytes-quantized base (4-bit nf4/fp4 with and without double
quantization, 8-bit): outputs and gradients equal the same layer over a dense base holding
dequant(Wq); what cannot work (merged/fused mode, folding, PST) is a clear error before any change."""

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from python_tests.quantized import QUANTIZATIONS, quantized_linear, tolerance
from spft_kernels.nn.bnb_base import quantized_base_for

pytest.importorskip("bitsandbytes")

OUT, IN = 45, 67
KINDS = {
    "entries": lambda linear, **kw: spft.SparseDeltaLinear.from_linear(linear, torch.arange(0, OUT * IN, 11), **kw),
    "rows": lambda linear, **kw: spft.RowSparseLinear.from_linear(linear, torch.tensor([0, 7, 44]), **kw),
    "blocks": lambda linear, **kw: spft.BlockSparseLinear.from_linear(linear, torch.tensor([0, 4, 8]), block_size=(16, 16), **kw),
}


def _dense_twin(module):
    """An nn.Linear holding dequant(Wq) and the bias, in the compute dtype."""
    base = quantized_base_for(module)
    dense = nn.Linear(IN, OUT, device="meta", dtype=base.compute_dtype)
    dense.weight = nn.Parameter(base.dequantize(), requires_grad=False)
    dense.bias = nn.Parameter(module.bias.detach().to(base.compute_dtype).clone(), requires_grad=False)
    return dense


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_over_a_quantized_base_equals_the_dense_dequantized_layer(kind, quantization, dtype):
    module = quantized_linear(quantization, IN, OUT, compute_dtype=dtype)
    layer = KINDS[kind](module)
    reference = KINDS[kind](_dense_twin(module), mode="split")
    torch.manual_seed(2)
    with torch.no_grad():
        layer.delta.normal_(std=0.1)
        reference.delta.copy_(layer.delta)
    for shape in ((1, IN), (2, 3, IN)):
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, y_ref = layer(x), reference(x_ref)
        torch.testing.assert_close(y, y_ref, **tolerance(dtype))
        dy = torch.randn_like(y)
        dx, ddelta = torch.autograd.grad(y, [x, layer.delta], dy)
        dx_ref, ddelta_ref = torch.autograd.grad(y_ref, [x_ref, reference.delta], dy)
        torch.testing.assert_close(dx, dx_ref, **tolerance(dtype))
        torch.testing.assert_close(ddelta, ddelta_ref, **tolerance(dtype))
    assert not layer.merged and layer.weight is module.weight  # auto computed split; W0 shared, not copied
    merged = layer.to_linear()  # dequant(Wq) + Δ in the compute dtype
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    torch.testing.assert_close(merged.weight, reference.merged_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("kind, mode", [(kind, "merged") for kind in KINDS] + [("entries", "fused")])
def test_modes_that_write_into_the_weight_are_refused_before_any_change(kind, mode):
    module = quantized_linear("nf4", IN, OUT)
    flags = (module.weight.requires_grad, module.bias.requires_grad)
    with pytest.raises(ValueError, match="quantized"):
        KINDS[kind](module, mode=mode)
    assert (module.weight.requires_grad, module.bias.requires_grad) == flags


def test_merge_and_fold_are_refused_and_pst_says_why():
    module = quantized_linear("int8", IN, OUT)
    layer = KINDS["entries"](module)
    with pytest.raises(ValueError, match="cannot hold it"):
        layer.merge()
    with pytest.raises(ValueError, match="folding writes"):
        layer.fold_delta()
    with pytest.raises(ValueError, match="PST prunes the base weight itself"):
        spft.PSTLinear.from_linear(module, 0.5)


def test_state_dict_keeps_bitsandbytes_form_and_refuses_another_base():
    module = quantized_linear("nf4-dq", IN, OUT)
    layer = KINDS["rows"](module)
    with torch.no_grad():
        layer.delta.fill_(0.5)
    state = layer.state_dict()
    assert set(module.state_dict()) <= set(state) and {"delta", "rows"} <= set(state)
    fresh = KINDS["rows"](quantized_linear("nf4-dq", IN, OUT))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.delta, layer.delta)
    other = KINDS["rows"](quantized_linear("nf4-dq", IN, OUT, seed=5))
    before = other.delta.detach().clone()
    with pytest.raises(RuntimeError, match="differs from this layer's quantized base"):
        other.load_state_dict(state)
    assert torch.equal(other.delta, before)


def test_the_base_kind_comes_from_the_registry():
    from spft_kernels.nn.frozen_base import base_kind_for

    module = quantized_linear("fp4-dq", IN, OUT)
    kind = base_kind_for(module)
    assert kind.name == "bnb-4bit" and base_kind_for(quantized_linear("int8", IN, OUT)).name == "bnb-8bit"
    layer = KINDS["entries"](module)
    assert layer.base_kind is kind and kind.weight_for_ops(layer) is None
    assert "quant_type=fp4" in repr(layer) and "double_quant=True" in repr(layer)
    assert base_kind_for(nn.Linear(4, 4)).name == "dense"
