import pytest
import torch

import spft_kernels as spft

from tiny_models import convert, deltas, hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(mode="merged", steps=3, kind="llama", density=0.05):
    """A converted tiny model after a few Adam steps (non-zero deltas, populated Adam state)."""
    model = tiny_model(kind, dtype=torch.float32)
    batches = tiny_batches(kind, count=3)
    convert(model, spft.select_topk(spft.salience_scores(model, batches, hf_loss), density), mode=mode)
    optimizer = torch.optim.Adam(deltas(model), lr=1e-2)
    for batch in batches[:steps]:
        hf_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, batches


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, spft.SparseDeltaLinear)}


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_update_folds_reselects_zeroes_and_resets_the_optimizer(mode):
    model, optimizer, batches = trained(mode)
    before = {n: (m.index.clone(), m.merged_weight(), m.nnz) for n, m in layers(model).items()}
    assert all(len(optimizer.state[d]) > 0 for d in deltas(model))
    with torch.no_grad():
        probe = batches[0]["input_ids"]
        logits = model(input_ids=probe).logits
    mask = spft.DynamicMask(model, optimizer, batches, hf_loss, density=0.05, interval=10)
    changed = mask.update()  # the gradient at the trained weights picks other entries
    assert changed > 0 and mask.last_changed == changed and mask.num_updates == 1
    moved = 0
    for name, layer in layers(model).items():
        old_index, w_eff, _ = before[name]
        moved += int((~torch.isin(layer.index, old_index)).sum())
        assert not bool(layer.delta.any())
        assert torch.equal(layer.merged_weight(), w_eff), "folding keeps W0 + Δ bitwise"
        layer.unmerge()
        assert torch.equal(layer.weight, w_eff), "the base now holds the folded weight"
    assert moved == changed
    total = sum(m.weight.numel() for m in layers(model).values())
    assert sum(m.nnz for m in layers(model).values()) == round(0.05 * total)
    # The optimizer state of every delta was dropped: Adam starts its moments (and step) afresh.
    assert all(len(optimizer.state[d]) == 0 for d in deltas(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, logits, rtol=1e-5, atol=1e-6)
    hf_loss(model, batches[1]).backward()
    optimizer.step()
    for d in deltas(model):
        assert optimizer.state[d]["exp_avg"].shape == d.shape
        assert float(optimizer.state[d]["step"]) == 1.0


def test_step_updates_every_interval_and_reads_fresh_batches():
    model, optimizer, batches = trained()
    calls = []

    def fresh():
        calls.append(len(calls))
        return batches[:2]

    mask = spft.DynamicMask(model, optimizer, fresh, hf_loss, num_params=300, scope="local", interval=3)
    updated = [step for step in range(0, 10) if mask.step(step)]
    assert updated == [3, 6, 9] and len(calls) == 3 and mask.num_updates == 3
    sizes = {n: m.weight.numel() for n, m in layers(model).items()}
    total = sum(sizes.values())
    # Local num_params: proportional to the module sizes, 300 in all.
    assert sum(m.nnz for m in layers(model).values()) == 300
    for name, layer in layers(model).items():
        assert abs(layer.nnz - 300 * sizes[name] / total) < 1


def test_static_mask_with_sgd_keeps_working_after_updates():
    # An optimizer without state (plain SGD) and a data-free metric.
    model, _, batches = trained()
    optimizer = torch.optim.SGD(deltas(model), lr=0.1)
    mask = spft.DynamicMask(model, optimizer, None, None, metric="synflow", density=0.02, interval=1)
    assert mask.step(1)
    loss = hf_loss(model, batches[0])
    loss.backward()
    optimizer.step()
    assert all(d.grad is not None for d in deltas(model))


def test_dynamic_mask_validation():
    model, optimizer, batches = trained()
    with pytest.raises(ValueError, match="exactly one of density or num_params"):
        spft.DynamicMask(model, optimizer, batches, hf_loss, interval=5)
    with pytest.raises(ValueError, match="density must be in"):
        spft.DynamicMask(model, optimizer, batches, hf_loss, density=2.0, interval=5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="interval"):
            spft.DynamicMask(model, optimizer, batches, hf_loss, density=0.1, interval=bad)
    with pytest.raises(ValueError, match="unknown metric"):
        spft.DynamicMask(model, optimizer, batches, hf_loss, metric="grad", density=0.1, interval=5)
    with pytest.raises(ValueError, match="one-shot iterator"):
        spft.DynamicMask(model, optimizer, iter(batches), hf_loss, density=0.1, interval=5)
    with pytest.raises(ValueError, match="needs batches and loss_fn"):
        spft.DynamicMask(model, optimizer, batches, None, density=0.1, interval=5)
    with pytest.raises(ValueError, match="does not hold the delta"):
        spft.DynamicMask(model, torch.optim.Adam(deltas(model)[1:]), batches, hf_loss, density=0.1, interval=5)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        spft.DynamicMask(model, deltas(model), batches, hf_loss, density=0.1, interval=5)
    with pytest.raises(ValueError, match="has no SparseDeltaLinear layer .*convert it first"):
        plain = tiny_model("llama", dtype=torch.float32)
        spft.DynamicMask(plain, torch.optim.Adam(plain.parameters()), batches, hf_loss, density=0.1, interval=5)
