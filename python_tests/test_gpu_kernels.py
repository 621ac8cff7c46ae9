"""The csrc kernels against the reference backend on a GPU (skipped cleanly without one)."""

import itertools

import pytest
import torch

import spft_kernels as spft
from conftest import cuda_extension_or_skip

pytestmark = pytest.mark.gpu

WEIGHT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _needs_cuda_extension():
    cuda_extension_or_skip()


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape, density", [((1, 1), 1.0), ((37, 53), 0.13), ((257, 129), 1.0), ((64, 64), 0.0)])
def test_scatter_delta_matches_reference_bitwise(weight_dtype, delta_dtype, index_dtype, shape, density):
    index = spft.random_index(*shape, density).to(index_dtype)
    weight = torch.randn(shape, dtype=torch.float64).to(weight_dtype)
    base = torch.randn(index.numel(), dtype=torch.float64).to(weight_dtype)
    delta = torch.randn(index.numel(), dtype=torch.float64).to(delta_dtype)
    for use_base, use_delta, alpha in itertools.product([False, True], [False, True], [1.0, -1.0, 0.5]):
        expected = weight.clone()
        spft.scatter_delta_(
            expected, index, base=base if use_base else None, delta=delta if use_delta else None,
            alpha=alpha, backend="reference",
        )
        got = weight.cuda()
        spft.scatter_delta_(
            got, index.cuda(), base=base.cuda() if use_base else None,
            delta=delta.cuda() if use_delta else None, alpha=alpha, backend="cuda",
        )
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), expected), (use_base, use_delta, alpha)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lead, features, num_rows", [((1,), 1, 1), ((3, 5), 77, 13), ((129,), 1000, 1000), ((4,), 9, 0)])
def test_row_gather_matches_index_select(dtype, rows_dtype, lead, features, num_rows):
    src = torch.randn(*lead, features, device="cuda").to(dtype)
    rows = torch.randperm(features, device="cuda")[:num_rows].sort().values.to(rows_dtype)
    got = spft.row_gather(src, rows, backend="cuda")
    assert torch.equal(got, src[..., rows.long()])


def test_row_gather_strided_and_non_contiguous_sources():
    wide = torch.randn(50, 96, device="cuda")
    src = wide[:, 10:70]  # row stride 96, features 60
    rows = torch.tensor([0, 59, 31], device="cuda")
    assert torch.equal(spft.row_gather(src, rows, backend="cuda"), src[:, [0, 59, 31]])
    transposed = torch.randn(60, 50, device="cuda").t()
    assert torch.equal(spft.row_gather(transposed, rows, backend="cuda"), transposed[:, [0, 59, 31]])


def test_binding_rejects_bad_tensors_with_value_errors():
    weight = torch.zeros(4, 4, device="cuda")
    index = torch.tensor([1, 2], device="cuda", dtype=torch.int32)
    op = torch.ops.spft.cuda_scatter_delta_
    with pytest.raises(ValueError, match="index must be a CUDA tensor"):
        op(weight, index.cpu(), None, torch.ones(2, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="index must be int32 or int64"):
        op(weight, index.float(), None, torch.ones(2, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        op(weight.t(), index, None, torch.ones(2, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="one value per index entry"):
        op(weight, index, None, torch.ones(3, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="base must have the weight's dtype"):
        op(weight, index, torch.ones(2, device="cuda", dtype=torch.float64), None, 1.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        torch.ops.spft.cuda_row_gather(torch.zeros(3, 4, device="cuda"), index.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_layer_on_cuda_matches_reference_backend(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(257, 129, dtype=dtype)
    index = spft.random_index(129, 257, 0.05)
    layers = {}
    for backend, device in (("reference", "cpu"), ("cuda", "cuda")):
        copy = torch.nn.Linear(257, 129, dtype=dtype, device=device)
        copy.load_state_dict(linear.state_dict())
        layer = spft.SparseDeltaLinear.from_linear(copy, index.to(device), mode="merged", backend=backend)
        with torch.no_grad():
            layer.delta.copy_(torch.linspace(-1, 1, layer.nnz))
        layer.merge()
        layers[backend] = layer
    assert torch.equal(layers["cuda"].weight.cpu(), layers["reference"].weight)
    layers["cuda"].unmerge()
    assert torch.equal(layers["cuda"].weight.cpu(), linear.weight)


def test_layer_training_step_on_cuda():
    torch.manual_seed(0)
    layer = spft.SparseDeltaLinear.from_linear(
        torch.nn.Linear(300, 200, device="cuda", dtype=torch.bfloat16),
        spft.random_index(200, 300, 0.01, device="cuda"),
    )
    x = torch.randn(8, 16, 300, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()
    assert layer.delta.grad is not None and torch.isfinite(layer.delta.grad).all()
