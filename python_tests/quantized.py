"""bitsandbytes-quantized linears for the tests of quantized bases (tests only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

# (name, how to build it): 4-bit nf4/fp4 with and without double quantization, and int8.
QUANTIZATIONS = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")


def bnb():
    return pytest.importorskip("bitsandbytes")


def quantized_linear(quantization: str, in_features: int, out_features: int, *, bias: bool = True,
                     compute_dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    """A bitsandbytes layer quantized (on the CPU) from a seeded float nn.Linear."""
    bitsandbytes = bnb()
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    if quantization == "int8":
        layer = bitsandbytes.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                                             threshold=0.0)
        dense = dense.to(compute_dtype)
    else:
        quant_type, _, double = quantization.partition("-")
        layer = bitsandbytes.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                           compress_statistics=double == "dq", quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    if bias:
        layer.bias.data = layer.bias.data.to(compute_dtype)  # as transformers loads it: non-quantized in compute dtype
    return layer


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
