"""BlockSparseLinear: starts as the linear, modes, merge/unmerge, state dict, casts, training,
clipped edge blocks, errors."""

import copy

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from helpers import assert_merge_round_trip, fit_mse
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.ops.block_index import block_grid

SHAPE = (24, 19)  # out, in: not a multiple of the blocks below, so the edge blocks are clipped
BLOCK = (8, 5)  # a 3 x 4 grid; blocks 3, 7 and 11 are clipped to 4 columns


def make_linear(out_features=SHAPE[0], in_features=SHAPE[1], bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def make_layer(blocks=(1, 3, 6, 11), mode="auto", linear=None, block_size=BLOCK, **kwargs):
    linear = make_linear() if linear is None else linear
    return spft.BlockSparseLinear.from_linear(linear, torch.tensor(blocks, dtype=torch.long), block_size=block_size, mode=mode, **kwargs)


def randomise_delta(layer, seed=1, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator, dtype=torch.float64) * scale)


def dense_weight(w0, layer):
    """W0 + Δ in fp64 from the blocks (dead entries of clipped blocks dropped)."""
    out_features, in_features = w0.shape
    bh, bw = layer.block_size
    columns = block_grid(out_features, in_features, layer.block_size)[1]
    padded = torch.zeros(-(-out_features // bh) * bh, columns * bw, dtype=torch.float64)
    padded[:out_features, :in_features] = w0.double()
    for k, block in enumerate(layer.blocks.tolist()):
        r, c = divmod(block, columns)
        padded[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] += layer.delta[k].detach().double()
    return padded[:out_features, :in_features]


@pytest.mark.parametrize("mode", ["split", "merged", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_starts_exactly_equal_to_the_linear(mode, dtype):
    linear = make_linear(dtype=dtype)
    reference = copy.deepcopy(linear)
    layer = make_layer(mode=mode, linear=linear)
    x = torch.randn(3, 5, SHAPE[1], dtype=dtype)
    assert torch.equal(layer(x), reference(x))
    if mode == "merged":  # the linear still holds the weight: the layer merges into a copy, the linear keeps W0
        assert layer.weight is not linear.weight and torch.equal(linear.weight, reference.weight)
    else:
        assert layer.weight is linear.weight  # shared, never copied
    assert layer.delta.shape == (4, *BLOCK) and layer.block_size == BLOCK
    assert layer.delta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(layer.delta, torch.zeros_like(layer.delta))
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["delta"]
    assert layer.merged == (mode == "merged")  # auto: the linear still holds the weight, so split


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_forward_and_gradient_match_the_dense_definition(mode):
    layer = make_layer(mode=mode, linear=make_linear(dtype=torch.float64))
    w0 = layer.weight.detach().clone()
    randomise_delta(layer)
    x = torch.randn(2, 7, SHAPE[1], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    weight = dense_weight(w0, layer).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, weight, layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    grid = block_grid(*SHAPE, BLOCK)[1]
    for k, block in enumerate(layer.blocks.tolist()):
        r, c = divmod(block, grid)
        expected = weight.grad[r * 8:(r + 1) * 8, c * 5:(c + 1) * 5]
        torch.testing.assert_close(layer.delta.grad[k, :, : expected.shape[1]], expected, rtol=1e-12, atol=1e-12)
        assert not layer.delta.grad[k, :, expected.shape[1]:].any()  # dead entries: exactly zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_restores_w0_bitwise_and_never_writes_outside_the_blocks(dtype):
    linear = make_linear(dtype=dtype)
    w0 = linear.weight.detach().clone()
    layer = make_layer(mode="split", linear=linear)
    randomise_delta(layer)
    with torch.no_grad():
        layer.delta[1, :, 4:] = 7.0  # dead entries of clipped block 3: never merged
    assert_merge_round_trip(layer, dense_weight(w0, layer).to(dtype), w0)


def test_auto_mode_merges_any_weight_layout():
    linear = make_linear()
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # same values, transposed layout
    reference = make_linear()
    layer = make_layer(mode="auto", linear=linear)
    del linear  # (while the linear lives it sees the weight: auto computes split)
    randomise_delta(layer)
    x = torch.randn(4, SHAPE[1])
    y = layer(x)
    assert layer.merged
    torch.testing.assert_close(y, nn.functional.linear(x, dense_weight(reference.weight, layer).float(), reference.bias))
    layer.unmerge()
    assert torch.equal(layer.weight, reference.weight)


def test_to_linear_is_bitwise_the_merged_weight_and_independent():
    layer = make_layer(mode="split", linear=make_linear(dtype=torch.bfloat16))
    randomise_delta(layer)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    layer.merge()
    assert torch.equal(plain.weight, layer.weight)
    x = torch.randn(4, SHAPE[1], dtype=torch.bfloat16)
    assert torch.equal(plain(x), layer(x))
    with torch.no_grad():
        plain.weight.zero_()
    assert layer.weight.abs().sum() > 0


@pytest.mark.parametrize("save_mode", ["split", "merged"])
@pytest.mark.parametrize("load_mode", ["split", "merged"])
def test_state_dict_round_trip_across_modes_and_block_counts(save_mode, load_mode):
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    saved = make_layer(mode=save_mode, linear=linear)
    randomise_delta(saved)
    x = torch.randn(6, SHAPE[1])
    expected = saved(x)
    state = saved.state_dict()
    assert set(state) == {"weight", "bias", "delta", "blocks"}
    assert torch.equal(state["weight"], w0)  # W0, also when the layer is merged
    assert state["delta"].dtype == torch.float32

    other = make_layer(blocks=(5,), mode=load_mode, linear=make_linear(seed=5))
    other(x)  # merged layers merge on their first forward
    other.load_state_dict(state)
    assert other.num_blocks == 4 and torch.equal(other.blocks, saved.blocks)
    torch.testing.assert_close(other(x), expected, rtol=1e-6, atol=1e-6)
    other.unmerge()
    assert torch.equal(other.weight, w0)


def test_loading_unsorted_blocks_sorts_delta_with_them_and_bad_blocks_change_nothing():
    layer = make_layer(mode="merged")
    randomise_delta(layer)
    x = torch.randn(5, SHAPE[1])
    expected = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    permutation = torch.tensor([2, 0, 3, 1])
    shuffled = dict(state, blocks=state["blocks"][permutation], delta=state["delta"][permutation])
    other = make_layer(blocks=(0,), mode="split")
    other.load_state_dict(shuffled)
    assert torch.equal(other.blocks, layer.blocks) and torch.equal(other.delta, layer.delta)
    torch.testing.assert_close(other(x), expected)  # split vs merged: rounded differently
    bad = dict(state, blocks=torch.tensor([1, 3, 6, 12]))  # 12 is past the 3 x 4 grid
    with pytest.raises(ValueError, match="out of range"):
        layer.load_state_dict(bad)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(layer(x), expected)
    # A state dict of another block size does not fit the delta: an error, not a silent reshape.
    with pytest.raises(RuntimeError, match="delta"):
        make_layer(block_size=(4, 4), blocks=(0, 1, 2, 3)).load_state_dict(state)


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_dtype_casts_keep_an_fp32_master_delta(mode):
    layer = make_layer(mode=mode)
    randomise_delta(layer)
    delta = layer.delta.detach().clone()
    x = torch.randn(3, SHAPE[1])
    layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32
    assert torch.equal(layer.delta, delta)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.float()
    assert layer.delta.dtype == torch.float32 and torch.equal(layer.delta, delta)


UPDATES = {
    "Adam": lambda delta: torch.optim.Adam([delta], lr=1e-2),
    "fused AdamW": lambda delta: torch.optim.AdamW([delta], lr=1e-2, fused=True),
}


@pytest.mark.parametrize("update", list(UPDATES))
def test_merged_training_follows_split_and_resyncs(update):
    layers = {mode: make_layer(mode=mode, linear=make_linear(dtype=torch.float64)) for mode in ("split", "merged")}
    layers["merged"] = copy.deepcopy(layers["merged"])
    x, target = torch.randn(16, SHAPE[1], dtype=torch.float64), torch.randn(16, SHAPE[0], dtype=torch.float64)
    for layer in layers.values():
        fit_mse(layer, UPDATES[update](layer.delta), x, target, steps=4)
    split, merged = layers["split"], layers["merged"]
    torch.testing.assert_close(split.delta, merged.delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split(x), merged(x), rtol=1e-10, atol=1e-12)
    assert merged.merged and torch.equal(merged.weight, merged.merged_weight())
    assert not split.delta[1, :, 4:].any()  # dead entries got zero gradients: still zero


def test_training_reaches_a_block_sparse_teacher():
    base = make_linear(48, 40, seed=2)
    layer = spft.BlockSparseLinear.from_linear(copy.deepcopy(base), torch.tensor([0, 5, 7]), block_size=(16, 16))
    teacher = copy.deepcopy(layer)
    with torch.no_grad():
        teacher.delta.normal_(0.0, 0.3)
    x = torch.randn(256, 40)
    target = teacher(x).detach()
    losses = fit_mse(layer, torch.optim.Adam([layer.delta], lr=3e-2), x, target, steps=60)
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_training_step_allocates_no_out_by_in_tensor(mode):
    layer = spft.BlockSparseLinear.from_linear(make_linear(96, 80), torch.tensor([2, 9, 17]), block_size=(16, 16), mode=mode)
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-3)
    x = torch.randn(4, 6, 80, requires_grad=True)
    layer(x)  # a merged layer merges once, on its first forward
    with TensorMemoryTracker() as tracker:
        for _ in range(2):  # the second forward re-syncs the merged weight after the step
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
    assert tracker.largest_numel < 96 * 80, (tracker.largest_shape, tracker.largest_op)


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_no_grad_inference_mode_and_compile(mode):
    layer = make_layer(mode=mode)
    randomise_delta(layer)
    x = torch.randn(2, 3, SHAPE[1])
    expected = layer(x).detach()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    compiled(x).sum().backward()
    assert layer.delta.grad is not None and not layer.delta.grad[1, :, 4:].any()


@pytest.mark.parametrize("blocks", [(), tuple(range(12))])
def test_no_block_and_every_block(blocks):
    linear = make_linear(dtype=torch.float64)
    w0 = linear.weight.detach().clone()
    layer = make_layer(blocks=blocks, linear=linear)
    randomise_delta(layer)
    x = torch.randn(5, SHAPE[1], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, dense_weight(w0, layer), layer.bias), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert layer.delta.grad.shape == (len(blocks), *BLOCK)
    assert layer.trained_entries == (SHAPE[0] * SHAPE[1] if blocks else 0)


def test_set_blocks_replaces_the_blocks_and_keeps_the_merge():
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    layer = make_layer(mode="merged", linear=linear)
    layer(torch.randn(2, SHAPE[1]))
    values = torch.arange(2 * 8 * 5, dtype=torch.float32).view(2, 8, 5)
    layer.set_blocks(torch.tensor([9, 2]), values=values)
    assert layer.merged and layer.blocks.tolist() == [2, 9]
    assert torch.equal(layer.delta, values.flip(0))
    assert torch.equal(layer.weight, dense_weight(w0, layer).float())
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_repr_counts_and_errors_name_the_layer():
    layer = make_layer(mode="split")
    assert layer.num_blocks == 4 and "blocks=4" in repr(layer) and "block_size=(8, 5)" in repr(layer)
    assert layer.trained_entries == 2 * 40 + 2 * 32  # blocks 3 and 11 are clipped to 8 x 4
    linear = make_linear()
    with pytest.raises(ValueError, match="blocks.3.mlp.*out of range"):
        make_layer(blocks=(12,), linear=linear, name="blocks.3.mlp")
    assert linear.weight.requires_grad  # untouched
    with pytest.raises(ValueError, match="blocks.3.mlp.*block_size"):
        make_layer(block_size=(0, 8), name="blocks.3.mlp")
    with pytest.raises(ValueError, match="unknown mode"):
        make_layer(mode="dense")
    with pytest.raises(NotImplementedError, match="fused"):
        make_layer(mode="fused")
    with pytest.raises(TypeError, match="nn.Linear"):
        spft.BlockSparseLinear.from_linear(nn.Conv1d(2, 2, 1), torch.tensor([0]))


def test_a_layer_without_blocks_never_allocates_its_block_size(tmp_path):
    # A 1 KB adapter can claim any block size for a layer with no blocks: saving, loading, merging
    # and training it must not build index ranges of bh and bw (2**20 each here; 2**29 took 4 GiB).
    huge = (2**20, 2**20)
    linear = make_linear(32, 16)
    base = copy.deepcopy(linear)
    x = torch.randn(4, 16)
    with TensorMemoryTracker() as tracker:
        layer = make_layer((), linear=linear, block_size=huge)
        layer(x).sum().backward()
        layer.merge()
        layer.unmerge()
        path = spft.save_adapter(nn.Sequential(layer), tmp_path / "empty.safetensors")
        loaded = spft.load_adapter(nn.Sequential(base), path)
        loaded(x).sum().backward()
    assert loaded[0].block_size == huge and loaded[0].num_blocks == 0
    assert torch.equal(loaded(x), linear(x))
    assert tracker.largest_numel <= 32 * 16, (tracker.largest_shape, tracker.largest_op)
