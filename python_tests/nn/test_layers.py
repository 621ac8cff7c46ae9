import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from helpers import dense_weight, fit_mse
from spft_kernels.bench.memory import TensorMemoryTracker

MODES = ["split", "merged", "auto"]


def make_linear(out_features=24, in_features=19, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def clone_linear(linear):
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    copy.load_state_dict(linear.state_dict())
    return copy


def randomise_delta(layer, seed=1, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.nnz, generator=generator, dtype=torch.float64) * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_starts_exactly_equal_to_the_linear(mode, dtype):
    linear = make_linear(dtype=dtype)
    reference = clone_linear(linear)
    layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(24, 19, 0.2), mode=mode)
    x = torch.randn(3, 5, 19, dtype=dtype)
    assert torch.equal(layer(x), reference(x))
    if mode == "merged":  # the linear still holds the weight: the layer merges into a copy, the linear keeps W0
        assert layer.weight is not linear.weight and torch.equal(linear.weight, reference.weight)
    else:
        assert layer.weight is linear.weight  # shared, never copied
    assert layer.delta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(layer.delta, torch.zeros_like(layer.delta))
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["delta"]


def test_auto_mode_picks_merged_for_a_contiguous_weight():
    layer = spft.SparseDeltaLinear.from_linear(make_linear(), spft.random_index(24, 19, 0.1))
    layer(torch.randn(2, 19))
    assert layer.merged


def test_bad_index_leaves_the_linear_untouched():
    linear = make_linear()
    with pytest.raises(ValueError, match="out of range"):
        spft.SparseDeltaLinear.from_linear(linear, torch.tensor([0, 24 * 19]), name="blocks.0.q_proj")
    assert linear.weight.requires_grad and linear.bias.requires_grad


def test_error_names_the_layer():
    with pytest.raises(ValueError, match="blocks.3.mlp"):
        spft.SparseDeltaLinear.from_linear(make_linear(), torch.tensor([5, 5]), name="blocks.3.mlp")


def test_merged_mode_needs_a_contiguous_weight_and_auto_falls_back_to_split():
    linear = make_linear()
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # same values, transposed layout
    with pytest.raises(ValueError, match="contiguous weight"):
        spft.SparseDeltaLinear.from_linear(linear, torch.tensor([1]), mode="merged")
    layer = spft.SparseDeltaLinear.from_linear(linear, torch.tensor([1]), mode="auto")
    x = torch.randn(2, 19)
    layer(x)
    assert not layer.merged


def test_unknown_modes_and_backends():
    with pytest.raises(ValueError, match="unknown mode"):
        spft.SparseDeltaLinear.from_linear(make_linear(), torch.tensor([1]), mode="dense")
    with pytest.raises(ValueError, match="unknown backend"):
        spft.SparseDeltaLinear.from_linear(make_linear(), torch.tensor([1]), backend="cutlass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_restores_w0_bitwise(dtype):
    linear = make_linear(dtype=dtype)
    w0 = linear.weight.detach().clone()
    layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(24, 19, 0.3), mode="split")
    randomise_delta(layer)
    layer.merge()
    expected = dense_weight(w0, layer.delta, layer.index).to(dtype)
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge()
    layer.merge()  # idempotent
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_to_linear_is_bitwise_the_merged_weight_and_independent():
    linear = make_linear(dtype=torch.bfloat16)
    layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(24, 19, 0.3), mode="split")
    randomise_delta(layer)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    layer.merge()
    assert torch.equal(plain.weight, layer.weight)
    x = torch.randn(4, 19, dtype=torch.bfloat16)
    assert torch.equal(plain(x), layer(x))
    with torch.no_grad():
        plain.weight.zero_()
        plain.bias.zero_()
    assert not torch.equal(layer.weight, plain.weight) and layer.bias.abs().sum() > 0


@pytest.mark.parametrize("save_mode", ["split", "merged"])
@pytest.mark.parametrize("load_mode", ["split", "merged"])
def test_state_dict_round_trip_across_modes_and_sizes(save_mode, load_mode):
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    saved = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(24, 19, 0.25), mode=save_mode)
    randomise_delta(saved)
    x = torch.randn(6, 19)
    expected = saved(x)
    state = saved.state_dict()
    assert set(state) == {"weight", "bias", "delta", "index"}
    assert torch.equal(state["weight"], w0)  # W0, also when the layer is merged
    assert state["delta"].dtype == torch.float32

    other = spft.SparseDeltaLinear.from_linear(make_linear(seed=5), spft.random_index(24, 19, 0.05), mode=load_mode)
    other(x)  # merged layers merge on their first forward
    other.load_state_dict(state)
    assert other.nnz == saved.nnz
    torch.testing.assert_close(other(x), expected, rtol=1e-6, atol=1e-6)
    other.unmerge()
    assert torch.equal(other.weight, w0)


def test_loading_an_unsorted_index_sorts_delta_with_it():
    layer = spft.SparseDeltaLinear.from_linear(make_linear(), spft.random_index(24, 19, 0.2), mode="split")
    randomise_delta(layer)
    x = torch.randn(5, 19)
    expected = layer(x)
    state = layer.state_dict()
    permutation = torch.randperm(layer.nnz)
    state["index"], state["delta"] = state["index"][permutation], state["delta"][permutation]
    other = spft.SparseDeltaLinear.from_linear(make_linear(), torch.tensor([0]), mode="split")
    other.load_state_dict(state)
    assert torch.equal(other.index, layer.index) and torch.equal(other.delta, layer.delta)
    assert torch.equal(other(x), expected)


def test_loading_a_bad_index_leaves_the_layer_unchanged():
    layer = spft.SparseDeltaLinear.from_linear(make_linear(), spft.random_index(24, 19, 0.2), mode="merged")
    randomise_delta(layer)
    x = torch.randn(5, 19)
    expected = layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = dict(before)
    state["index"] = state["index"].clone()
    state["index"][0] = state["index"][1]  # a duplicate
    with pytest.raises(ValueError, match="duplicate"):
        layer.load_state_dict(state)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_dtype_casts_keep_an_fp32_master_delta(mode):
    layer = spft.SparseDeltaLinear.from_linear(make_linear(), spft.random_index(24, 19, 0.2), mode=mode)
    randomise_delta(layer)
    delta = layer.delta.detach().clone()
    x = torch.randn(3, 19)
    layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32
    assert torch.equal(layer.delta, delta)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.double()
    assert layer.delta.dtype == torch.float64
    layer.float()
    assert layer.delta.dtype == torch.float32 and torch.equal(layer.delta, delta)


def test_merged_mode_resyncs_after_each_optimizer_step():
    torch.manual_seed(0)
    index = spft.random_index(24, 19, 0.3)
    layers = {
        mode: spft.SparseDeltaLinear.from_linear(make_linear(dtype=torch.float64), index, mode=mode)
        for mode in ("split", "merged")
    }
    x, target = torch.randn(16, 19, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    for layer in layers.values():
        fit_mse(layer, torch.optim.Adam([layer.delta], lr=1e-2), x, target, steps=5)
    torch.testing.assert_close(layers["split"].delta, layers["merged"].delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layers["split"](x), layers["merged"](x), rtol=1e-10, atol=1e-12)
    # after the last step the merged weight is exactly W0 + delta again
    w0 = make_linear(dtype=torch.float64).weight
    assert torch.equal(layers["merged"].weight, dense_weight(w0, layers["merged"].delta, index))


UPDATES = {
    "fused AdamW": lambda delta: torch.optim.AdamW([delta], lr=1e-2, fused=True),
    "foreach Adam": lambda delta: torch.optim.Adam([delta], lr=1e-2, foreach=True),
    "SGD on .data": None,
}


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("layer_class", [spft.SparseDeltaLinear, spft.RowSparseLinear])
def test_merged_mode_sees_updates_that_skip_the_version_counter(layer_class, update):
    """A fused optimizer (the transformers Trainer's default) and ``p.data`` updates leave the
    version counter as it was; a merged layer still re-syncs, also on a deep copy whose delta
    Parameter is new."""
    import copy

    torch.manual_seed(0)
    positions = spft.random_index(24, 19, 0.3) if layer_class is spft.SparseDeltaLinear else torch.tensor([2, 5, 11])
    split = layer_class.from_linear(make_linear(dtype=torch.float64), positions, mode="split")
    merged = copy.deepcopy(layer_class.from_linear(make_linear(dtype=torch.float64), positions, mode="merged"))
    make = UPDATES[update]
    optimizers = [make(layer.delta) for layer in (split, merged)] if make else None
    x, target = torch.randn(16, 19, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    for _ in range(4):
        for number, layer in enumerate((split, merged)):
            ((layer(x) - target) ** 2).mean().backward()
            if optimizers:
                optimizers[number].step()
            else:
                layer.delta.data.add_(layer.delta.grad, alpha=-0.1)
            layer.delta.grad = None
    assert merged.merged
    torch.testing.assert_close(merged.delta, split.delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged(x), split(x), rtol=1e-10, atol=1e-12)
    assert torch.equal(merged.weight, merged.merged_weight())


@pytest.mark.parametrize("layer_class", [spft.SparseDeltaLinear, spft.RowSparseLinear])
def test_a_swapped_weight_parameter_falls_back_to_split_or_fails_clearly(layer_class):
    """What FSDP does to a merged layer: a gathered copy of the weight Parameter is swapped in for
    each forward. Mode 'auto' with a zero delta (the shards hold W0) falls back to split for
    good; a merged layer with a trained delta, or mode 'merged', raises instead of training with
    a weight that loses W0 + Δ between forward and backward."""
    torch.manual_seed(0)
    positions = spft.random_index(24, 19, 0.3) if layer_class is spft.SparseDeltaLinear else torch.tensor([2, 5, 11])
    x = torch.randn(6, 19)

    def swapped(mode, trained):
        layer = layer_class.from_linear(make_linear(), positions, mode=mode)
        layer.merge()
        if trained:
            with torch.no_grad():
                layer.delta.add_(0.5)
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        return layer

    layer = swapped("auto", trained=False)
    expected = make_linear()(x)
    assert torch.equal(layer(x), expected) and not layer.merged
    layer(x).sum().backward()
    assert not layer.merged and layer.delta.grad is not None  # split from now on
    for mode, trained in (("auto", True), ("merged", False)):
        with pytest.raises(RuntimeError, match="weight Parameter of this merged layer was replaced"):
            swapped(mode, trained)(x)
    # A cast that makes new Parameters is not a swap.
    layer = layer_class.from_linear(make_linear(), positions, mode="auto")
    layer.merge()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert layer.merged and torch.equal(layer(x.double()), make_linear().double()(x.double()))


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_training_reduces_loss(mode):
    # The target is reachable: the teacher differs from the base only at the trained positions.
    index = spft.random_index(48, 40, 0.2)
    base = make_linear(48, 40, seed=2)
    true_delta = torch.randn(index.numel()) * 0.3
    teacher_weight = dense_weight(base.weight, true_delta, index).float()
    layer = spft.SparseDeltaLinear.from_linear(clone_linear(base), index, mode=mode)
    optimizer = torch.optim.Adam([layer.delta], lr=3e-2)
    x = torch.randn(256, 40)
    target = torch.nn.functional.linear(x, teacher_weight, base.bias).detach()
    losses = fit_mse(layer, optimizer, x, target, steps=60)
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("mode", ["split", "merged"])
def test_training_step_allocates_no_out_by_in_tensor(mode):
    # Above the small-weight bound (2^18 entries, ops/library_sparse.py); below it a step may make
    # one temporary of at most that size (python_tests/ops/test_small_weight_paths.py).
    out_features, in_features = 640, 512
    layer = spft.SparseDeltaLinear.from_linear(
        make_linear(out_features, in_features), spft.random_index(out_features, in_features, 0.05), mode=mode
    )
    optimizer = torch.optim.AdamW([layer.delta], lr=1e-3)
    x = torch.randn(4, 6, in_features, requires_grad=True)
    layer(x)  # a merged layer merges once, on its first forward
    with TensorMemoryTracker() as tracker:
        for _ in range(2):  # the second forward re-syncs the merged weight after the step
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
    assert tracker.largest_numel < out_features * in_features, (tracker.largest_shape, tracker.largest_op)
    # the detector does see an out x in allocation when there is one
    with TensorMemoryTracker() as tracker:
        layer.merged_weight()
    assert tracker.largest_numel == out_features * in_features


def test_set_index_replaces_the_mask_and_keeps_the_merge():
    linear = make_linear()
    w0 = linear.weight.detach().clone()
    layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(24, 19, 0.1), mode="merged")
    layer(torch.randn(2, 19))
    new_index = torch.tensor([400, 3, 17])
    layer.set_index(new_index, values=torch.tensor([1.0, 2.0, 3.0]))
    assert layer.merged and layer.index.tolist() == [3, 17, 400]
    assert layer.delta.tolist() == [2.0, 3.0, 1.0]
    assert torch.equal(layer.weight, dense_weight(w0, layer.delta, layer.index).float())
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_repr_and_nnz():
    layer = spft.SparseDeltaLinear.from_linear(make_linear(), torch.tensor([1, 2, 3]), mode="split")
    assert layer.nnz == 3 and "nnz=3" in repr(layer) and "mode=split" in repr(layer)


@pytest.mark.parametrize("kind", ["entries", "rows", "blocks"])
@pytest.mark.parametrize("mode", ["merged", "split"])
def test_a_layer_is_freed_without_the_garbage_collector(kind, mode):
    """No reference cycle through a layer: a replaced layer (load_adapter, set_adapter) must let go
    of its weight at once, or the layer replacing it sees the weight held elsewhere and cannot
    merge until the collector happens to run (a cached index calling back into its layer once made
    such a cycle)."""
    import gc
    import weakref

    def make():
        linear = torch.nn.Linear(16, 12)
        if kind == "entries":
            layer = spft.SparseDeltaLinear.from_linear(linear, spft.random_index(12, 16, 0.3), mode=mode)
        elif kind == "rows":
            layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([1, 5]), mode=mode)
        else:
            layer = spft.BlockSparseLinear.from_linear(linear, torch.tensor([0, 3]), block_size=(4, 8), mode=mode)
        layer(torch.randn(3, 16)).sum().backward()
        return layer

    make()  # first calls import lazily (their frames can linger once)
    gc.collect()
    gc.disable()
    try:
        layer = make()
        weight, ref = weakref.ref(layer.weight), weakref.ref(layer)
        del layer
        assert ref() is None and weight() is None
    finally:
        gc.enable()
