"""Entries at small weights, where a step's time is per-call overhead (ops/library_sparse.py,
ops/index.py):

- split mode computes its products through a private ``W0 + Δ`` of at most 2^18 entries, so no
  CSC operand is converted inside the call, and gives bitwise merged mode's results;
- a step of at most 2^19 ``out x in x tokens`` takes the masked gradient as the dense GEMM and a
  gather at the kept flat positions;
- the flat positions are kept for weights of at most 2^18 entries, never handed out;

each rule on both sides of its bound, checked against fp64 on awkward shapes (empty rows, no
entries, more than 32,768 columns, non-contiguous and 3-D x, autocast, no_grad and
inference_mode).
"""

import pytest
import torch

import spft_kernels as spft
from helpers import assert_within_budget, dense_oracle, plain_pytorch
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.ops import library_sparse
from spft_kernels.ops.csr_index import CsrIndex
from spft_kernels.ops.index import KEPT_FLAT_MAX_ENTRIES, SparseIndex


def _layer(out_features, in_features, index, mode, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        linear.bias.copy_(torch.randn(out_features, generator=generator))
    layer = spft.SparseDeltaLinear.from_linear(linear, index, mode=mode)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(index.numel(), generator=generator) * 0.5)
    return layer


def _index(out_features, in_features, density, seed=1):
    return spft.random_index(out_features, in_features, density, generator=torch.Generator().manual_seed(seed))


def _conversions_to_csr(fn) -> int:
    """CSC -> CSR conversions torch makes inside ``fn`` (the profiler sees ops nested in a call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_to_sparse_csr")


def _step(layer, x, dy):
    layer(x).backward(dy)


# --- the rules and their bounds -------------------------------------------------------------------


def test_each_rule_switches_at_its_bound():
    def csr(out_features, in_features, flat):
        return CsrIndex.from_flat(torch.tensor(flat, dtype=torch.int32), out_features, in_features)

    assert library_sparse.PRIVATE_SUM_MAX_ENTRIES == KEPT_FLAT_MAX_ENTRIES == 512 * 512
    assert library_sparse.uses_private_sum(csr(512, 512, [0, 7]))
    assert not library_sparse.uses_private_sum(csr(512, 513, [0, 7]))
    assert not library_sparse.uses_private_sum(csr(64, 64, []))  # no entries: no delta term at all
    # 64 x 64 x 128 tokens = 2^19
    assert library_sparse.uses_dense_gradient(csr(64, 64, [3]), 128)
    assert not library_sparse.uses_dense_gradient(csr(64, 64, [3]), 129)
    small, _ = SparseIndex.build(torch.tensor([5, 9]), 512, 512)
    large, _ = SparseIndex.build(torch.tensor([5, 9]), 512, 513)
    small, large = SparseIndex(None, 512, 512, csr=small.csr()), SparseIndex(None, 512, 513, csr=large.csr())
    assert small.kept_flat() is small.kept_flat() and small.kept_flat().tolist() == [5, 9]
    assert large.kept_flat() is None and large.flat_for_owner().tolist() == [5, 9]


def test_a_small_split_step_converts_no_csc_operand_and_a_large_one_still_does():
    # Before: dy Δ multiplied by the CSR's transpose, which torch converts inside every call
    # (a sort and ~12 ops, ~26 µs of a ~260 µs step at 64x64, 16 tokens).
    small = _layer(64, 64, _index(64, 64, 0.05), "split")
    x, dy = torch.randn(16, 64, requires_grad=True), torch.randn(16, 64)
    assert _conversions_to_csr(lambda: _step(small, x, dy)) == 0
    large = _layer(640, 512, _index(640, 512, 0.01), "split")
    x, dy = torch.randn(16, 512, requires_grad=True), torch.randn(16, 640)
    assert _conversions_to_csr(lambda: _step(large, x, dy)) == 1


def test_a_small_weight_step_makes_one_temporary_of_its_size_at_most():
    out_features, in_features = 512, 512  # exactly the bound
    # split: the private sum; merged at 1 token (2^18 <= 2^19): the dense gradient; merged at 3: none
    for mode, tokens, largest in (("split", 3, 512 * 512), ("merged", 1, 512 * 512), ("merged", 3, 2621)):
        layer = _layer(out_features, in_features, _index(out_features, in_features, 0.01), mode)
        x, dy = torch.randn(tokens, in_features, requires_grad=True), torch.randn(tokens, out_features)
        _step(layer, x, dy)  # merges
        with TensorMemoryTracker() as tracker:
            _step(layer, x, dy)
        assert tracker.largest_numel == largest, (mode, tokens, tracker.largest_shape, tracker.largest_op)


# --- correctness -----------------------------------------------------------------------------------

# (out, in, leading dims of x, index): empty rows, more than 2^15 columns (the masked column
# cast), a full row, 3-D x; tokens on both sides of the dense-gradient bound.
CASES = {
    "empty rows": (16, 24, (5,), torch.tensor([3, 7, 20, 5 * 24 + 1, 5 * 24 + 23, 15 * 24])),
    "in > 32768": (4, 40000, (3,), _index(4, 40000, 0.01)),
    "3-D x": (33, 17, (2, 3, 4), _index(33, 17, 0.2)),
    "many tokens": (64, 48, (300,), _index(64, 48, 0.05)),  # 64 * 48 * 300 > 2^19: sampled_addmm
    "full": (9, 11, (4,), torch.arange(99)),
}


def _check_against_fp64(layer, x, dy, dtype):
    index = layer.index
    layer.delta.grad = None
    weight = layer.weight.detach().clone()
    if layer.merged:
        weight.view(-1)[index.long()] = layer._w0_at_index  # W0, not W0 + Δ
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    y_ref, dx_ref, ddelta_ref, _ = dense_oracle(x, weight, layer.delta, index, layer.bias, dy)
    y_plain, dx_plain, ddelta_plain = plain_pytorch(x.to(dtype), weight, layer.delta.to(dtype), index,
                                                    layer.bias, dy.to(y.dtype))
    assert_within_budget("y", y, y_plain, y_ref, dtype)
    assert_within_budget("dx", x.grad, dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", layer.delta.grad, ddelta_plain, ddelta_ref, dtype)
    return y.detach(), x.grad, layer.delta.grad.clone()


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_gives_merged_results_bitwise_and_both_match_fp64(case):
    out_features, in_features, lead, index = CASES[case]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(*lead, in_features, generator=generator)
    dy = torch.randn(*lead, out_features, generator=generator)
    results = {}
    for mode in ("split", "merged"):
        layer = _layer(out_features, in_features, index, mode)
        layer(x)  # merges
        results[mode] = _check_against_fp64(layer, x, dy, torch.float32)
    for split, merged in zip(results["split"], results["merged"]):
        assert torch.equal(split, merged)


def test_no_entries_and_a_non_contiguous_x():
    layer = _layer(20, 30, torch.empty(0, dtype=torch.int64), "split")
    x = torch.randn(30, 6).t()  # [6, 30], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    layer = _layer(20, 30, _index(20, 30, 0.1), "split")
    _check_against_fp64(layer, x, torch.randn(6, 20), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["split", "merged"])
def test_autocast_takes_the_half_precision_path(dtype, mode):
    # Half-precision operands keep the library's fp32 products (the private sum and the dense
    # gradient take fp32 / fp64 operands only); checked against fp64.
    index = _index(48, 40, 0.1)
    layer = _layer(48, 40, index, mode)
    x = torch.randn(2, 5, 40, requires_grad=True)
    dy = torch.randn(2, 5, 48)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    weight = layer.weight.detach().clone()
    if layer.merged:
        weight.view(-1)[index.long()] = layer._w0_at_index
    y_ref, dx_ref, ddelta_ref, _ = dense_oracle(x, weight, layer.delta, index, layer.bias, dy.to(y.dtype))
    assert y.dtype == dtype
    scale = dict(rtol=0.05, atol=0.05 * y_ref.abs().max().item())
    torch.testing.assert_close(y.double(), y_ref, **scale)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=0.05, atol=0.05 * dx_ref.abs().max().item())
    torch.testing.assert_close(layer.delta.grad.double(), ddelta_ref, rtol=0.05, atol=0.05 * ddelta_ref.abs().max().item())


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_no_grad_and_inference_mode_give_the_training_forward_then_training_works(mode):
    index = _index(40, 36, 0.1)
    layer = _layer(40, 36, index, mode)
    x = torch.randn(7, 36)
    with torch.inference_mode():  # the first forward ever: the flat positions are kept here
        inside = layer(x)
    with torch.no_grad():
        without_grad = layer(x)
    trained = layer(x)
    assert torch.equal(inside, without_grad) and torch.equal(trained.detach(), inside)
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    _check_against_fp64(layer, x, torch.randn(7, 40), torch.float32)


def test_the_kept_flat_positions_are_never_handed_out():
    layer = _layer(32, 24, _index(32, 24, 0.1), "merged")
    x = torch.randn(4, 24)
    before = layer(x).detach()
    kept = layer.sparse_index().kept_flat()
    handed = layer.index
    assert handed.data_ptr() != kept.data_ptr() and torch.equal(handed, kept)
    handed.zero_()  # writing into what users get changes nothing
    layer.delta.data.add_(1.0)
    layer.delta.data.sub_(1.0)  # a new version: the next forward re-syncs through the kept positions
    assert torch.equal(layer(x).detach(), before)
    assert torch.equal(layer.index, kept)
