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


LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def save_tiny_llama(directory, seed: int = 0) -> str:
    """A tiny float LlamaForCausalLM built from its config and saved (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(str(directory))
    return str(directory)


def load_quantized(directory: str, quantization: str, compute_dtype: torch.dtype = torch.float32):
    """The saved model loaded as QLoRA users load it: BitsAndBytesConfig, device_map="cpu"."""
    bnb()
    transformers = pytest.importorskip("transformers")
    if quantization == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        quant_type, _, double = quantization.partition("-")
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=double == "dq",
                                                 bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                              device_map="cpu", dtype=compute_dtype)
    return model


def dense_twin(model) -> dict:
    """Replace every bitsandbytes layer of ``model`` by an nn.Linear holding dequant(Wq) and its bias
    (in place); returns {name: dense linear}."""
    from spft_kernels.nn.bnb_base import quantized_base_for

    swapped = {}
    for name, module in list(model.named_modules()):
        base = quantized_base_for(module)
        if base is None:
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                          dtype=base.compute_dtype)
        dense.weight = nn.Parameter(base.dequantize(), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(base.compute_dtype).clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
        swapped[name] = dense
    return swapped
