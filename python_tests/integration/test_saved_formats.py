"""Files written by an earlier version (``python_tests/fixtures/saved_formats/``, made by
``make_saved_formats.py`` at commit 8cba9bc) still load bitwise: adapters of every layer kind and
index encoding (flat, split16 over one and two blocks, rows, clipped blocks, PST, bf16 values,
a folder with a saved module, peft's SHiRA folder, a dynamic mask's fold) through ``load_adapter``,
and the state dicts of every layer and of a whole converted model through ``load_state_dict`` into
fresh layers of every mode. Each must give back the recorded positions, values, effective weights
and outputs exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import spft_kernels as spft

_SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "make_saved_formats.py"
_spec = importlib.util.spec_from_file_location("make_saved_formats", _SCRIPT)
formats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(formats)

LAYER_MODES = {
    "SparseDeltaLinear": ("auto", "merged", "split", "fused"),
    "RowSparseLinear": ("auto", "merged", "split"),
    "BlockSparseLinear": ("auto", "merged", "split"),
    "PSTLinear": (None,),
}


def read_expected(case: str) -> tuple[dict, dict, dict]:
    """``(tensors, {layer: description}, base weights)`` recorded with the fixture ``case``."""
    with safe_open(formats.FIXTURES / f"{case}{formats.EXPECTED}", "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    return tensors, json.loads(metadata["layers"]), formats.read_base(json.loads(metadata["base_modules"]))


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert torch.equal(actual.detach().cpu(), expected), f"{what}: not bitwise equal to the recorded values"


def check_layer(layer, name: str, info: dict, expected: dict, base: dict) -> None:
    """The loaded ``layer`` gives back what was recorded for ``name`` (positions, values, effective
    weight, output)."""
    assert type(layer).__name__ == info["class"], f"{name}: loaded as {type(layer).__name__}"
    assert (layer.out_features, layer.in_features) == (info["out"], info["in"])
    if isinstance(layer, spft.PSTLinear):
        for label, factor in zip(formats.PST_FACTORS, layer.factors()):
            assert_bitwise(factor, expected[f"values.{name}.{label}"], f"{name}.{label}")
    else:
        positions, recorded = formats.positions_of(layer), expected[f"positions.{name}"]
        assert torch.equal(positions.long(), recorded.long()), f"{name}: positions differ"
        assert_bitwise(layer.delta, expected[f"values.{name}"], f"{name}.delta")
        if isinstance(layer, spft.BlockSparseLinear):
            assert list(layer.block_size) == info["block_size"]
    weight = formats.base_weight_of(base, name)
    effective = weight.clone().reshape(-1)
    effective[expected[f"changed.{name}"].long()] = expected[f"effective.{name}"]
    assert_bitwise(formats.effective_weight(layer), effective.reshape(weight.shape), f"{name}: effective weight")
    with torch.no_grad():
        output = layer(formats.layer_input(layer))
    # Every recorded sum is exact (grid values), so fp32 outputs are the same in every mode; a bf16
    # output is rounded once per term, so only the merged form (one GEMM over the checked
    # effective weight) is pinned when it was recorded merged.
    merged_both = info.get("merged", False) and getattr(layer, "merged", False)
    if layer.weight.dtype == torch.float32 or merged_both:
        assert_bitwise(output, expected[f"output.{name}"], f"{name}: output")


# --- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(formats.ADAPTERS))
def test_an_adapter_written_by_an_earlier_version_loads_bitwise(case):
    expected, layers, base = read_expected(case)
    model = formats.FixtureNet(base, wide="wide" in layers)
    untrained = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    assert spft.load_adapter(model, formats.FIXTURES / formats.ADAPTERS[case]) is model
    for name, info in layers.items():
        check_layer(model.get_submodule(name), name, info, expected, base)
    saved = {key[len("saved."):]: tensor for key, tensor in expected.items() if key.startswith("saved.")}
    for key, tensor in saved.items():
        assert_bitwise(model.state_dict()[key], tensor, f"saved module entry {key}")
        assert not torch.equal(untrained[key], tensor)  # the saved module's values came from the file
    untouched = set(base) - {f"{name}.{p}" for name in layers for p in ("weight", "bias")} - set(saved)
    for key in untouched:
        assert_bitwise(model.state_dict()[key], base[key], key)


def test_the_fixtures_cover_every_encoding_and_kind():
    """The adapter files hold what the test claims to pin (read from the files themselves)."""
    seen = set()
    for case, target in formats.ADAPTERS.items():
        path = formats.FIXTURES / target
        if path.is_dir():
            path = next(p for p in path.iterdir() if p.suffix == ".safetensors")
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        if "layers" in metadata:  # spft's own files, and the description spft keeps in a SHiRA folder
            for record in json.loads(metadata["layers"]).values():
                seen.add((record["kind"], record.get("index")))
        if "spft_format" in metadata:
            seen.add(("peft", metadata["spft_format"]))
    assert {("entries", "flat"), ("entries", "split16"), ("rows", None), ("blocks", None), ("pst", None)} <= seen
    assert any(kind == "peft" for kind, _ in seen)
    with safe_open(formats.FIXTURES / formats.ADAPTERS["entries"], "pt") as handle:
        assert handle.get_tensor("wide.index_high_counts").numel() == 2  # split16 over two blocks
    with safe_open(formats.FIXTURES / formats.ADAPTERS["bf16_values"], "pt") as handle:
        assert handle.get_tensor("a.delta").dtype == torch.bfloat16


# --- state dicts ---------------------------------------------------------------------------------


def empty_layer(info: dict, mode):
    """A fresh layer of the recorded kind and shape, with no positions yet (to load into)."""
    cls = getattr(spft, info["class"])
    dtype = getattr(torch, info["dtype"])
    if cls is spft.PSTLinear:
        return cls(info["in"], info["out"], bias=info["bias"], dtype=dtype, r1=info["r1"], r2=info["r2"])
    kwargs = {"block_size": tuple(info["block_size"])} if "block_size" in info else {}
    return cls(info["in"], info["out"], None, bias=info["bias"], dtype=dtype, mode=mode, **kwargs)


def layer_state_cases():
    for case in formats.STATE_DICTS:
        if case == "state_model":
            continue
        _, layers, _ = read_expected(case)
        (info,) = layers.values()
        for mode in LAYER_MODES[info["class"]]:
            yield pytest.param(case, mode, id=f"{case}-{mode}")


@pytest.mark.parametrize("case, mode", list(layer_state_cases()))
def test_a_layer_state_dict_written_by_an_earlier_version_loads_bitwise_in_every_mode(case, mode):
    expected, layers, base = read_expected(case)
    ((name, info),) = layers.items()
    state = torch.load(formats.FIXTURES / f"{case}.pt", weights_only=True)
    assert_bitwise(state["weight"], base[f"{name}.weight"], "the state dict's weight (W0)")
    layer = empty_layer(info, mode)
    layer.load_state_dict(state)
    check_layer(layer, name, info, expected, base)
    if not isinstance(layer, spft.PSTLinear):
        layer.unmerge()
    assert_bitwise(layer.weight, base[f"{name}.weight"], "W0 after unmerge")


def test_a_converted_models_state_dict_written_by_an_earlier_version_loads_bitwise():
    expected, layers, base = read_expected("state_model")
    model = formats.FixtureNet(base)
    for name, info in layers.items():  # convert with no positions (PST: its ranks); the state dict fills them
        linear = model.get_submodule(name)
        if info["class"] == "PSTLinear":
            layer = spft.PSTLinear.from_linear(linear, 0.0, r1=info["r1"], r2=info["r2"], name=name)
        elif info["class"] == "BlockSparseLinear":
            layer = spft.BlockSparseLinear.from_linear(linear, torch.empty(0, dtype=torch.int64), block_size=
                                                       tuple(info["block_size"]), mode=info["mode"], name=name)
        else:
            layer = getattr(spft, info["class"]).from_linear(linear, torch.empty(0, dtype=torch.int64),
                                                             mode=info["mode"], name=name)
        setattr(model, name, layer)
    state = torch.load(formats.FIXTURES / "state_model.pt", weights_only=True)
    model.load_state_dict(state)
    for name, info in layers.items():
        check_layer(model.get_submodule(name), name, info, expected, base)
