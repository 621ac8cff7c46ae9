"""A transformers model loaded in 4 or 8 bits (BitsAndBytesConfig, device_map="cpu") through
get_spft_model: selection scores from x and dy equal the dense model's on dequant(Wq), training
reduces the loss, and what cannot work on a quantized base is refused before any change."""

import pytest
import torch

import spft_kernels as spft
from python_tests.quantized import dense_twin, load_quantized, save_tiny_llama
from spft_kernels.nn.bnb_base import quantized_base_for

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _batches(count=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 96, (2, 12), generator=g) for _ in range(count))]


def _loss(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("metric", ["gradient", "snip", "magnitude"])
def test_salience_on_a_quantized_base_equals_the_dense_dequantized_model(saved, metric):
    quantized = load_quantized(saved, "nf4-dq")
    dense = load_quantized(saved, "nf4-dq")
    dense_twin(dense)
    batches = _batches()
    scores = spft.salience_scores(quantized, batches, _loss, metric, progress=False)
    reference = spft.salience_scores(dense, batches, _loss, metric, progress=False)
    assert set(scores) == set(reference) and len(scores) == 14
    for name in scores:
        torch.testing.assert_close(scores[name], reference[name], rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in quantized.parameters())


# (int8's eval-mode matmul quantizes x too, ~1% off the dense product: taylor, which scores in
# eval mode, is compared on nf4, exact in fp32)
@pytest.mark.parametrize("metric, quantization", [("taylor", "nf4"), ("l2", "int8")])
def test_row_importance_on_a_quantized_base_equals_the_dense_dequantized_model(saved, metric, quantization):
    quantized = load_quantized(saved, quantization)
    dense = load_quantized(saved, quantization)
    dense_twin(dense)
    batches = _batches()
    scores = spft.row_importance(quantized, batches, _loss, metric)
    reference = spft.row_importance(dense, batches, _loss, metric)
    for name in scores:
        torch.testing.assert_close(scores[name], reference[name].float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("quantization, method, options", [
    ("nf4-dq", "sparta", {}), ("fp4", "speft", {"metric": "gradient"}), ("int8", "spruft", {"metric": "taylor"}),
    ("nf4", "sparta", {"block_size": (16, 16)}),
])
def test_training_a_quantized_llama_reduces_the_loss(saved, quantization, method, options):
    model = load_quantized(saved, quantization).train()  # (eval + no_grad: bnb's CPU inference kernel, bf16 scales)
    batches = _batches(count=3)
    with torch.no_grad():
        before = [_loss(model, b).item() for b in batches]
    config = spft.SpftConfig(method=method, match_lora_rank=4, **options)
    spft.get_spft_model(model, config, batches=batches, loss_fn=_loss)
    layers = [m for m in model.modules() if hasattr(m, "delta")]
    assert layers and all(m.quantized_base is not None and not m.merged for m in layers)  # auto: split
    with torch.no_grad():  # conversion changes nothing until the deltas train
        assert [_loss(model, b).item() for b in batches] == pytest.approx(before, abs=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(4):
        for batch in batches:
            _loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        after = [_loss(model, b).item() for b in batches]
    assert sum(after) < sum(before) - 0.05, (before, after)


@pytest.mark.parametrize("config, match", [
    (dict(method="pst", sparsity=0.5, match_lora_rank=None), "PST prunes the base weight itself"),
    (dict(method="sparta", mode="merged"), "merged mode writes W0 \\+ delta into the weight"),
    (dict(method="speft", metric="fisher"), "not available for a quantized base"),
    (dict(method="spruft", metric="zo_taylor"), "not available for a quantized base"),
    (dict(method="speft", metric="gradient", mask_update_interval=2), "a dynamic mask folds the delta into W0"),
])
def test_what_cannot_work_on_a_quantized_base_is_refused_before_any_change(saved, config, match):
    model = load_quantized(saved, "nf4")
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        spft.get_spft_model(model, spft.SpftConfig(**{"match_lora_rank": 4, **config}), batches=_batches(), loss_fn=_loss)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert quantized_base_for(model.model.layers[0].self_attn.q_proj) is not None


def _trained(saved, quantization, method="sparta"):
    model = load_quantized(saved, quantization).train()
    batches = _batches(count=2)
    spft.get_spft_model(model, spft.SpftConfig(method=method, match_lora_rank=4), batches=batches, loss_fn=_loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_adapters_record_the_quantization_and_refuse_another_base(saved, tmp_path):
    model = _trained(saved, "nf4-dq")
    path = tmp_path / "adapter.safetensors"
    spft.save_adapter(model, path)
    ids = _batches(count=1)[0]
    with torch.no_grad():
        expected = model(**ids).logits
    same = spft.load_adapter(load_quantized(saved, "nf4-dq").train(), path)
    with torch.no_grad():
        torch.testing.assert_close(same(**ids).logits, expected, rtol=0, atol=0)
    other = load_quantized(saved, "fp4")
    before = {name: type(m) for name, m in other.named_modules()}
    with pytest.raises(ValueError, match="quantized differently.*quant_type: 'nf4' in the adapter, 'fp4' here"):
        spft.load_adapter(other, path)
    assert {name: type(m) for name, m in other.named_modules()} == before
    spft.load_adapter(other, path, check_base=False)  # told otherwise
    assert any(hasattr(m, "delta") for m in other.modules())
    dense = load_quantized(saved, "nf4-dq")
    dense_twin(dense)
    with pytest.raises(ValueError, match="trained on a quantized base"):
        spft.load_adapter(dense, path)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_merge_and_unload_gives_a_dense_model_and_says_so(saved, quantization):
    model = _trained(saved, quantization, method="spruft")
    ids = _batches(count=1)[0]
    with torch.no_grad():
        expected = model(**ids).logits
    with pytest.warns(UserWarning, match="now dense nn.Linear holding dequant\\(Wq\\) \\+ delta"):
        spft.merge_and_unload(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    with torch.no_grad():  # int8: bitsandbytes' own matmul in training mode is its CPU dequantize + GEMM
        torch.testing.assert_close(model(**ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_can_quantize_again(saved):
    model = _trained(saved, "nf4-dq")
    spft.merge_and_unload(model, requantize=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert quantized_base_for(q_proj) is not None
    assert quantized_base_for(q_proj).describe()["quant_type"] == "nf4"
    with torch.no_grad():
        assert torch.isfinite(model(**_batches(count=1)[0]).logits).all()
