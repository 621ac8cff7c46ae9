"""SPruFT's row delta: the op, the row scatter, RowSparseLinear, and their CUDA kernels (GPU tests
are marked and skipped cleanly without a GPU)."""

import os
import weakref

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from conftest import cuda_extension_or_skip
from helpers import assert_within_budget, dense_oracle, fit_mse, plain_pytorch
from spft_kernels.ops import naive
from spft_kernels.bench.memory import TensorMemoryTracker

# (out, in, leading dims of x, R, bias): odd sizes, 1 token, R = 0, R = out, 3-D and 4-D x.
CASES = [
    (1, 1, (1,), 1, True),
    (7, 13, (1,), 3, False),
    (33, 17, (5, 3), 5, True),
    (64, 48, (2, 3, 5), 0, True),
    (9, 11, (4,), 9, False),
    (130, 257, (37,), 7, True),
]


def random_row_problem(out_features, in_features, lead, num_rows, bias, seed=0, dtype=torch.float64):
    """x, W0, Wf [R, in] (fp64), rows (unsorted), b, dy."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    rows = torch.randperm(out_features, generator=generator)[:num_rows]
    delta = torch.randn(num_rows, in_features, generator=generator, dtype=torch.float64) * 0.5
    b = torch.randn(out_features, generator=generator, dtype=torch.float64) if bias else None
    x = torch.randn(*lead, in_features, generator=generator, dtype=torch.float64)
    dy = torch.randn(*lead, out_features, generator=generator, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), delta, rows, cast(b), cast(dy)


def flat_index(rows, in_features):
    """The rows as flat positions (row-major, like delta_rows.flatten()), for the dense helpers."""
    return (rows.long()[:, None] * in_features + torch.arange(in_features)).flatten()


def row_oracle(x, weight, delta, rows, bias, dy):
    """(y, dx, d delta [R, in], d bias) in fp64 from the dense definition."""
    y, dx, ddelta, dbias = dense_oracle(x, weight, delta.flatten(), flat_index(rows, weight.shape[1]), bias, dy)
    return y, dx, ddelta.view(delta.shape), dbias


def row_plain(x, weight, delta, rows, bias, dy):
    y, dx, ddelta = plain_pytorch(x, weight, delta.flatten(), flat_index(rows, weight.shape[1]), bias, dy)
    return y, dx, ddelta.view(delta.shape)


def make_layer(weight, delta, rows, bias, mode, backend="auto"):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    layer = spft.RowSparseLinear.from_linear(linear, rows, mode=mode, backend=backend)
    layer.set_rows(rows, values=delta)  # unsorted rows: the values are sorted with them
    return layer


def make_linear(out_features=24, in_features=19, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def randomise_delta(layer, seed=1, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator, dtype=torch.float64) * scale)


def expected_merged(w0, delta, rows):
    """W0 with rows W0[rows] + delta: the fp32 (fp64) sum rounded once to W0's dtype."""
    expected = w0.clone()
    acc = naive.accumulate_dtype(w0, delta)
    expected[rows.long()] = (w0[rows.long()].to(acc) + delta.to(acc)).to(w0.dtype)
    return expected


# --- the math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["split", "merged"])
def test_fp64_matches_dense_definition(case, mode):
    x, weight, delta, rows, bias, dy = random_row_problem(*case)
    layer = make_layer(weight, delta, rows, bias, mode)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    y_ref, dx_ref, ddelta_ref, _ = row_oracle(x, weight, delta, rows, bias, dy)
    order = torch.argsort(rows)
    assert layer.rows.tolist() == sorted(rows.tolist()) and layer.rows.dtype == torch.int64
    assert y.shape == y_ref.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, ddelta_ref[order], rtol=1e-12, atol=1e-12)
    assert layer.delta.grad.shape == (case[3], case[1])
    assert layer.weight.grad is None
    assert layer.bias is None or layer.bias.grad is None


def test_naive_reference_matches_dense_definition():
    x, weight, delta, rows, bias, dy = random_row_problem(33, 17, (5, 3), 5, True, seed=2)
    sorted_rows, order = rows.sort()
    y = naive.row_delta_linear(x, weight, delta[order], sorted_rows, bias)
    torch.testing.assert_close(y, row_oracle(x, weight, delta, rows, bias, dy)[0], rtol=1e-12, atol=1e-12)


# Small shapes: gradcheck differentiates numerically with respect to every weight entry too.
GRADCHECK_CASES = [(1, 1, (1,), 1, True), (7, 5, (1,), 3, False), (9, 4, (2, 3), 4, True), (6, 4, (3,), 0, True), (5, 3, (2,), 5, False)]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_functional(case):
    x, weight, delta, rows, bias, _ = random_row_problem(*case)
    inputs = [x.requires_grad_(True), weight.requires_grad_(True), delta.requires_grad_(True)]
    inputs += [bias.requires_grad_(True)] if bias is not None else []

    def fn(x, weight, delta, bias=None):
        return spft.row_delta_linear(x, weight, delta, rows, bias, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["split", "merged"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], (96, 80, (50,), 8, True)])
def test_low_precision_within_twice_plain_pytorch_error(case, mode, dtype):
    x, weight, delta, rows, bias, dy = random_row_problem(*case, dtype=dtype)
    delta = delta.float()
    layer = make_layer(weight, delta, rows, bias, mode)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.delta.grad.dtype == torch.float32
    order = torch.argsort(rows)
    y_ref, dx_ref, ddelta_ref, _ = row_oracle(x, weight, delta, rows, bias, dy)
    y_plain, dx_plain, ddelta_plain = row_plain(x, weight, delta, rows, bias, dy)
    assert_within_budget("y", y, y_plain, y_ref, dtype)
    assert_within_budget("dx", x.grad, dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", layer.delta.grad, ddelta_plain[order], ddelta_ref[order], dtype)


def test_delta_gradient_of_half_inputs_is_accumulated_in_fp32():
    # 512 tokens of bf16: a bf16 accumulation (or a bf16 result) would be off by ~1e-2 relative.
    x, weight, delta, rows, bias, dy = random_row_problem(16, 8, (512,), 4, False, seed=4, dtype=torch.bfloat16)
    layer = make_layer(weight, delta.float(), rows, bias, "split")
    layer(x).backward(dy)
    _, _, ddelta_ref, _ = row_oracle(x, weight, delta, rows, bias, dy)
    torch.testing.assert_close(layer.delta.grad.double(), ddelta_ref[torch.argsort(rows)], rtol=1e-5, atol=1e-4)


def test_merged_and_split_gradients_agree():
    x, weight, delta, rows, bias, dy = random_row_problem(40, 30, (6, 2), 11, True, seed=3)
    grads = {}
    for mode in ("split", "merged"):
        layer = make_layer(weight, delta, rows, bias, mode)
        xx = x.clone().requires_grad_(True)
        layer(xx).backward(dy)
        grads[mode] = (xx.grad, layer.delta.grad)
    torch.testing.assert_close(grads["split"], grads["merged"], rtol=1e-12, atol=1e-12)


def test_unsorted_rows_permute_delta_with_them():
    x, weight, delta, rows, bias, dy = random_row_problem(12, 10, (3,), 6, True, seed=5)
    sorted_rows, order = rows.sort()
    sorted_delta = delta[order].clone().requires_grad_(True)
    shuffled_delta = delta.clone().requires_grad_(True)
    y_sorted = spft.row_delta_linear(x, weight, sorted_delta, sorted_rows, bias)
    y_shuffled = spft.row_delta_linear(x, weight, shuffled_delta, rows, bias)
    torch.testing.assert_close(y_sorted, y_shuffled, rtol=0, atol=0)
    y_sorted.backward(dy)
    y_shuffled.backward(dy)
    torch.testing.assert_close(shuffled_delta.grad[order], sorted_delta.grad, rtol=0, atol=0)


def test_bf16_autocast_on_cpu():
    x, weight, delta, rows, bias, dy = random_row_problem(48, 40, (8,), 6, True, seed=11, dtype=torch.float32)
    layer = make_layer(weight, delta.float(), rows, bias, "split")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert layer.delta.grad.dtype == torch.float32
    y_ref, _, ddelta_ref, _ = row_oracle(x, weight, delta, rows, bias, dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(layer.delta.grad.double(), ddelta_ref[torch.argsort(rows)], rtol=2e-2, atol=0.5)


# --- ops: opcheck and the scatter ---------------------------------------------------------------


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_layer_op(merged, requires_grad, dtype, with_weight):
    if merged and not with_weight:
        pytest.skip("merged needs the weight")
    x, weight, delta, rows, bias, _ = random_row_problem(19, 23, (2, 5), 6, True, seed=13, dtype=dtype)
    rows = rows.sort().values
    delta = delta.float().requires_grad_(requires_grad)
    args = (x.requires_grad_(requires_grad), weight if with_weight else None, bias.requires_grad_(requires_grad),
            delta, rows)
    kwargs = dict(out_features=19, merged=merged, backend="reference")
    torch.library.opcheck(torch.ops.spft.row_delta_linear.default, args, kwargs)


@pytest.mark.parametrize("y_dtype, z_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck_row_scatter_add(y_dtype, z_dtype):
    y = torch.randn(6, 11, dtype=y_dtype)
    z = torch.randn(6, 4, dtype=z_dtype)
    torch.library.opcheck(torch.ops.spft.row_scatter_add_.default, (y, z, torch.tensor([0, 3, 7, 10]), "reference"))


def test_row_scatter_add_reference_semantics():
    y = torch.randn(2, 3, 9, dtype=torch.bfloat16)
    z = torch.randn(2, 3, 4, dtype=torch.float32)
    rows = torch.tensor([8, 0, 5, 2], dtype=torch.int32)
    expected = y.clone()
    expected[..., rows.long()] = (y[..., rows.long()].float() + z).bfloat16()  # one rounding
    got = spft.row_scatter_add_(y.clone(), z, rows)
    assert torch.equal(got, expected)
    untouched = [c for c in range(9) if c not in rows.tolist()]
    assert torch.equal(got[..., untouched], y[..., untouched])
    assert torch.equal(spft.row_scatter_add_(y.clone(), z[..., :0], rows[:0]), y)


def test_row_scatter_add_checks():
    y, z = torch.zeros(3, 5), torch.ones(3, 2)
    with pytest.raises(ValueError, match="out of range"):
        spft.row_scatter_add_(y, z, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="duplicates"):
        spft.row_scatter_add_(y, z, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"z must have shape \(3, 2\)"):
        spft.row_scatter_add_(y, z[:, :1], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        spft.row_scatter_add_(y, z, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="floating point"):
        spft.row_scatter_add_(y.long(), z, torch.tensor([1, 2]))


# --- the layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["split", "merged", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_starts_exactly_equal_to_the_linear(mode, dtype):
    linear = make_linear(dtype=dtype)
    reference = nn.Linear(19, 24, dtype=dtype)
    reference.load_state_dict(linear.state_dict())
    weight = weakref.ref(linear.weight)  # (a strong reference would be one more holder of the weight)
    layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([3, 20, 0]), mode=mode)
    del linear  # a linear still held would see a merged layer's W0 + delta: the layer would merge into a copy
    x = torch.randn(3, 5, 19, dtype=dtype)
    assert torch.equal(layer(x), reference(x))
    assert layer.weight is weight()  # shared, never copied
    assert layer.delta.shape == (3, 19) and torch.equal(layer.delta, torch.zeros_like(layer.delta))
    assert layer.delta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["delta"]
    assert layer.merged == (mode != "split")


def test_auto_mode_merges_any_weight_layout():
    linear = make_linear()
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # transposed layout
    w0 = linear.weight.detach().clone()
    bias = linear.bias.detach().clone()
    layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([1, 7]), mode="auto")
    del linear  # the layer holds the weight alone (else auto computes the split form)
    randomise_delta(layer)
    x = torch.randn(4, 19)
    y = layer(x)
    assert layer.merged and not layer.weight.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, expected_merged(w0, layer.delta, layer.rows), bias))
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_restores_w0_bitwise(dtype):
    linear = make_linear(dtype=dtype)
    w0 = linear.weight.detach().clone()
    layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([23, 4, 11, 0]), mode="split")
    randomise_delta(layer)
    layer.merge()
    assert torch.equal(layer.weight, expected_merged(w0, layer.delta, layer.rows))
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge()
    layer.merge()  # idempotent
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_to_linear_is_bitwise_the_merged_weight_and_independent():
    linear = make_linear(dtype=torch.bfloat16)
    layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([2, 9, 17]), mode="split")
    randomise_delta(layer)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    layer.merge()
    assert torch.equal(plain.weight, layer.weight)
    x = torch.randn(4, 19, dtype=torch.bfloat16)
    assert torch.equal(plain(x), layer(x))
    with torch.no_grad():
        plain.weight.zero_()
    assert not torch.equal(layer.weight, plain.weight)


@pytest.mark.parametrize("save_mode", ["split", "merged"])
@pytest.mark.parametrize("load_mode", ["split", "merged"])
def test_state_dict_round_trip_across_modes_and_row_counts(save_mode, load_mode):
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    saved = spft.RowSparseLinear.from_linear(linear, torch.tensor([5, 1, 22, 13]), mode=save_mode)
    randomise_delta(saved)
    x = torch.randn(6, 19)
    expected = saved(x)
    state = saved.state_dict()
    assert set(state) == {"weight", "bias", "delta", "rows"}
    assert torch.equal(state["weight"], w0)  # W0, also when the layer is merged
    assert state["delta"].dtype == torch.float32 and state["rows"].tolist() == [1, 5, 13, 22]

    other = spft.RowSparseLinear.from_linear(make_linear(seed=5), torch.tensor([0, 3]), mode=load_mode)
    other(x)  # merged layers merge on their first forward
    other.load_state_dict(state)
    assert other.num_rows == 4 and other.delta.shape == (4, 19)
    torch.testing.assert_close(other(x), expected, rtol=1e-6, atol=1e-6)
    other.unmerge()
    assert torch.equal(other.weight, w0)


def test_loading_unsorted_rows_sorts_delta_with_them():
    layer = spft.RowSparseLinear.from_linear(make_linear(), torch.tensor([3, 8, 15, 20]), mode="split")
    randomise_delta(layer)
    x = torch.randn(5, 19)
    expected = layer(x)
    state = layer.state_dict()
    permutation = torch.tensor([2, 0, 3, 1])
    state["rows"], state["delta"] = state["rows"][permutation].int(), state["delta"][permutation]
    other = spft.RowSparseLinear.from_linear(make_linear(), torch.tensor([0]), mode="split")
    other.load_state_dict(state)
    assert torch.equal(other.rows, layer.rows) and other.rows.dtype == torch.int64
    assert torch.equal(other.delta, layer.delta)
    assert torch.equal(other(x), expected)


def test_loading_bad_rows_leaves_the_layer_unchanged():
    layer = spft.RowSparseLinear.from_linear(make_linear(), torch.tensor([3, 8, 15]), mode="merged")
    randomise_delta(layer)
    x = torch.randn(5, 19)
    expected = layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for rows, error in ((torch.tensor([3, 3, 15]), "duplicates"), (torch.tensor([3, 8, 24]), "out of range")):
        with pytest.raises(ValueError, match=error):
            layer.load_state_dict({**before, "rows": rows})
    with pytest.raises(RuntimeError, match=r"delta has shape \(2, 19\) but rows has 3 rows"):
        layer.load_state_dict({**before, "delta": before["delta"][:2]})
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_dtype_casts_keep_an_fp32_master_delta(mode):
    layer = spft.RowSparseLinear.from_linear(make_linear(), torch.tensor([2, 9]), mode=mode)
    randomise_delta(layer)
    delta = layer.delta.detach().clone()
    x = torch.randn(3, 19)
    layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32
    assert torch.equal(layer.delta, delta)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    # a merged layer re-merges from the cast W0 and the fp32 master: one rounding, as unmerged
    plain = layer.to_linear()
    if mode == "merged":
        assert torch.equal(layer.weight, plain.weight)
    layer.double()
    assert layer.delta.dtype == torch.float64
    layer.float()
    assert layer.delta.dtype == torch.float32 and torch.equal(layer.delta, delta)


def test_merged_mode_resyncs_after_each_optimizer_step():
    rows = torch.tensor([1, 4, 9, 16, 23])
    layers = {
        mode: spft.RowSparseLinear.from_linear(make_linear(dtype=torch.float64), rows, mode=mode)
        for mode in ("split", "merged")
    }
    x, target = torch.randn(16, 19, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    for layer in layers.values():
        fit_mse(layer, torch.optim.Adam([layer.delta], lr=1e-2), x, target, steps=5)
    torch.testing.assert_close(layers["split"].delta, layers["merged"].delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layers["split"](x), layers["merged"](x), rtol=1e-10, atol=1e-12)
    w0 = make_linear(dtype=torch.float64).weight.detach()
    assert torch.equal(layers["merged"].weight, expected_merged(w0, layers["merged"].delta, rows))


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_training_reduces_loss(mode):
    # The target is reachable: the teacher differs from the base only in the trained rows.
    rows = torch.tensor([0, 5, 11, 30, 47])
    base = make_linear(48, 40, seed=2)
    teacher_weight = base.weight.detach().clone()
    teacher_weight[rows] += torch.randn(5, 40) * 0.3
    layer = spft.RowSparseLinear.from_linear(base, rows, mode=mode)
    optimizer = torch.optim.Adam([layer.delta], lr=3e-2)
    x = torch.randn(256, 40)
    target = torch.nn.functional.linear(x, teacher_weight, base.bias).detach()
    losses = fit_mse(layer, optimizer, x, target, steps=60)
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("mode", ["split", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_allocates_no_out_by_in_tensor(mode, dtype):
    # R x in = 640 and T x out = 2304 are well below out x in = 7680.
    out_features, in_features, num_rows = 96, 80, 8
    layer = spft.RowSparseLinear.from_linear(
        make_linear(out_features, in_features, dtype=dtype), torch.randperm(out_features)[:num_rows], mode=mode
    )
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-3)
    x = torch.randn(4, 6, in_features, dtype=dtype, requires_grad=True)
    layer(x)  # a merged layer merges once, on its first forward
    with TensorMemoryTracker() as tracker:
        for _ in range(2):  # the second forward re-syncs the merged weight after the step
            optimizer.zero_grad()
            layer(x).float().square().mean().backward()
            optimizer.step()
    assert tracker.largest_numel < out_features * in_features, (tracker.largest_shape, tracker.largest_op)
    # the detector does see an out x in allocation when there is one
    with TensorMemoryTracker() as tracker:
        layer.merged_weight()
    assert tracker.largest_numel == out_features * in_features


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_backward_saves_only_x_and_the_layers_own_tensors(mode):
    layer = spft.RowSparseLinear.from_linear(make_linear(48, 40), torch.tensor([3, 17, 40]), mode=mode)
    x = torch.randn(5, 7, 40, requires_grad=True)
    layer(x)  # merge first, so that the forward below does nothing but the layer op
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    own = {t.data_ptr() for t in (x, layer.weight, layer.delta, layer.rows)}
    assert saved and {t.data_ptr() for t in saved} <= own, [tuple(t.shape) for t in saved]
    assert not any(t.shape[-1] == 3 and t.dim() > 1 for t in saved)  # x Wfᵀ is never kept
    y.sum().backward()
    assert layer.delta.grad.shape == (3, 40)


def test_set_rows_replaces_the_rows_and_keeps_the_merge():
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([2, 5]), mode="merged")
    layer(torch.randn(2, 19))
    values = torch.arange(3 * 19, dtype=torch.float32).view(3, 19) / 100
    layer.set_rows(torch.tensor([20, 3, 9]), values=values)
    assert layer.merged and layer.rows.tolist() == [3, 9, 20]
    assert torch.equal(layer.delta, values[[1, 2, 0]])
    assert torch.equal(layer.weight, expected_merged(w0, layer.delta, layer.rows))
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    with pytest.raises(ValueError, match=r"values must be a tensor of shape \(2, 19\)"):
        layer.set_rows(torch.tensor([1, 2]), values=torch.zeros(2, 18))


def test_repr_and_num_rows():
    layer = spft.RowSparseLinear.from_linear(make_linear(), torch.tensor([1, 2, 3]), mode="split")
    assert layer.num_rows == 3 and "rows=3" in repr(layer) and "mode=split" in repr(layer)


class TestBadInput:
    def setup_method(self):
        self.x, self.weight, self.delta, self.rows, self.bias, _ = random_row_problem(8, 6, (3,), 3, True)

    def call(self, **overrides):
        args = dict(x=self.x, weight=self.weight, delta_rows=self.delta, rows=self.rows, bias=self.bias)
        args.update(overrides)
        return spft.row_delta_linear(**args)

    def test_x_width(self):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 6\]"):
            self.call(x=torch.randn(3, 7, dtype=torch.float64))

    def test_delta_shape(self):
        with pytest.raises(ValueError, match=r"delta_rows must have shape \(3, 6\)"):
            self.call(delta_rows=self.delta[:, :-1])
        with pytest.raises(ValueError, match=r"delta_rows must have shape \(3, 6\)"):
            self.call(delta_rows=self.delta[:-1])

    def test_dtype_mismatch(self):
        with pytest.raises(ValueError, match="must share a dtype"):
            self.call(x=self.x.float())

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            self.call(bias=torch.zeros(7, dtype=torch.float64))

    def test_rows_out_of_range(self):
        with pytest.raises(ValueError, match=r"row 8 is out of range \[0, 8\)"):
            self.call(rows=torch.tensor([0, 8, 2]))
        with pytest.raises(ValueError, match=r"row -1 is out of range"):
            self.call(rows=torch.tensor([0, -1, 2]))

    def test_rows_duplicates(self):
        with pytest.raises(ValueError, match="duplicates, e.g. row 2"):
            self.call(rows=torch.tensor([2, 5, 2]))

    def test_rows_type_dtype_and_rank(self):
        with pytest.raises(ValueError, match="must be a torch.Tensor"):
            self.call(rows=[0, 1, 2])
        with pytest.raises(ValueError, match="integer dtype"):
            self.call(rows=torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match="must be 1-D"):
            self.call(rows=torch.tensor([[0, 1, 2]]))

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="unknown backend"):
            self.call(backend="cublas")

    def test_backend_without_kernels_fails_before_running(self):
        error = ValueError if "cuda" in spft.available_backends() else RuntimeError
        with pytest.raises(error, match="cuda"):
            self.call(backend="cuda")

    def test_triton_on_cpu_tensors_needs_the_interpreter(self, monkeypatch):
        if "triton" not in spft.available_backends():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            self.call(backend="triton")

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="one device"):
            self.call(x=self.x.to("meta"))

    def test_layer_errors_name_the_layer_and_leave_the_linear_untouched(self):
        linear = make_linear()
        with pytest.raises(ValueError, match="blocks.0.mlp.up_proj: row 24 is out of range"):
            spft.RowSparseLinear.from_linear(linear, torch.tensor([0, 24]), name="blocks.0.mlp.up_proj")
        assert linear.weight.requires_grad and linear.bias.requires_grad
        with pytest.raises(ValueError, match="unknown mode"):
            spft.RowSparseLinear.from_linear(linear, torch.tensor([1]), mode="dense")
        with pytest.raises(NotImplementedError, match="fused"):
            spft.RowSparseLinear.from_linear(linear, torch.tensor([1]), mode="fused")
        with pytest.raises(TypeError, match="expects an nn.Linear"):
            spft.RowSparseLinear.from_linear(nn.Conv1d(3, 3, 1), torch.tensor([1]))


# --- CUDA kernels (skipped without a GPU and the built extension) --------------------------------

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.skipif(os.environ.get("SPFT_REQUIRE_CUDA_EXT", "0") in ("", "0"), reason="SPFT_REQUIRE_CUDA_EXT is not set")
def test_cuda_extension_registers_the_row_scatter():
    assert "cuda" in spft.available_backends()
    assert hasattr(torch.ops.spft, "cuda_row_scatter_add_")


@pytest.mark.gpu
@pytest.mark.parametrize("y_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("z_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lead, features, num_rows", [((1,), 1, 1), ((3, 5), 77, 13), ((129,), 1000, 1000), ((4,), 9, 0)])
def test_cuda_row_scatter_add_matches_reference_bitwise(y_dtype, z_dtype, rows_dtype, lead, features, num_rows):
    cuda_extension_or_skip()
    y = torch.randn(*lead, features, dtype=torch.float64).to(y_dtype)
    z = torch.randn(*lead, num_rows, dtype=torch.float64).to(z_dtype)
    rows = torch.randperm(features)[:num_rows].to(rows_dtype)  # unsorted is fine for the kernel
    expected = spft.row_scatter_add_(y.clone(), z, rows, backend="reference")
    got = spft.row_scatter_add_(y.cuda(), z.cuda(), rows.cuda(), backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_cuda_row_scatter_add_strided_operands():
    cuda_extension_or_skip()
    wide = torch.randn(50, 96, device="cuda")
    rows = torch.tensor([0, 59, 31], device="cuda")
    z = torch.randn(3, 50, device="cuda").t()  # column stride 50
    for y in (wide[:, 10:70], torch.randn(60, 50, device="cuda").t()):  # row stride 96; column stride 50
        expected = y.clone()
        expected[:, [0, 59, 31]] += z
        spft.row_scatter_add_(y, z, rows, backend="cuda")
        assert torch.equal(y, expected)


@pytest.mark.gpu
def test_cuda_row_scatter_add_binding_rejects_bad_tensors_with_value_errors():
    cuda_extension_or_skip()
    op = torch.ops.spft.cuda_row_scatter_add_
    y, z = torch.zeros(4, 6, device="cuda"), torch.ones(4, 2, device="cuda")
    rows = torch.tensor([1, 2], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="rows must be a CUDA tensor"):
        op(y, z, rows.cpu())
    with pytest.raises(ValueError, match="rows must be int32 or int64"):
        op(y, z, rows.float())
    with pytest.raises(ValueError, match=r"z must have shape \[4, 2\]"):
        op(y, z[:3], rows)
    with pytest.raises(ValueError, match="y must be 2-D"):
        op(y.view(2, 2, 6), z, rows)
    with pytest.raises(ValueError, match="y rows must be contiguous"):
        op(torch.zeros(6, 4, device="cuda").t(), z, rows)
    with pytest.raises(ValueError, match="z must be a CUDA tensor"):
        op(y, z.cpu(), rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["split", "merged"])
def test_layer_on_cuda_within_budget_and_merges_like_the_reference(dtype, mode):
    cuda_extension_or_skip()
    x, weight, delta, rows, bias, dy = random_row_problem(257, 129, (3, 41), 19, True, seed=21, dtype=dtype)
    delta = delta.float()
    layer = make_layer(weight.cuda(), delta.cuda(), rows.cuda(), bias.cuda(), mode, backend="cuda")
    xx = x.cuda().requires_grad_(True)
    y = layer(xx)
    y.backward(dy.cuda())
    assert layer.delta.grad.dtype == torch.float32 and xx.grad.dtype == dtype
    order = torch.argsort(rows)
    y_ref, dx_ref, ddelta_ref, _ = row_oracle(x, weight, delta, rows, bias, dy)
    y_plain, dx_plain, ddelta_plain = row_plain(x, weight, delta, rows, bias, dy)
    assert_within_budget("y", y.cpu(), y_plain, y_ref, dtype)
    assert_within_budget("dx", xx.grad.cpu(), dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", layer.delta.grad.cpu(), ddelta_plain[order], ddelta_ref[order], dtype)
    reference = make_layer(weight, delta, rows, bias, "split")
    reference.merge()
    layer.merge()
    assert torch.equal(layer.weight.cpu(), reference.weight)
    layer.unmerge()
    assert torch.equal(layer.weight.cpu(), weight)


@pytest.mark.gpu
def test_layer_training_step_on_cuda():
    cuda_extension_or_skip()
    torch.manual_seed(0)
    layer = spft.RowSparseLinear.from_linear(
        torch.nn.Linear(300, 200, device="cuda", dtype=torch.bfloat16), torch.randperm(200, device="cuda")[:16]
    )
    x = torch.randn(8, 16, 300, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()
    assert layer.delta.grad is not None and torch.isfinite(layer.delta.grad).all()
    assert layer.delta.grad.dtype == torch.float32 and layer.merged


@pytest.mark.parametrize("merged", [False, True])
def test_functional_traces_without_graph_breaks(merged):
    x, weight, delta, rows, bias, dy = random_row_problem(12, 16, (2, 3), 4, True, seed=23, dtype=torch.float32)
    rows = rows.sort().values
    delta = delta.float().requires_grad_(True)

    def step(x, delta):
        return spft.row_delta_linear(x, weight, delta, rows, bias, merged=merged, validate=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x, delta)
    torch.testing.assert_close(y, step(x, delta), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y, delta, dy)
    torch.testing.assert_close(grad, torch.autograd.grad(step(x, delta), delta, dy)[0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_width_row_layer_trains():
    """No input features: the selected rows' delta is [R, 0]; forward and backward still run."""
    layer = spft.RowSparseLinear.from_linear(torch.nn.Linear(0, 4, dtype=torch.float64), torch.tensor([1, 3]), mode="split")
    x = torch.randn(3, 2, 0, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 2, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.delta.grad.shape == (2, 0)
