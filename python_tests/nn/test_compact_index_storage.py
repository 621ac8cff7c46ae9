"""SparseDeltaLinear keeps its index in 2 bytes an entry (CSR with 16-bit columns,
ops/csr_index.py) while everything a
user sees stays canonical: ``layer.index``, the state dict (same keys, dtype and values as
before), loading state dicts saved before, and what autograd keeps between forward and backward
(the compact form, never an expanded copy: that would undo the saving at the step's peak)."""

import pytest
import torch

import spft_kernels as spft
from spft_kernels.ops.csr_index import stored_bytes
from spft_kernels.ops.index import KEPT_FLAT_MAX_ENTRIES

OUT, IN = 300, 400  # 120,000 entries


def _layer(mode="merged", density=0.05, seed=0):
    torch.manual_seed(seed)
    index = spft.random_index(OUT, IN, density, torch.Generator().manual_seed(seed))
    layer = spft.SparseDeltaLinear.from_linear(torch.nn.Linear(IN, OUT), index, mode=mode)
    with torch.no_grad():
        layer.delta.normal_()
    return layer, index


def test_the_layer_stores_two_bytes_an_entry():
    layer, index = _layer()
    layer(torch.randn(2, IN))
    index_buffers = {name: t for name, t in layer.named_buffers() if name.startswith("_index")}
    stored = sum(t.numel() * t.element_size() for t in index_buffers.values())
    assert stored == stored_bytes(index.numel(), OUT, IN) == 2 * index.numel() + 4 * (OUT + 1)
    # What DDP broadcasts must be a type NCCL has (it has no 16-bit integers).
    assert all(t.dtype in (torch.uint8, torch.int32, torch.int64) for t in index_buffers.values())
    assert torch.equal(layer.index, index) and layer.index.dtype == torch.int32
    assert layer.nnz == index.numel()


def test_writing_into_layer_index_changes_nothing():
    layer, index = _layer()
    layer.index.zero_()  # a fresh expansion each read, not the layer's storage
    assert torch.equal(layer.index, index)


def test_state_dict_keeps_the_canonical_index():
    layer, index = _layer()
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "delta", "index"]
    assert state["index"].dtype == torch.int32 and torch.equal(state["index"], index)


@pytest.mark.parametrize("mode", ["merged", "split"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_state_dict_saved_before_loads(mode, dtype):
    """A state dict as the int32-buffer layers wrote it (or with int64 positions) loads bitwise."""
    source, index = _layer(mode="split", seed=1)
    old = {
        "weight": source.weight.detach().clone(),
        "bias": source.bias.detach().clone(),
        "delta": source.delta.detach().clone(),
        "index": index.to(dtype),
    }
    target, _ = _layer(mode=mode, density=0.01, seed=2)
    result = target.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.index, index) and torch.equal(target.delta, source.delta)
    x = torch.randn(3, IN)
    torch.testing.assert_close(target(x), source(x))


def test_a_missing_index_is_reported_by_strict_loading():
    layer, index = _layer()
    state = {k: v for k, v in layer.state_dict().items() if k != "index"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "index"'):
        layer.load_state_dict(state)
    assert layer.load_state_dict(state, strict=False).missing_keys == ["index"]
    assert torch.equal(layer.index, index)


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_autograd_keeps_only_the_compact_index(mode):
    layer, index = _layer(mode=mode)
    layer(torch.randn(2, IN))  # merges in merged mode
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(torch.randn(4, IN, requires_grad=True))
    # A small weight (at most 2^18 entries, as this one) keeps its flat positions too (ops/index.py):
    # autograd saves that same tensor, no new bytes.
    kept = layer.sparse_index().kept_flat()
    assert kept is not None and OUT * IN <= KEPT_FLAT_MAX_ENTRIES
    new = [t for t in saved if not t.is_floating_point() and t.untyped_storage().data_ptr() != kept.data_ptr()]
    integer_bytes = sum(t.numel() * t.element_size() for t in new)
    assert integer_bytes == 2 * index.numel() + 4 * (OUT + 1)
    y.square().sum().backward()
    assert layer.delta.grad.shape == index.shape
