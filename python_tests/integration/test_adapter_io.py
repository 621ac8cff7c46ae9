"""save_adapter / load_adapter / merge_adapters: exact round trips, size, base fingerprints,
all-or-nothing loading of bad files, and SpaRTA's adapter merging."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.integration.adapter import format as adapter_io
from spft_kernels.nn import sparse_delta_linear as entries_kind
from spft_kernels.integration.surgery import spft_layers

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def head(kind):
    return ["classifier"] if kind == "bert" else None


def trained(kind="llama", method="speft", steps=3, model_seed=0, lr=1e-2, **budget):
    """A converted tiny model after a few AdamW steps (deltas and head away from their start)."""
    model = tiny_model(kind, seed=model_seed, dtype=torch.float32)
    batches = tiny_batches(kind)
    budget = budget or ({"density": 0.05} if method == "sparta" else {"match_lora_rank": 2})
    config = spft.SpftConfig(method=method, modules_to_save=head(kind), **budget)
    spft.get_spft_model(model, config, batches, hf_loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        hf_loss(model, batches[step % len(batches)]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, batches


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


def snapshot(model):
    """Everything a failed load must leave as it was: module types, the state dict (W0 whatever
    the mode, deltas, positions), merged flags, the raw weights and requires_grad flags."""
    return (
        {name: type(m) for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: m.merged for name, m in spft_layers(model).items()},
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2] and after[4] == before[4]
    for old, new in ((before[1], after[1]), (before[3], after[3])):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["speft", "sparta", "spruft"])
@pytest.mark.parametrize("kind", ["bert", "llama", "opt", "qwen2"])
def test_save_load_forward_is_bitwise_equal(tmp_path, kind, method):
    model, batches = trained(kind, method)
    expected = [logits(model, b) for b in batches]
    path = spft.save_adapter(model, tmp_path)  # a directory: the file gets its default name there
    # Into the plain base (converted from the file, as peft's from_pretrained does) ...
    fresh = tiny_model(kind, dtype=torch.float32)
    assert spft.load_adapter(fresh, path) is fresh
    assert fresh.spft_config == model.spft_config
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(fresh, batch), out)
    for (name, a), b in zip(spft_layers(model).items(), spft_layers(fresh).values()):
        assert type(a) is type(b) and torch.equal(a.delta, b.delta) and b.delta.requires_grad, name
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    # ... and into a converted model, whose adapter it replaces.
    other, _ = trained(kind, method, lr=5e-2)
    spft.load_adapter(other, tmp_path)
    for batch, out in zip(batches, expected):
        assert torch.equal(logits(other, batch), out)


def test_directory_path_uses_the_default_file_name(tmp_path):
    model, _ = trained()
    assert spft.save_adapter(model, tmp_path) == str(tmp_path / adapter_io.ADAPTER_FILE)


def test_bf16_file_is_at_most_6_bytes_per_trainable_parameter(tmp_path):
    # Realistic per-layer counts (the header costs ~570 bytes a layer): hidden 256, 1% of 2 blocks.
    sizes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    model = tiny_model("llama", dtype=torch.float32, **sizes)
    spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.01))
    with torch.no_grad():
        for layer in spft_layers(model).values():
            layer.delta.normal_()
    trainable, _ = spft.integration.surgery.trainable_parameters(model)
    bf16 = spft.save_adapter(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    fp32 = spft.save_adapter(model, tmp_path / "fp32.safetensors")
    per_param_bf16 = os.path.getsize(bf16) / trainable
    per_param_fp32 = os.path.getsize(fp32) / trainable
    print(f"adapter bytes per trainable parameter: bf16 {per_param_bf16:.3f}, fp32 {per_param_fp32:.3f} "
          f"({trainable} parameters)")
    assert per_param_bf16 <= 6.0
    assert per_param_fp32 <= 8.0
    # bf16 values load as their bf16 rounding; the positions are exact.
    fresh = tiny_model("llama", dtype=torch.float32, **sizes)
    spft.load_adapter(fresh, bf16)
    for a, b in zip(spft_layers(model).values(), spft_layers(fresh).values()):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.delta.to(torch.bfloat16).float(), b.delta)


def test_index_encodings_round_trip():
    generator = torch.Generator().manual_seed(0)
    for out_f, in_f, density in ((300, 700, 0.02), (300, 700, 0.0), (3, 5, 0.5), (1000, 1000, 1e-5)):
        index = spft.random_index(out_f, in_f, density, generator)
        encoding, parts = entries_kind._encode_index(index, out_f, in_f)
        decoded = entries_kind._decode_index("t", encoding, parts, index.numel(), out_f * in_f)
        assert torch.equal(decoded.long(), index.long()), (out_f, in_f, density, encoding)
        size = sum(t.numel() * t.element_size() for t in parts.values())
        assert size <= index.numel() * 4
    assert entries_kind._encode_index(spft.random_index(300, 700, 0.02, generator), 300, 700)[0] == "split16"


def test_rows_and_modules_to_save_are_stored(tmp_path):
    model, batches = trained("bert", "spruft")
    path = spft.save_adapter(model, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
        layers = json.loads(metadata["layers"])
        assert json.loads(metadata["saved_modules"]) == {"classifier": ["bias", "weight"]}
        assert torch.equal(handle.get_tensor("classifier.weight"), model.classifier.weight)
    name = "bert.encoder.layer.0.attention.self.query"
    assert layers[name]["kind"] == "rows" and {f"{name}.rows", f"{name}.delta"} <= keys
    assert spft.SpftConfig.from_json(metadata["config"]) == model.spft_config
    fresh = tiny_model("bert", dtype=torch.float32)
    spft.load_adapter(fresh, path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert fresh.classifier.weight.requires_grad


def test_fingerprint_is_taken_on_w0_whatever_the_mode(tmp_path):
    model, batches = trained(steps=2)
    merged = spft.save_adapter(model, tmp_path / "merged.safetensors")
    assert all(layer.merged for layer in spft_layers(model).values())
    with torch.no_grad():  # make the merged weights stale: the fingerprint must not read them
        for layer in spft_layers(model).values():
            layer.delta.add_(1.0)
            layer.delta.sub_(1.0)
    for layer in spft_layers(model).values():
        layer.unmerge()
    unmerged = spft.save_adapter(model, tmp_path / "unmerged.safetensors")
    prints = [{n: e["fingerprint"] for n, e in json.loads(metadata_of(p)["layers"]).items()} for p in (merged, unmerged)]
    assert prints[0] == prints[1]
    # A merged spft layer of one kind reads W0 at the positions of another kind correctly.
    layer = next(layer for layer in spft_layers(model).values() if layer.nnz > 0)
    layer.merge()
    rows = torch.tensor([0, 3, 5])
    w0 = spft.integration.surgery.plain_linear(layer).weight.detach().clone()
    layer.merge()
    row_entries = (rows[:, None] * layer.in_features + torch.arange(layer.in_features)).reshape(-1)
    assert torch.equal(adapter_io.w0_at(layer, row_entries).view(len(rows), -1), w0[rows])
    flat = torch.tensor([0, 7, 100, layer.index[0].item()])
    assert torch.equal(adapter_io.w0_at(layer, flat), w0.view(-1)[flat])


# --- refusals: all or nothing ---------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, batches = trained()
    return spft.save_adapter(model, tmp_path / "adapter.safetensors"), batches


def targets_for_failure():
    """A plain model and a converted one (with a trained adapter of its own) to load into."""
    plain = tiny_model("llama", dtype=torch.float32)
    converted, _ = trained(lr=5e-2)
    return plain, converted


def refused(model, path, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        spft.load_adapter(model, path, **kwargs)
    assert_unchanged(model, before)


def test_wrong_base_is_refused_and_nothing_changes(saved):
    path, _ = saved
    other_weights = tiny_model("llama", seed=7, dtype=torch.float32)
    refused(other_weights, path, "fingerprint mismatch")
    other_converted, _ = trained(model_seed=7)
    refused(other_converted, path, "fingerprint mismatch")
    # One weight changed by one ulp at a position the adapter trains.
    nudged = tiny_model("llama", dtype=torch.float32)
    reference, _ = trained()
    name, layer = next((n, layer) for n, layer in spft_layers(reference).items() if layer.nnz > 0)
    position = int(layer.index[0])
    with torch.no_grad():
        weight = nudged.get_submodule(name).weight.view(-1)
        weight[position] = torch.nextafter(weight[position], torch.tensor(float("inf")))
    refused(nudged, path, "fingerprint mismatch")
    refused(tiny_model("llama", dtype=torch.float64), path, "trained on a float32 base")
    refused(tiny_model("llama", dtype=torch.float32, hidden_size=48), path, "shape")
    refused(tiny_model("llama", dtype=torch.float32, num_hidden_layers=1), path, "not in the model", check_base=False)
    # check_base=False skips the fingerprint (the user takes responsibility), shapes still count.
    loose = tiny_model("llama", seed=7, dtype=torch.float32)
    spft.load_adapter(loose, path, check_base=False)
    assert spft_layers(loose)


def test_truncated_and_tampered_files_are_refused(saved, tmp_path):
    path, _ = saved
    data = open(path, "rb").read()
    header_length = struct.unpack("<Q", data[:8])[0]

    def variant(name, content):
        target = tmp_path / name
        target.write_bytes(content)
        return target

    flipped_payload = bytearray(data)
    flipped_payload[8 + header_length + 11] ^= 0x01
    header = json.loads(data[8 : 8 + header_length])
    edited = dict(header)
    edited["__metadata__"] = dict(header["__metadata__"], config=header["__metadata__"]["config"].replace(
        '"seed": 0', '"seed": 1'))
    edited_bytes = json.dumps(edited).encode()
    edited_bytes += b" " * (-len(edited_bytes) % 8)
    cases = {
        "truncated": (data[: len(data) // 2], "truncated or corrupted"),
        "empty": (b"", "truncated or corrupted"),
        "header only": (data[: 8 + header_length], "truncated or corrupted"),
        "flipped payload byte": (bytes(flipped_payload), "checksum mismatch"),
        "edited metadata": (struct.pack("<Q", len(edited_bytes)) + edited_bytes + data[8 + header_length :],
                            "checksum mismatch"),
        "garbage header": (data[:8] + b"{" * header_length + data[8 + header_length :], "truncated or corrupted"),
    }
    for model in targets_for_failure():
        for label, (content, match) in cases.items():
            refused(model, variant(label.replace(" ", "_"), content), match)


def test_a_safetensors_file_that_is_not_an_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    for model in targets_for_failure():
        refused(model, tmp_path / "plain.safetensors", "not an spft adapter")
    with pytest.raises(FileNotFoundError):
        spft.load_adapter(tiny_model("llama"), tmp_path / "missing.safetensors")


def metadata_of(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return dict(handle.metadata())


def rewrite(path, target, edit_metadata=None, edit_tensors=None):
    """A consistent file (valid checksum) with edited content: what a buggy writer could produce."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    metadata["checksum"] = adapter_io._checksum(metadata, tensors)
    save_file(tensors, target, metadata=metadata)
    return target


def test_inconsistent_files_are_refused_before_anything_changes(saved, tmp_path):
    path, _ = saved
    layers = json.loads(metadata_of(path)["layers"])
    name = next(n for n, e in layers.items() if e["index"] == "flat" and e["count"] > 1)

    def duplicate(tensors):
        index = tensors[f"{name}.index"].clone()
        index[1] = index[0]
        tensors[f"{name}.index"] = index

    def out_of_range(tensors):
        index = tensors[f"{name}.index"].clone()
        index[-1] = 10**6
        tensors[f"{name}.index"] = index

    renamed = name.replace("layers.0", "layers.9")

    def rename_layer(metadata):
        entries = json.loads(metadata["layers"])
        entries[renamed] = entries.pop(name)
        metadata["layers"] = json.dumps(entries)

    def rename_tensors(tensors):
        for key in [k for k in tensors if k.startswith(name + ".")]:
            tensors[renamed + key[len(name):]] = tensors.pop(key)

    def drop_tensor(tensors):
        del tensors[f"{name}.delta"]

    def extra_tensor(tensors):
        tensors["stray"] = torch.zeros(2)

    def bad_version(metadata):
        metadata["format_version"] = "99"

    def bad_config(metadata):
        metadata["config"] = metadata["config"].replace('"method": "speft"', '"method": "pst"')

    def deep(key, depth=100_000):  # nested beyond the JSON decoder's recursion
        return lambda metadata: metadata.update({key: "[" * depth + "]" * depth})

    cases = [
        *[(dict(edit_metadata=deep(key)), "bad adapter metadata: .*nested deeper than 64")
          for key in ("layers", "saved_modules", "config")],
        (dict(edit_tensors=duplicate), "duplicate"),
        (dict(edit_tensors=out_of_range), "out of range"),
        (dict(edit_metadata=rename_layer, edit_tensors=rename_tensors), "not in the model"),
        (dict(edit_tensors=drop_tensor), "missing tensors"),
        (dict(edit_tensors=extra_tensor), "unexpected tensors"),
        (dict(edit_metadata=bad_version), "format version"),
        (dict(edit_metadata=bad_config), "bad adapter metadata"),
    ]
    for model in targets_for_failure():
        for number, (edits, match) in enumerate(cases):
            refused(model, rewrite(path, tmp_path / f"case{number}.safetensors", **edits), match)


def test_a_failure_in_a_later_layer_changes_no_earlier_layer(saved, tmp_path):
    path, _ = saved
    model = tiny_model("llama", dtype=torch.float32)
    last = sorted(spft.masks.targets.find_target_linears(model))[-1]  # the file lists (and checks) layers by name
    weight = model.get_submodule(last).weight
    with torch.no_grad():  # only the last layer's base differs, at a sampled position
        weight.view(-1)[adapter_io._sample_positions(*weight.shape)[0]] += 1.0
    refused(model, path, f"{last}'.*fingerprint mismatch")


# --- merging adapters ----------------------------------------------------------------------------


def dense_delta(layer):
    """The dense Δ of a layer in fp64 (test oracle)."""
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    if isinstance(layer, spft.RowSparseLinear):
        delta[layer.rows] = layer.delta.detach().double()
    else:
        delta.view(-1)[layer.index.long()] = layer.delta.detach().double()
    return delta


def adapters(tmp_path, specs):
    paths, deltas = [], []
    for number, (method, seed, kwargs) in enumerate(specs):
        model = tiny_model("llama", dtype=torch.float32)
        config = spft.SpftConfig(method=method, seed=seed, **kwargs)
        spft.get_spft_model(model, config, tiny_batches("llama"), hf_loss)
        with torch.no_grad():
            for layer in spft_layers(model).values():
                layer.delta.normal_(generator=torch.Generator().manual_seed(number))
        paths.append(spft.save_adapter(model, tmp_path / f"{number}.safetensors"))
        deltas.append({name: dense_delta(layer) for name, layer in spft_layers(model).items()})
    return paths, deltas


def test_merge_adapters_sums_on_the_union_of_positions(tmp_path):
    paths, deltas = adapters(tmp_path, [("sparta", 0, dict(density=0.3)), ("sparta", 1, dict(density=0.3))])
    model = tiny_model("llama", dtype=torch.float32)
    assert spft.merge_adapters(model, paths, weights=[0.5, 2.0]) is model
    overlaps = 0
    for name, layer in spft_layers(model).items():
        a, b = deltas[0][name], deltas[1][name]
        union = (a != 0) | (b != 0)
        overlaps += int(((a != 0) & (b != 0)).sum())
        assert layer.nnz == int(union.sum())
        expected = (0.5 * a + 2.0 * b).float().double()
        assert torch.equal(dense_delta(layer), expected), name
    assert overlaps > 0  # density 0.3 twice: the adapters share positions, which were summed
    assert model.spft_config.num_params == sum(layer.nnz for layer in spft_layers(model).values())
    # The merged adapter's forward is the fp32 model with W0 + ΔA/2 + 2ΔB; merge_and_unload folds it.
    batch = tiny_batches("llama")[0]
    expected = logits(model, batch)
    reference = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        for name, layer in spft_layers(model).items():
            weight = reference.get_submodule(name).weight
            weight.copy_((weight.double() + 0.5 * deltas[0][name] + 2.0 * deltas[1][name]).float())
    torch.testing.assert_close(expected, logits(reference, batch), rtol=1e-5, atol=1e-5)
    spft.merge_and_unload(model)
    assert torch.equal(logits(model, batch), expected)


def test_merge_adapters_rows_with_rows_and_rows_with_entries(tmp_path):
    paths, deltas = adapters(tmp_path, [("spruft", 0, dict(density=0.25)), ("spruft", 0, dict(density=0.25,
                                        metric="random")), ("sparta", 2, dict(density=0.1))])
    rows_model = tiny_model("llama", dtype=torch.float32)
    spft.merge_adapters(rows_model, paths[:2])
    mixed = tiny_model("llama", dtype=torch.float32)
    spft.merge_adapters(mixed, paths)
    assert mixed.spft_config.method == "speft"
    for name in deltas[0]:
        rows_layer, mixed_layer = rows_model.get_submodule(name), mixed.get_submodule(name)
        assert isinstance(rows_layer, spft.RowSparseLinear) and isinstance(mixed_layer, spft.SparseDeltaLinear)
        assert torch.equal(dense_delta(rows_layer), (deltas[0][name] + deltas[1][name]).float().double())
        total = deltas[0][name] + deltas[1][name] + deltas[2][name]
        assert torch.equal(dense_delta(mixed_layer), total.float().double())


def test_merge_adapters_refuses_bad_input_and_shared_heads(tmp_path):
    model, _ = trained("bert")
    first = spft.save_adapter(model, tmp_path / "a.safetensors")
    model2, _ = trained("bert", lr=5e-2)
    second = spft.save_adapter(model2, tmp_path / "b.safetensors")
    base = tiny_model("bert", dtype=torch.float32)
    before = snapshot(base)
    with pytest.raises(ValueError, match="saved whole by several adapters"):
        spft.merge_adapters(base, [first, second])
    with pytest.raises(ValueError, match="one number per adapter"):
        spft.merge_adapters(base, [first, second], weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        spft.merge_adapters(base, [first, second], weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty list"):
        spft.merge_adapters(base, first)
    wrong = spft.save_adapter(trained("bert", model_seed=3)[0], tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        spft.merge_adapters(base, [first, wrong], saved_modules="skip")
    assert_unchanged(base, before)
    spft.merge_adapters(base, [first, second], saved_modules="skip")
    assert torch.equal(base.classifier.weight, before[1]["classifier.weight"])  # heads left alone
    assert isinstance(base.get_submodule("bert.encoder.layer.0.attention.self.query"), nn.Linear)
