"""After dynamic-mask updates (the trained delta folded into W0, new positions chosen), the
adapter still describes the trained model relative to the *original* base: it holds the union of
every position ever trained with ``W_trained - W0_original``, loads onto the original base and
reproduces the trained model; loading it onto the folded model is refused (fingerprint)."""

import pytest
import safetensors
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_with_updates(mode, dtype, steps=6, interval=2):
    model = tiny_model("llama", dtype=dtype)
    config = spft.SpftConfig(method="speft", density=0.05, metric="magnitude", mask_update_interval=interval, mode=mode)
    spft.get_spft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    mask = spft.make_dynamic_mask(model, optimizer, None, None)
    batches = tiny_batches("llama", count=2)
    for step in range(1, steps + 1):
        hf_loss(model, batches[step % 2]).backward()
        optimizer.step()
        optimizer.zero_grad()
        mask.step(step)
    # one more step so the current delta is non-zero too
    hf_loss(model, batches[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert mask.num_updates == steps // interval and mask.last_changed > 0
    return model, batches[0]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_the_adapter_reproduces_the_trained_model_on_the_original_base(mode, tmp_path):
    model, batch = _train_with_updates(mode, torch.float64)
    trained = _logits(model, batch)
    path = spft.save_adapter(model, tmp_path / "adapter.safetensors")
    base = tiny_model("llama")
    assert not torch.allclose(_logits(base, batch), trained)
    spft.load_adapter(base, path)
    torch.testing.assert_close(_logits(base, batch), trained, rtol=0, atol=1e-10)
    with safetensors.safe_open(path, "pt") as handle:
        for name, layer in spft_layers(model).items():
            folded, _ = layer.original_w0()
            union = torch.unique(torch.cat([folded, layer.index.long()]))
            assert handle.get_tensor(f"{name}.delta").numel() == union.numel() > layer.nnz


def test_loading_onto_the_folded_model_itself_is_refused_leaving_it_unchanged(tmp_path):
    model, batch = _train_with_updates("merged", torch.float64, steps=2)
    path = spft.save_adapter(model, tmp_path / "adapter.safetensors")
    trained = _logits(model, batch)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        spft.load_adapter(model, path)
    assert torch.equal(_logits(model, batch), trained)


def test_the_peft_format_refuses_a_folded_model_before_writing(tmp_path):
    model, _ = _train_with_updates("split", torch.float64, steps=2)
    with pytest.raises(ValueError, match="folded into its W0.*format='spft'"):
        spft.save_adapter(model, tmp_path / "peft", format="peft")
    assert list(tmp_path.iterdir()) == []


def test_a_float32_base_saved_in_bfloat16_stays_close(tmp_path):
    model, batch = _train_with_updates("auto", torch.float32, steps=4)
    trained = _logits(model, batch)
    path = spft.save_adapter(model, tmp_path / "adapter.safetensors", dtype=torch.bfloat16)
    base = tiny_model("llama", dtype=torch.float32)
    spft.load_adapter(base, path)
    # bf16 values: the error of rounding W_trained - W0 once, as for any bf16 adapter
    torch.testing.assert_close(_logits(base, batch), trained, rtol=2e-2, atol=2e-2)


def test_fold_delta_keeps_the_first_original_of_a_position_folded_twice():
    linear = torch.nn.Linear(4, 3, dtype=torch.float64)
    w0 = linear.weight.detach().clone()
    layer = spft.SparseDeltaLinear.from_linear(linear, torch.tensor([1, 5]), mode="merged")
    with torch.no_grad():
        layer.delta.fill_(1.0)
    layer.fold_delta()
    layer.set_index(torch.tensor([5, 7]))
    with torch.no_grad():
        layer.delta.fill_(2.0)
    layer.fold_delta()
    positions, values = layer.original_w0()
    assert positions.tolist() == [1, 5, 7]
    assert torch.equal(values, w0.view(-1)[[1, 5, 7]])
    folded = w0.view(-1)[[1, 5, 7]] + torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    assert torch.equal(layer.weight.detach().view(-1)[[1, 5, 7]], folded)
    assert layer.delta.abs().sum() == 0
