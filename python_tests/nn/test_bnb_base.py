"""nn/bnb_base.py: bitsandbytes 4-bit and 8-bit weights as frozen bases: bitsandbytes' own matmul
equals a dense layer holding dequant(Wq); dequantize (whole or rows) and read agree bitwise."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from python_tests.quantized import QUANTIZATIONS, quantized_linear, tolerance
from spft_kernels.nn.bnb_base import Bnb4bitBase, Bnb8bitBase, quantized_base_for

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(1, 67), (3, 5, 67)])
def test_base_forward_equals_the_dense_dequantized_layer(quantization, dtype, x_shape):
    module = quantized_linear(quantization, 67, 45, compute_dtype=dtype)
    base = quantized_base_for(module)
    assert isinstance(base, Bnb8bitBase if quantization == "int8" else Bnb4bitBase)
    assert base.compute_dtype == dtype
    w0 = base.dequantize()
    assert w0.shape == (45, 67) and w0.dtype == dtype
    torch.manual_seed(1)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    y = base.base_forward(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w0, module.bias.detach().to(dtype))
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
    torch.testing.assert_close(dx, dx_ref, **tolerance(dtype))
    assert not module.weight.requires_grad or module.weight.grad is None


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_dequantized_rows_and_positions_agree_bitwise_with_the_whole(quantization):
    module = quantized_linear(quantization, 67, 45, compute_dtype=torch.bfloat16)
    base = quantized_base_for(module)
    whole = base.dequantize()
    for start, stop in [(0, 1), (3, 10), (44, 45), (0, 45), (7, 7)]:
        assert torch.equal(base.dequantize(slice(start, stop)), whole[start:stop])
    flat = torch.tensor([0, 1, 66, 67, 1000, 3014])
    values = base.read(flat)  # the exact fp32 products, whatever the compute dtype
    assert values.dtype == torch.float32 and torch.equal(values.to(torch.bfloat16), whole.view(-1)[flat])
    # the quantization is near the float weight it came from (4 bits: |error| <= ~1/7 of a block's absmax)
    torch.manual_seed(0)
    dense = nn.Linear(67, 45)
    assert (whole.float() - dense.weight).abs().max() < 0.3 * dense.weight.abs().max()


def test_bad_rows_are_a_clear_error():
    base = quantized_base_for(quantized_linear("nf4", 16, 8))
    for rows in (slice(3, 2), slice(0, 9), slice(0, 8, 2), [1, 2]):
        with pytest.raises(ValueError, match="rows must be a slice"):
            base.dequantize(rows)


def test_base_forward_leaves_the_shared_bias_alone():
    module = quantized_linear("nf4", 16, 8, compute_dtype=torch.bfloat16)
    module.bias.data = module.bias.data.float()  # bitsandbytes' forward would rewrite it in bf16
    quantized_base_for(module).base_forward(torch.randn(2, 16))
    assert module.bias.dtype == torch.float32


def test_merged_mode_is_refused_and_the_quantization_described():
    four = quantized_base_for(quantized_linear("nf4-dq", 16, 8, compute_dtype=torch.bfloat16))
    assert "cannot hold it" in four.merge_refusal("q_proj") and "split" in four.merge_refusal("q_proj")
    assert four.describe() == {"quantization": "bitsandbytes-4bit", "quant_type": "nf4", "blocksize": 64,
                               "double_quant": True, "compute_dtype": "bfloat16"}
    assert four.check_compatible(four.describe()) is None
    other = quantized_base_for(quantized_linear("fp4", 16, 8)).describe()
    problem = four.check_compatible(other)
    assert "quant_type: 'fp4' in the adapter, 'nf4' here" in problem and "double_quant" in problem
    assert "dense base" in four.check_compatible(None)
    eight = quantized_base_for(quantized_linear("int8", 16, 8))
    assert eight.describe()["quantization"] == "bitsandbytes-8bit"
    assert "quantized differently" in eight.check_compatible(four.describe())


def test_a_plain_linear_is_no_quantized_base():
    assert quantized_base_for(nn.Linear(4, 4)) is None
    with pytest.raises(TypeError, match="Linear4bit"):
        Bnb4bitBase(nn.Linear(4, 4))
