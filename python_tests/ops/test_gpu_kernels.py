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


# --- SpMM, SDDMM and the fused GEMM (csrc/spmm.cu, sddmm.cu, fused_delta_linear.cu) -------------
# The fp64-oracle tests over awkward shapes run the cuda backend in test_spmm.py, test_sddmm.py,
# test_fused_delta_linear.py and test_sparse_delta_linear.py; these cover what those do not.


def _sddmm_problem(tokens, out_features, in_features, density, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    dy = torch.randn(tokens, out_features, generator=generator).to(dtype)
    si, _ = spft.SparseIndex.build(index.cuda(), out_features, in_features, tile_metadata=True)
    return index, x, dy, si


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(70, 136, 200, 0.1), (300, 64, 64, 1.0), (33, 8, 520, 0.03), (1, 16, 8, 0.5)])
def test_cuda_sddmm_variants_on_aligned_shapes(dtype, shape):
    """Multiples of 8 take the 16-byte cp.async loads of the tensor-core variant; both variants
    stay within the error budget of the fp64 dense gradient and repeat bitwise."""
    from helpers import ATOL, max_error
    from spft_kernels.ops.sddmm import sddmm

    index, x, dy, si = _sddmm_problem(*shape, dtype)
    reference = (dy.double().t() @ x.double()).view(-1)[index.long()]
    plain = (dy.float().t() @ x.float()).view(-1)[index.long()]
    bound = 2 * max_error(plain, reference) + ATOL[torch.float32] * max(reference.abs().max().item(), 1.0)
    xc, dyc = x.cuda(), dy.cuda()
    for tile_ptr in (si.tile_ptr, None):
        runs = [sddmm(xc, dyc, si.flat, tile_ptr, "cuda") for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        assert max_error(runs[0].cpu(), reference) <= bound


def test_cuda_kernels_take_int64_positions():
    from spft_kernels.ops.fused_delta_linear import fused_delta_linear
    from spft_kernels.ops.sddmm import sddmm
    from spft_kernels.ops.spmm import spmm_add, spmm_t_add

    index, x, dy, si = _sddmm_problem(50, 40, 72, 0.2, torch.bfloat16, seed=5)
    xc, dyc = x.cuda(), dy.cuda()
    delta = torch.randn(si.nnz, device="cuda")
    wide = si.flat.long()
    weight = torch.randn(40, 72, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(sddmm(xc, dyc, wide, None, "cuda"), sddmm(xc, dyc, si.flat, None, "cuda"))
    assert torch.equal(sddmm(xc, dyc, wide, si.tile_ptr, "cuda"), sddmm(xc, dyc, si.flat, si.tile_ptr, "cuda"))
    assert torch.equal(spmm_add(dyc, xc, delta, wide, si.row_ptr, "cuda"), spmm_add(dyc, xc, delta, si.flat, si.row_ptr, "cuda"))
    assert torch.equal(
        spmm_t_add(xc, dyc, delta, wide, si.col_ptr, si.csc_perm, "cuda"),
        spmm_t_add(xc, dyc, delta, si.flat, si.col_ptr, si.csc_perm, "cuda"),
    )
    assert torch.equal(
        fused_delta_linear(xc, weight, delta, wide, si.row_ptr, None, "cuda"),
        fused_delta_linear(xc, weight, delta, si.flat, si.row_ptr, None, "cuda"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_forward_uses_the_merged_weight(dtype):
    """The fused GEMM sees bitwise the merged mode's W0 + Δ: its output is a GEMM with that weight
    (up to the order of the sum), and W0 is untouched."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(264, 136, device="cuda", dtype=dtype)
    index = spft.random_index(136, 264, 0.05, device="cuda")
    layer = spft.SparseDeltaLinear.from_linear(linear, index, mode="fused", backend="cuda")
    with torch.no_grad():
        layer.delta.normal_()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 70, 264, device="cuda", dtype=dtype)
    y = layer(x)
    assert torch.equal(layer.weight, w0) and not layer.merged
    expected = torch.nn.functional.linear(x.float(), layer.merged_weight().float(), layer.bias.float())
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["fused", "split", "merged"])
def test_cuda_training_matches_the_reference_backend(mode):
    """A few AdamW steps of every mode on the cuda backend follow the reference backend's run."""
    from helpers import fit_mse

    torch.manual_seed(0)
    base = torch.nn.Linear(136, 72, dtype=torch.float32)
    index = spft.random_index(72, 136, 0.05)
    x, target = torch.randn(64, 136), torch.randn(64, 72)
    runs = {}
    for backend, device in (("reference", "cuda"), ("cuda", "cuda")):
        linear = torch.nn.Linear(136, 72, device=device)
        linear.load_state_dict(base.state_dict())
        layer = spft.SparseDeltaLinear.from_linear(linear, index.to(device), mode=mode, backend=backend)
        optimizer = torch.optim.AdamW([layer.delta], lr=1e-2)
        fit_mse(layer, optimizer, x.to(device), target.to(device), steps=5)
        runs[backend] = layer.delta.detach().cpu()
    torch.testing.assert_close(runs["cuda"], runs["reference"], rtol=1e-4, atol=1e-5)
