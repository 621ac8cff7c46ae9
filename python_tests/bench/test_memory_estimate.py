"""spft-bench --memory (bench/memory_estimate.py): the fake-tensor estimate equals the same step
on real tensors, and its table says what each method costs per trainable parameter."""

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")
from spft_kernels.bench import benchmark, memory_estimate  # noqa: E402
from spft_kernels.ops import library_sparse  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96, "max_position_embeddings": 64}


def _args(**overrides):
    values = dict(rank=4, batch=1, seq=16, mode="merged", optimizer="fused", dtype=torch.float32)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("method", ["sparta", "spruft", "block"])
def test_fake_estimate_equals_the_real_step(method):
    config = memory_estimate.load_model_config_from(TINY)
    torch.manual_seed(0)
    fake = memory_estimate.measure_method(method, config, _args(), fake=True)
    torch.manual_seed(0)
    real = memory_estimate.measure_method(method, config, _args(), fake=False)
    for key in ("peak_bytes", "weights_bytes", "optimizer_bytes", "grads_at_peak_bytes", "state_dict_alloc_bytes"):
        assert fake[key] == real[key], (key, fake[key], real[key])


def test_memory_command_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    assert benchmark.main(["--memory", "--model-config", str(path), "--methods", "lora,sparta,spruft,block",
                           "--rank", "4", "--seq", "16", "--dtype", "float32", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Not counted: the CUDA context" in printed and "| lora |" in printed
    records = {r["method"]: r for r in json.loads((out / "memory.json").read_text())}
    assert "peak_bytes" in records["block"]  # BlockSparseLinear, built without the data-reading selection
    base = records["lora"]["weights_bytes"] - records["lora"]["trainable_bytes"]
    # value + grad + Adam (16 B), + the stored index (2 B, csr_index.py) + W0 at the positions in
    # fp32 here (4 B), + the CSR row pointers, 4 (out + 1) bytes a layer: 0.55 B an entry at this
    # tiny rank (0.03 at Llama-2-7B r64); an int32 index would make it 24 and more
    assert memory_estimate.entry_bytes(records["lora"], base) == pytest.approx(16, abs=0.05)  # + step counters
    assert 22 <= memory_estimate.entry_bytes(records["sparta"], base) < 22.6
    # No copy of W0: spruft allocates next to nothing; sparta the canonical int32 index its state
    # dict holds (4 B an entry, expanded from the 2-byte form the layers keep) plus one layer's
    # O(nnz) temporaries, under half of the largest target weight (160 x 64 fp32).
    assert records["spruft"]["state_dict_alloc_bytes"] < 64 * 64 * 4
    index_bytes = 4 * records["sparta"]["trainable_params"]
    assert index_bytes <= records["sparta"]["state_dict_alloc_bytes"] < index_bytes + 160 * 64 * 4 // 2
    assert records["spruft"]["weight_shaped_temporaries"] == []
    # Entries make one only below the small-weight bounds (at most 2^18 entries and 2^19 out x in
    # x tokens: the dense gradient of a small step, ops/library_sparse.py), never for a 7B weight.
    for out_features, in_features in records["sparta"]["weight_shaped_temporaries"]:
        assert out_features * in_features * 16 <= library_sparse.DENSE_GRADIENT_MAX_WORK


def test_memory_command_is_readable_for_a_small_model_and_writes_nothing_unasked(tmp_path, monkeypatch, capsys):
    """Small models get figures, not 0.00; the checkout (here the working directory) stays
    untouched without --output; the warnings torch, transformers and peft raise about the fake
    tensors and peft's own calls do not reach the output."""
    import re
    import warnings

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert benchmark.main(["--memory", "--model-config", str(path), "--methods", "lora,sparta",
                               "--rank", "4", "--seq", "16", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json"], "wrote files without --output"
    assert "--output DIR" in printed
    peaks = re.findall(r"\| \*\*([0-9.]+)\*\* \|", printed)
    assert len(peaks) == 2 and all(float(p) > 0 and len(p.lstrip("0.")) >= 3 for p in peaks), peaks
    assert "| lora | 4,736 |" in printed  # 7 linears: 4 x 4 (64 + 64) + 3 x 4 (64 + 160), not "0.0M"
    noise = [str(w.message)[:80] for w in caught
             if "FakeTensor" in str(w.message) or "is_gradient_checkpointing" in str(w.message)]
    assert noise == []


@pytest.mark.parametrize("nbytes, shown", [(0, "0"), (123_456, "0.000115"), (2**29, "0.500"),
                                           (int(17.714 * 2**30), "17.71"), (int(50.2 * 2**30), "50.20")])
def test_gib_keeps_three_significant_digits(nbytes, shown):
    assert memory_estimate.gib(nbytes) == shown


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "sparta", "spruft"])
def test_quantized_estimate_equals_the_real_quantized_step(quantize, method):
    """--quantize: the fake estimate of a QLoRA / sparse step over bitsandbytes layers equals the
    same step on real tensors, measured on the CPU."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    config = memory_estimate.load_model_config_from(TINY)
    args = _args(quantize=quantize, double_quant=True)
    torch.manual_seed(0)
    fake = memory_estimate.measure_method(method, config, args, fake=True)
    torch.manual_seed(0)
    real = memory_estimate.measure_method(method, config, args, fake=False)
    for key in ("peak_bytes", "weights_bytes", "optimizer_bytes", "grads_at_peak_bytes"):
        assert fake[key] == pytest.approx(real[key], rel=0.01), (key, fake[key], real[key])
    # (not state_dict_alloc_bytes: a 4-bit state dict adds a small blob per layer that bitsandbytes
    # packs from the quantization state's values, ~150 bytes apart between fake and real)
    assert fake["mode"] == (None if method == "lora" else "split")
    assert fake["quantize"] == ("nf4+dq" if quantize == "nf4" else "int8")


@pytest.mark.parametrize("quantization", ["nf4-dq", "int8"])
def test_quantized_estimate_holds_the_bytes_transformers_loads(tmp_path, quantization):
    """The estimate's quantized model holds what BitsAndBytesConfig loading holds (packed weights,
    scales, the rest in the compute dtype), within 1%."""
    pytest.importorskip("bitsandbytes")
    from python_tests.quantized import LLAMA, load_quantized, save_tiny_llama

    loaded = load_quantized(save_tiny_llama(tmp_path), quantization)
    config = memory_estimate.load_model_config_from({"model_type": "llama", **LLAMA})
    built = memory_estimate.build_model(config, torch.float32)
    memory_estimate.quantize_targets(built, quantization.split("-")[0], torch.float32, double_quant=True)

    def held(model):
        tensors = list(model.parameters()) + list(model.buffers()) + memory_estimate._quantization_state(model)
        return memory_estimate._bytes(tensors)

    assert held(built) == pytest.approx(held(loaded), rel=0.01)
