"""The block-sparse delta op (``spft::block_delta_linear``), its block index and merge writes,
against the fp64 dense definition: awkward shapes (clipped edge blocks, a block larger than the
weight), 1 token, 3-D and 4-D inputs, no block, one block, all blocks."""

import pytest
import torch

import spft_kernels as spft
from helpers import assert_within_budget, dense_oracle, plain_pytorch
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.ops.block_delta_linear import gather_blocks, index_form_for, write_blocks_
from spft_kernels.ops.block_index import BlockIndex, SlotGroups, block_entries, block_grid, random_block_ids

# (out, in, leading dims of x, block size, number of blocks (None: all), bias)
CASES = [
    (32, 32, (5,), (8, 8), 3, True),
    (24, 19, (3, 4), (8, 5), None, True),  # clipped columns, all blocks
    (30, 17, (1,), (16, 16), 2, False),  # clipped both ways, 1 token
    (5, 3, (2, 3, 2), (8, 8), 1, True),  # one block larger than the weight, 4-D x
    (40, 24, (7,), (8, 8), 1, False),  # one block
    (40, 24, (6,), (8, 8), 0, True),  # no block
    (48, 64, (2, 9), (16, 8), 11, True),  # several blocks per block row and column
]


def random_block_problem(out_features, in_features, lead, block_size, num_blocks, bias, seed=0, dtype=torch.float64):
    """x, W0, delta [nb, bh, bw] (fp64, unsorted like the blocks), blocks (unsorted), b, dy."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = block_grid(out_features, in_features, block_size)
    count = rows * cols if num_blocks is None else num_blocks
    blocks = torch.randperm(rows * cols, generator=generator)[:count]
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    delta = torch.randn(count, *block_size, generator=generator, dtype=torch.float64) * 0.5
    b = torch.randn(out_features, generator=generator, dtype=torch.float64) if bias else None
    x = torch.randn(*lead, in_features, generator=generator, dtype=torch.float64)
    dy = torch.randn(*lead, out_features, generator=generator, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), delta, blocks, cast(b), cast(dy)


def block_oracle(x, weight, delta, blocks, block_size, bias, dy):
    """(y, dx, d delta [nb, bh, bw] with zeros at dead entries, d bias) in fp64."""
    flat, where = block_entries(blocks, weight.shape, block_size)
    y, dx, dlive, dbias = dense_oracle(x, weight, delta.flatten()[where], flat, bias, dy)
    ddelta = torch.zeros(delta.numel(), dtype=torch.float64)
    ddelta[where] = dlive
    return y, dx, ddelta.view(delta.shape), dbias


def block_plain(x, weight, delta, blocks, block_size, bias, dy):
    flat, where = block_entries(blocks, weight.shape, block_size)
    y, dx, dlive = plain_pytorch(x, weight, delta.flatten()[where], flat, bias, dy)
    ddelta = torch.zeros(delta.numel(), dtype=dlive.dtype)
    ddelta[where] = dlive
    return y, dx, ddelta.view(delta.shape)


def merged_weight(weight, delta, blocks, block_size):
    index, order = BlockIndex.build(blocks, *weight.shape, block_size)
    return write_blocks_(weight.clone(), index, delta=(delta if order is None else delta[order]).detach())


def run(x, weight, delta, blocks, block_size, bias, dy, merged, weight_in=None):
    """One forward + backward of the functional op; a merged call gets W0 + Δ written first."""
    x = x.clone().requires_grad_(True)
    delta = delta.clone().requires_grad_(True)
    if weight_in is None:
        weight_in = merged_weight(weight, delta, blocks, block_size) if merged else weight
    y = spft.block_delta_linear(x, weight_in, delta, blocks, block_size, bias, merged=merged)
    y.backward(dy)
    return y, x.grad, delta.grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("merged", [False, True])
def test_fp64_matches_dense_definition(case, merged):
    x, weight, delta, blocks, bias, dy = random_block_problem(*case)
    y, dx, ddelta = run(x, weight, delta, blocks, case[3], bias, dy, merged)
    y_ref, dx_ref, ddelta_ref, _ = block_oracle(x, weight, delta, blocks, case[3], bias, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ddelta, ddelta_ref, rtol=1e-12, atol=1e-12)


# Small shapes: gradcheck differentiates numerically with respect to every weight entry too.
@pytest.mark.parametrize("case", [(7, 5, (3,), (4, 3), None, True), (5, 3, (2,), (8, 8), 1, True), (6, 5, (2,), (4, 2), 3, False)])
def test_gradcheck_functional(case):
    x, weight, delta, blocks, bias, _ = random_block_problem(*case)
    bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, delta, bias))

    def fn(x, weight, delta, bias):
        # The dead entries of clipped blocks have zero gradient: masked so that gradcheck's
        # numerical derivative (also zero) agrees.
        return spft.block_delta_linear(x, weight, delta, blocks, case[3], bias)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("case", [CASES[1], CASES[6], (96, 80, (50,), (16, 16), 6, True)])
def test_low_precision_within_twice_plain_pytorch_error(case, merged, dtype):
    x, weight, delta, blocks, bias, dy = random_block_problem(*case, dtype=dtype)
    delta = delta.float()
    y, dx, ddelta = run(x, weight, delta, blocks, case[3], bias, dy, merged)
    assert y.dtype == dtype and dx.dtype == dtype and ddelta.dtype == torch.float32
    y_ref, dx_ref, ddelta_ref, _ = block_oracle(x, weight, delta, blocks, case[3], bias, dy)
    y_plain, dx_plain, ddelta_plain = block_plain(x, weight, delta, blocks, case[3], bias, dy)
    assert_within_budget("y", y, y_plain, y_ref, dtype)
    assert_within_budget("dx", dx, dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", ddelta, ddelta_plain, ddelta_ref, dtype)


def test_delta_gradient_of_half_inputs_is_accumulated_in_fp32():
    # 512 tokens of bf16: a bf16 accumulation (or a bf16 result) would be off by ~1e-2 relative.
    x, weight, delta, blocks, bias, dy = random_block_problem(16, 16, (512,), (4, 4), 5, False, seed=4,
                                                              dtype=torch.bfloat16)
    _, _, ddelta = run(x, weight, delta.float(), blocks, (4, 4), bias, dy, merged=False)
    _, _, ddelta_ref, _ = block_oracle(x, weight, delta, blocks, (4, 4), bias, dy)
    torch.testing.assert_close(ddelta.double(), ddelta_ref, rtol=1e-5, atol=1e-4)


def test_results_are_bitwise_reproducible():
    x, weight, delta, blocks, bias, dy = random_block_problem(48, 64, (3, 33), (16, 8), 12, True, seed=6,
                                                              dtype=torch.float32)
    for merged in (False, True):
        first = run(x, weight, delta.float(), blocks, (16, 8), bias, dy, merged)
        second = run(x, weight, delta.float(), blocks, (16, 8), bias, dy, merged)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_unsorted_blocks_permute_delta_with_them():
    x, weight, delta, blocks, bias, dy = random_block_problem(32, 24, (3,), (8, 8), 5, True, seed=5)
    sorted_blocks, order = blocks.sort()
    sorted_delta = delta[order].clone().requires_grad_(True)
    shuffled_delta = delta.clone().requires_grad_(True)
    y_sorted = spft.block_delta_linear(x, weight, sorted_delta, sorted_blocks, (8, 8), bias)
    y_shuffled = spft.block_delta_linear(x, weight, shuffled_delta, blocks, (8, 8), bias)
    torch.testing.assert_close(y_sorted, y_shuffled, rtol=0, atol=0)
    y_sorted.backward(dy)
    y_shuffled.backward(dy)
    torch.testing.assert_close(shuffled_delta.grad[order], sorted_delta.grad, rtol=0, atol=0)


def test_bf16_autocast_on_cpu():
    x, weight, delta, blocks, bias, dy = random_block_problem(48, 40, (8,), (8, 8), 4, True, seed=11,
                                                              dtype=torch.float32)
    delta = delta.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = spft.block_delta_linear(x, weight, delta, blocks, (8, 8), bias)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert delta.grad.dtype == torch.float32
    y_ref, _, ddelta_ref, _ = block_oracle(x, weight, delta, blocks, (8, 8), bias, dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(delta.grad.double(), ddelta_ref, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("merged", [False, True])
def test_a_step_allocates_no_out_by_in_tensor(merged):
    # gathered columns: T x nb x bw = 24 x 3 x 16 = 1152 values, well below out x in = 96 x 80.
    x, weight, delta, blocks, bias, dy = random_block_problem(96, 80, (4, 6), (16, 16), 3, True, dtype=torch.float32)
    weight_in = merged_weight(weight, delta.float(), blocks, (16, 16)) if merged else weight
    with TensorMemoryTracker() as tracker:
        run(x, weight, delta.float(), blocks, (16, 16), bias, dy, merged, weight_in)
    assert tracker.largest_numel < 96 * 80, (tracker.largest_shape, tracker.largest_op)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_layer_op(merged, requires_grad, dtype, with_weight):
    if merged and not with_weight:
        pytest.skip("merged needs the weight")
    x, weight, delta, blocks, bias, _ = random_block_problem(24, 19, (2, 5), (8, 5), 5, True, seed=13, dtype=dtype)
    index, order = BlockIndex.build(blocks, 24, 19, (8, 5))
    delta = delta[order].float().requires_grad_(requires_grad)
    tensors, form, row_slots, col_slots = index_form_for(index)
    args = (x.requires_grad_(requires_grad), weight if with_weight else None, bias.requires_grad_(requires_grad),
            delta, tensors)
    kwargs = dict(index_form=form, row_slots=row_slots, col_slots=col_slots, out_features=24, merged=merged,
                  backend="reference")
    torch.library.opcheck(torch.ops.spft.block_delta_linear.default, args, kwargs)


@pytest.mark.parametrize("merged", [False, True])
def test_functional_traces_without_graph_breaks(merged):
    x, weight, delta, blocks, bias, dy = random_block_problem(24, 19, (2, 3), (8, 5), 4, True, seed=23,
                                                              dtype=torch.float32)
    index, order = BlockIndex.build(blocks, 24, 19, (8, 5))
    delta = delta[order].float().requires_grad_(True)

    def step(x, delta):
        return spft.block_delta_linear(x, weight, delta, index, None, bias, merged=merged)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x, delta)
    torch.testing.assert_close(y, step(x, delta), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y, delta, dy)
    torch.testing.assert_close(grad, torch.autograd.grad(step(x, delta), delta, dy)[0], rtol=0, atol=0)


# --- the block index and the merge writes ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_slots_never_hold_two_blocks_with_one_target(seed):
    keys = torch.randint(0, 5, (17,), generator=torch.Generator().manual_seed(seed))
    groups = SlotGroups.build(keys)
    assert sorted(groups.order.tolist()) == list(range(17))
    for start, stop in zip(groups.slot_ptr[:-1], groups.slot_ptr[1:]):
        targets = keys[groups.order[start:stop]].tolist()
        assert len(set(targets)) == len(targets)
    assert len(groups.slot_ptr) - 1 == int(torch.bincount(keys).max())  # as few slots as possible
    assert torch.equal(groups.targets[groups.target_of], keys)


@pytest.mark.parametrize("shape, block_size", [((24, 19), (8, 5)), ((30, 17), (16, 16)), ((32, 32), (8, 8))])
def test_write_blocks_touches_only_live_entries(shape, block_size):
    rows, cols = block_grid(*shape, block_size)
    index, _ = BlockIndex.build(torch.arange(rows * cols), *shape, block_size)
    weight = torch.randn(*shape, dtype=torch.bfloat16)
    w0 = weight.clone()
    base = gather_blocks(weight, index)
    delta = torch.randn(rows * cols, *block_size)
    write_blocks_(weight, index, base=base, delta=delta)
    flat, where = block_entries(index.blocks, shape, block_size)
    expected = w0.clone().view(-1)
    expected[flat] = (w0.view(-1)[flat].float() + delta.flatten()[where]).bfloat16()  # one rounding
    assert torch.equal(weight.view(-1), expected)
    write_blocks_(weight, index, base=base)  # unmerge: W0 exactly
    assert torch.equal(weight, w0)
    assert index.trained_entries == shape[0] * shape[1]


def test_write_blocks_on_a_transposed_weight():
    weight = torch.randn(19, 24).t()  # [24, 19], not contiguous
    w0 = weight.clone()
    index, _ = BlockIndex.build(torch.tensor([1, 6]), 24, 19, (8, 5))
    write_blocks_(weight, index, delta=torch.ones(2, 8, 5))
    flat, _ = block_entries(index.blocks, (24, 19), (8, 5))
    changed = (weight != w0).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(changed, flat.sort().values)


def test_random_block_ids():
    ids = random_block_ids(30, 17, (16, 16), 3, torch.Generator().manual_seed(0))
    assert ids.tolist() == sorted(set(ids.tolist())) and len(ids) == 3 and int(ids.max()) < 4
    with pytest.raises(ValueError, match="count"):
        random_block_ids(30, 17, (16, 16), 5)


class TestValidation:
    def test_out_of_range_names_the_grid(self):
        with pytest.raises(ValueError, match=r"block 12 is out of range \[0, 12\).*8x5.*3x4"):
            BlockIndex.build(torch.tensor([0, 12]), 24, 19, (8, 5), name="q_proj")

    def test_duplicates(self):
        with pytest.raises(ValueError, match="duplicates, e.g. block 3"):
            BlockIndex.build(torch.tensor([3, 1, 3]), 24, 19, (8, 5))

    def test_type_dtype_rank_device(self):
        for bad, match in (([1, 2], "torch.Tensor"), (torch.tensor([1.0]), "integer dtype"),
                           (torch.tensor([[1]]), "1-D")):
            with pytest.raises(ValueError, match=match):
                BlockIndex.build(bad, 24, 19, (8, 5))
        with pytest.raises(ValueError, match="meta"):
            BlockIndex.build(torch.tensor([1]), 24, 19, (8, 5), device="meta")

    @pytest.mark.parametrize("block_size", [(0, 4), (4,), "64", (2.0, 2), (True, 2)])
    def test_block_size(self, block_size):
        with pytest.raises(ValueError, match="block_size must be a pair of positive ints"):
            BlockIndex.build(torch.tensor([1]), 24, 19, block_size)

    def test_delta_shape_and_missing_block_size(self):
        x, weight = torch.randn(2, 19), torch.randn(24, 19)
        with pytest.raises(ValueError, match=r"delta must have shape \(2, 8, 5\)"):
            spft.block_delta_linear(x, weight, torch.zeros(2, 5, 8), torch.tensor([1, 4]), (8, 5))
        with pytest.raises(ValueError, match="block_size"):
            spft.block_delta_linear(x, weight, torch.zeros(2, 8, 5), torch.tensor([1, 4]))
        with pytest.raises(ValueError, match="x must have shape"):
            spft.block_delta_linear(torch.randn(2, 18), weight, torch.zeros(2, 8, 5), torch.tensor([1, 4]), (8, 5))

    def test_backend_without_the_op_fails_before_running(self):
        with pytest.raises((NotImplementedError, RuntimeError, ValueError), match="block_delta_linear"):
            spft.block_delta_linear(torch.randn(2, 19), torch.randn(24, 19), torch.zeros(1, 8, 5), torch.tensor([1]),
                                    (8, 5), backend="cuda")
