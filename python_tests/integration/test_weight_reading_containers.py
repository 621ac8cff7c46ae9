"""Linears whose parent reads ``.weight`` itself (nn.MultiheadAttention's out_proj always,
nn.TransformerEncoderLayer's linear1/linear2 on its eval fast path) would silently ignore a
delta, so every entry point refuses them with the reason: get_spft_model, load_adapter (and
merge_adapters, which shares its checks) and from_linear where the type tells. Nothing changes."""

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers


class Block(nn.Module):
    """Plain linears under the names the torch containers use."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.out_proj = nn.Linear(8, 8)
        self.linear1 = nn.Linear(8, 16)
        self.linear2 = nn.Linear(16, 8)


def _plain():
    torch.manual_seed(0)
    return nn.ModuleDict({"layers": nn.ModuleList([Block()])})


def _torch_encoder():
    torch.manual_seed(0)
    return nn.ModuleDict({"layers": nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)])})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_fast_path_really_ignores_a_split_delta():
    """Why the refusal: in eval mode under no_grad the encoder layer never calls linear1."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    layer.linear1 = spft.SparseDeltaLinear.from_linear(layer.linear1, torch.arange(0, 128, 3), mode="split")
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        before = layer(x)
        layer.linear1.delta.fill_(5.0)
        assert torch.equal(layer(x), before)  # the delta has no effect: a silent no-op


@pytest.mark.parametrize("targets", [None, ["linear1"], ["linear2"], ["out_proj"], ".*out_proj"])
def test_get_spft_model_refuses_them(targets):
    model = _torch_encoder()
    before = _state(model)
    with pytest.raises(ValueError, match="is read directly by its parent .*silently ignored"):
        spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.2, target_modules=targets))
    assert not spft_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets", [["out_proj"], ["linear1"], ["linear2"]])
def test_load_adapter_refuses_them_leaving_the_model_unchanged(targets, tmp_path):
    source = _plain()
    spft.get_spft_model(source, spft.SpftConfig(method="sparta", density=0.2, target_modules=targets))
    path = spft.save_adapter(source, tmp_path / "adapter.safetensors")
    model = _torch_encoder()
    before = _state(model)
    with pytest.raises(ValueError, match="cannot be converted|read directly by its parent"):
        spft.load_adapter(model, path, check_base=False)
    with pytest.raises(ValueError, match="cannot be converted|read directly by its parent"):
        spft.merge_adapters(model, [path], check_base=False)
    assert not spft_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_adapter_refuses_a_linear_subclass_as_get_spft_model_does(tmp_path):
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    source = _plain()
    spft.get_spft_model(source, spft.SpftConfig(method="sparta", density=0.2, target_modules=["linear1"]))
    path = spft.save_adapter(source, tmp_path / "adapter.safetensors")
    model = _plain()
    model.layers[0].linear1 = Custom(8, 16)
    with pytest.raises(ValueError, match="Custom, not a plain nn.Linear"):
        spft.load_adapter(model, path, check_base=False)
    assert type(model.layers[0].linear1) is Custom


def test_the_same_names_in_plain_blocks_still_convert_and_load(tmp_path):
    source = _plain()
    spft.get_spft_model(source, spft.SpftConfig(method="sparta", density=0.2))
    assert sorted(spft_layers(source)) == ["layers.0.linear1", "layers.0.linear2", "layers.0.self_attn.out_proj"]
    path = spft.save_adapter(source, tmp_path / "adapter.safetensors")
    spft.load_adapter(_plain(), path)
