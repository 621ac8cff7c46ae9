"""A merged layer's state dict lends W0 from the weight instead of cloning it (nn/w0_loan.py):
no weight-sized allocation, W0 bitwise, nothing a caller holds is altered, the layer goes on
training exactly and re-merges once the state dict is freed."""

import copy
import gc

import pytest
import torch

import spft_kernels as spft
from spft_kernels.bench.memory import TensorMemoryTracker

OUT, IN = 48, 64


def _layer(kind: str):
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUT)
    w0 = linear.weight.detach().clone()
    if kind == "entries":
        layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(OUT, IN, 0.1, torch.Generator().manual_seed(1)), mode="merged")
    elif kind == "blocks":
        layer = spft.BlockSparseLinear.from_linear(linear, torch.tensor([0, 5]), block_size=(16, 16), mode="merged")
    else:
        layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([3, 17, 40]), mode="merged")
    return layer, w0


def _step(layer, optimizer, x):
    layer(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["entries", "rows", "blocks"])
def test_state_dict_lends_w0_without_a_weight_sized_allocation(kind):
    layer, w0 = _layer(kind)
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-2, fused=True)  # no version bump
    x = torch.randn(5, IN)
    _step(layer, optimizer, x)
    y_merged = layer(x).detach()
    assert layer._computes_merged()
    with TensorMemoryTracker() as tracker:
        state = layer.state_dict()
    # O(nnz) only (entries: the canonical index the state dict holds, expanded from the compact
    # form with its temporaries, about 3.7 KiB here): the old path cloned the 48 x 64 weight (12 KiB).
    weight_bytes = OUT * IN * layer.weight.element_size()
    assert tracker.largest_numel < OUT * IN // 4 and tracker.peak_bytes < weight_bytes // 2
    assert torch.equal(state["weight"], w0)
    view = state["weight"].view(-1)  # a view keeps the loan as the tensor does
    del state
    gc.collect()
    # While W0 is lent the layer computes the split form (the same values up to rounding) and
    # trains on, never writing W0 + delta into the lent weight.
    assert not layer._computes_merged()
    torch.testing.assert_close(layer(x), y_merged, rtol=1e-5, atol=1e-5)
    _step(layer, optimizer, x)
    assert torch.equal(view.view(OUT, IN), w0)
    with pytest.raises(RuntimeError, match="state dict of this merged layer is still alive"):
        layer.merge()
    if kind == "entries":
        with pytest.raises(RuntimeError, match="fold_delta"):
            layer.fold_delta()
    expected = layer.merged_weight()
    del view
    y = layer(x)
    assert layer._computes_merged() and torch.equal(layer.weight, expected)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, expected, layer.bias))


def test_state_dict_round_trips_and_copies_do_not_inherit_the_loan():
    layer, w0 = _layer("entries")
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, IN)
    expected = layer(x).detach()
    state = layer.state_dict()
    layer.load_state_dict(state)  # loads its own lent W0 back
    assert torch.equal(state["weight"], w0)
    clone = copy.deepcopy(layer)
    assert not clone._w0_loans.active and layer._w0_loans.active
    assert torch.equal(clone(x), expected)  # the copy merges right away
    del state
    assert torch.equal(layer(x), expected)
    with torch.inference_mode():  # a save under inference_mode, then training goes on
        assert torch.equal(layer.state_dict()["weight"], w0)
    layer(x).sum().backward()
    assert layer.delta.grad is not None and layer._computes_merged()


def test_state_dict_between_forward_and_backward_fails_loudly():
    layer, _ = _layer("rows")
    y = layer(torch.randn(2, IN, requires_grad=True))  # dx needs the (merged) weight
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    del state


def test_derived_index_metadata_is_built_only_for_kernels_that_read_it():
    torch.manual_seed(0)
    index = spft.random_index(OUT, IN, 0.05, torch.Generator().manual_seed(2))
    x = torch.randn(4, IN)
    for mode, backend, expected in (
        ("merged", "reference", set()),
        ("split", "reference", set()),
        # (row_ptr is the stored crow itself: named_buffers lists the tensor once)
        ("split", "triton", {"_col_ptr", "_csc_perm", "_tile_ptr"}),
    ):
        layer = spft.SparseDeltaLinear.from_linear(torch.nn.Linear(IN, OUT), index, mode=mode, backend=backend)
        # the stored CSR (ops/csr_index.py), and the 0-d placeholder that lists the state dict's
        # "index" key among the buffers (DeltaLayer._announce_positions)
        stored = {"_index_crow", "_index_col_bytes", "index"}
        assert {name for name, _ in layer.named_buffers()} == stored
        layer(x).sum().backward()
        derived = {name for name, _ in layer.named_buffers()} - stored - {"_w0_at_index"}
        assert derived == expected, (mode, backend)
        assert set(layer.state_dict()) == {"weight", "bias", "delta", "index"}
        layer.set_index(index[:5])  # a new mask drops them
        assert not {name for name, _ in layer.named_buffers()} - stored - {"_w0_at_index"}
    # Merged mode runs only the SDDMM: never the CSR or CSC view (the layer's merge needs the
    # cuda scatter kernel to run on a kernel backend, so the functional form shows it).
    sparse_index, _ = spft.SparseIndex.build(index, OUT, IN)
    weight, delta = torch.randn(OUT, IN), torch.zeros(index.numel(), requires_grad=True)
    spft.sparse_delta_linear(x, weight, delta, sparse_index, merged=True, backend="triton").sum().backward()
    assert set(sparse_index.cached()) == {"tile_ptr"}


@pytest.mark.parametrize("kind", ["entries", "rows", "blocks"])
def test_a_state_dict_taken_before_the_first_merge_keeps_w0(kind):
    """Taken while the layer is still unmerged (right after conversion), the state dict shares a
    weight that holds W0; the forwards after it must not merge W0 + delta into that weight while
    it is held (weight W0 + delta next to delta would count delta twice on load)."""
    layer, w0 = _layer(kind)
    layer.mode = "auto"
    layer.unmerge()
    assert not layer.merged
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-2, fused=True)
    state = layer.state_dict()
    x = torch.randn(5, IN)
    for _ in range(2):
        _step(layer, optimizer, x)
    assert torch.equal(state["weight"], w0)
    fresh, _ = _layer(kind)
    fresh.load_state_dict(state)  # delta is the live Parameter's (PyTorch's usual sharing)
    torch.testing.assert_close(fresh(x), layer(x), rtol=1e-5, atol=1e-5)
    del state
    gc.collect()
    layer(x)
    assert layer._computes_merged()  # merged once the state dict is gone
    with torch.no_grad():
        torch.testing.assert_close(layer.merged_weight(), fresh.merged_weight())
