"""The fused forward ``x (W0 + Δ)ᵀ + b`` (spft::fused_delta_linear) on every backend that has it,
against the fp64 dense definition; the binding's checks of the CUDA ops (they run on the CPU too:
the ops are registered for CPU tensors, which get the same structural checks and then a clear
"must be a CUDA tensor"); the fake implementations; and the dispatch rules."""

import pytest
import torch

import spft_kernels as spft
from conftest import (
    cuda_backend_expected, cuda_extension_or_skip, cuda_extension_required, default_device, extension_or_skip, kernel_dtypes,
)
from helpers import ATOL, dense_weight, max_error
from spft_kernels.ops import backends
from spft_kernels.ops.fused_delta_linear import fused_delta_linear

DEVICE = default_device()
# (tokens, out, in, density, bias): 1 token, nnz = 0, nnz = out*in, odd sizes (the element-wise
# tile loads), sizes that are multiples of 8 (the 16-byte loads), several 128-wide tiles with
# partial edges, rows whose entries span several K steps.
SHAPES = [
    (1, 1, 1, 1.0, True), (37, 29, 41, 0.2, False), (5, 64, 48, 0.0, True), (3, 9, 11, 1.0, True),
    (130, 136, 200, 0.05, True), (257, 130, 72, 0.3, False),
]


def fused_backends(device):
    names = ["reference"]
    if cuda_backend_expected(device):
        names.append("cuda")
    return names


def problem(tokens, out_features, in_features, density, with_bias, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    delta = torch.randn(index.numel(), generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64) / in_features**0.5
    bias = torch.randn(out_features, generator=generator, dtype=torch.float64) if with_bias else None
    return index, delta, x, weight, bias


@pytest.mark.parametrize("backend", fused_backends(DEVICE))
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_forward_matches_dense_definition(backend, dtype, shape):
    index, delta, x, weight, bias = problem(*shape, dtype)
    si, _ = spft.SparseIndex.build(index.to(DEVICE), *weight.shape)
    master = delta.to(torch.float64 if dtype == torch.float64 else torch.float32)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    got = fused_delta_linear(cast(x), cast(weight), master.to(DEVICE), si.flat, si.row_ptr, cast(bias), backend)
    assert got.dtype == dtype and got.shape == (x.shape[0], weight.shape[0])
    # The oracle uses the operands as rounded to dtype (the delta as the fp32 master holds it).
    x_r, w_r = x.to(dtype).double(), weight.to(dtype).double()
    b_r = None if bias is None else bias.to(dtype).double()
    effective = dense_weight(w_r, master.double(), index)
    reference = torch.nn.functional.linear(x_r, effective, b_r)
    plain_dtype = torch.float32 if dtype == torch.float16 else dtype  # CPU fp16 GEMMs are emulated
    plain = torch.nn.functional.linear(
        x.to(dtype).to(plain_dtype), effective.to(dtype).to(plain_dtype), None if bias is None else bias.to(dtype).to(plain_dtype)
    ).to(dtype)
    scale = max(reference.abs().max().item(), 1.0)
    assert max_error(got.cpu(), reference) <= 2 * max_error(plain, reference) + ATOL[dtype] * scale


@pytest.mark.parametrize("backend", fused_backends(DEVICE))
def test_fused_forward_reads_strided_x_and_is_reproducible(backend):
    index, delta, x, weight, bias = problem(33, 24, 40, 0.25, True, torch.float32, seed=1)
    si, _ = spft.SparseIndex.build(index.to(DEVICE), 24, 40)
    wide = torch.randn(33, 55, dtype=torch.float32)
    wide[:, 7:47] = x.float()
    strided = wide.to(DEVICE)[:, 7:47]  # row stride 55, not a multiple of 8
    args = (weight.float().to(DEVICE), delta.float().to(DEVICE), si.flat, si.row_ptr, bias.float().to(DEVICE))
    runs = [fused_delta_linear(strided, *args, backend) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    reference = torch.nn.functional.linear(x.float().double(), dense_weight(weight.float().double(), delta.float().double(), index), bias.float().double())
    assert max_error(runs[0].cpu(), reference) < 1e-4


@pytest.mark.parametrize("backend", fused_backends(DEVICE))
def test_fused_forward_takes_a_strided_bias(backend):
    index, delta, x, weight, bias = problem(9, 6, 16, 0.3, True, torch.float32, seed=2)
    si, _ = spft.SparseIndex.build(index.to(DEVICE), 6, 16)
    spaced = torch.zeros(12, dtype=torch.float32)
    spaced[::2] = bias.float()
    args = (x.float().to(DEVICE), weight.float().to(DEVICE), delta.float().to(DEVICE), si.flat, si.row_ptr)
    strided = fused_delta_linear(*args, spaced.to(DEVICE)[::2], backend)
    torch.testing.assert_close(strided, fused_delta_linear(*args, bias.float().to(DEVICE), backend), rtol=0, atol=0)


def test_fused_op_has_no_triton_kernel_and_auto_keeps_unmeasured_cuda_kernels_out():
    assert "triton" not in backends.implemented_backends("fused_delta_linear")
    cuda = torch.device("cuda")
    for op in ("fused_delta_linear", "spmm_add", "spmm_t_add", "sddmm"):
        assert "cuda" in backends.implemented_backends(op)
        # Until measured on a GPU, "auto" on CUDA tensors runs the reference path for these ops.
        assert backends.auto_candidates(op, "cuda") == ["reference"]
        assert backends.resolve_backend(op, "auto", cuda) == "reference"
    assert backends.auto_candidates("scatter_delta", "cuda") == ["cuda", "reference"]
    if "cuda" in spft.available_backends():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            backends.resolve_backend("fused_delta_linear", "cuda", torch.device("cpu"))


def test_fake_implementations_give_shapes_and_dtypes():
    x = torch.empty(7, 10, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(5, 10, device="meta", dtype=torch.bfloat16)
    index = torch.empty(6, device="meta", dtype=torch.int32)
    row_ptr = torch.empty(6, device="meta", dtype=torch.int32)
    delta = torch.empty(6, device="meta")
    y = fused_delta_linear(x, weight, delta, index, row_ptr, None, "auto")
    assert y.shape == (7, 5) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    if "cuda" not in spft.available_backends() and not cuda_extension_required():
        return  # the extension's fake implementations are checked where it is built
    ops = torch.ops.spft
    assert ops.cuda_fused_delta_linear(x, weight, delta, index, row_ptr, None).shape == (7, 5)
    dy = torch.empty(7, 5, device="meta", dtype=torch.bfloat16)
    grad = ops.cuda_sddmm(x, dy, index, None)
    assert grad.shape == (6,) and grad.dtype == torch.float32
    assert ops.cuda_sddmm(x.double(), dy.double(), index, None).dtype == torch.float64
    assert ops.cuda_spmm_add(dy, x, delta, index, row_ptr).shape == (7, 5)
    col_ptr = torch.empty(11, device="meta", dtype=torch.int32)
    assert ops.cuda_spmm_t_add(x, dy, delta, index, col_ptr, index).shape == (7, 10)


# --- the binding's checks (CPU tensors reach them; CUDA tensors on a GPU too) -------------------


def _operands(device="cpu", dtype=torch.float32, tokens=6, out_features=5, in_features=8):
    index = torch.tensor([1, 9, 17, 39], dtype=torch.int32, device=device)
    si, _ = spft.SparseIndex.build(index, out_features, in_features, tile_metadata=True)
    return dict(
        x=torch.randn(tokens, in_features, device=device).to(dtype),
        dy=torch.randn(tokens, out_features, device=device).to(dtype),
        weight=torch.randn(out_features, in_features, device=device).to(dtype),
        bias=torch.randn(out_features, device=device).to(dtype),
        delta=torch.randn(4, device=device),
        si=si,
    )


BAD_FUSED = [
    (lambda o: dict(o, x=o["x"].int()), "x must be float32, float64, float16 or bfloat16"),
    (lambda o: dict(o, x=o["x"][None]), "x must be 2-D"),
    (lambda o: dict(o, x=o["x"].t().contiguous().t()), "x rows must be contiguous"),
    (lambda o: dict(o, weight=o["weight"].t().contiguous().t()), "weight must be a contiguous 2-D"),
    (lambda o: dict(o, weight=o["weight"].double()), "x and weight must share a dtype"),
    (lambda o: dict(o, weight=o["weight"][:, :7]), "weight must be a contiguous 2-D|x must have 7 features"),
    (lambda o: dict(o, bias=o["bias"][:4]), "bias must be contiguous with shape \\[5\\]"),
    (lambda o: dict(o, bias=o["bias"].double()), "bias must have x's dtype"),
    (lambda o: dict(o, delta=o["delta"][:3]), "delta must be 1-D with one value per index entry \\(4\\)"),
    (lambda o: dict(o, delta=o["delta"].long()), "delta must be float32"),
    (lambda o: dict(o, row_ptr=o["row_ptr"][:5]), "row_ptr must have 6 entries"),
    (lambda o: dict(o, row_ptr=o["row_ptr"].float()), "row_ptr must be int32 or int64"),
    (lambda o: dict(o, row_ptr=o["row_ptr"].long()), "row_ptr is int64 but index is int32"),
    (lambda o: dict(o, index=o["index"].float()), "index must be int32 or int64"),
]


def _fused_args(o):
    return (o["x"], o["weight"], o["delta"], o["index"], o["row_ptr"], o["bias"])


@pytest.mark.parametrize("edit, message", BAD_FUSED)
def test_fused_binding_names_the_problem(edit, message):
    extension_or_skip()
    device = DEVICE if DEVICE.type == "cuda" else "cpu"
    o = _operands(device)
    o = dict(o, index=o["si"].flat, row_ptr=o["si"].row_ptr)
    with pytest.raises(ValueError, match=message):
        torch.ops.spft.cuda_fused_delta_linear(*_fused_args(edit(o)))


def test_cuda_ops_refuse_cpu_tensors_and_mixed_devices_with_value_errors():
    extension_or_skip()
    o = _operands("cpu")
    si = o["si"]
    ops = torch.ops.spft
    with pytest.raises(ValueError, match="cuda_fused_delta_linear: x must be a CUDA tensor, got device cpu"):
        ops.cuda_fused_delta_linear(o["x"], o["weight"], o["delta"], si.flat, si.row_ptr, o["bias"])
    with pytest.raises(ValueError, match="cuda_sddmm: x must be a CUDA tensor"):
        ops.cuda_sddmm(o["x"], o["dy"], si.flat, si.tile_ptr)
    with pytest.raises(ValueError, match="cuda_spmm_add: base must be a CUDA tensor"):
        ops.cuda_spmm_add(o["dy"], o["x"], o["delta"], si.flat, si.row_ptr)
    with pytest.raises(ValueError, match="cuda_spmm_t_add: base must be a CUDA tensor"):
        ops.cuda_spmm_t_add(o["x"], o["dy"], o["delta"], si.flat, si.col_ptr, si.csc_perm)
    if DEVICE.type == "cuda":
        c = _operands("cuda")
        with pytest.raises(ValueError, match="delta is on cpu but the other operands are on cuda"):
            ops.cuda_fused_delta_linear(c["x"], c["weight"], o["delta"], c["si"].flat, c["si"].row_ptr, c["bias"])


def test_sddmm_and_spmm_bindings_name_the_problem():
    extension_or_skip()
    o = _operands("cpu")
    si = o["si"]
    ops = torch.ops.spft
    x, dy = o["x"], o["dy"]
    with pytest.raises(ValueError, match="x and dy must share a dtype"):
        ops.cuda_sddmm(x, dy.double(), si.flat, None)
    with pytest.raises(ValueError, match="x has 6 tokens but dy has 5"):
        ops.cuda_sddmm(x, dy[:5], si.flat, None)
    with pytest.raises(ValueError, match="tile_ptr must be contiguous with shape \\[5, 2\\]"):
        ops.cuda_sddmm(x, dy, si.flat, si.tile_ptr[:, :1])
    with pytest.raises(ValueError, match="index must be a contiguous 1-D tensor"):
        ops.cuda_sddmm(x, dy, si.flat[None], None)
    with pytest.raises(ValueError, match="row_ptr must have 6 entries"):
        ops.cuda_spmm_add(dy, x, o["delta"], si.flat, si.col_ptr)
    with pytest.raises(ValueError, match="base and x must share a dtype"):
        ops.cuda_spmm_add(dy.half(), x, o["delta"], si.flat, si.row_ptr)
    with pytest.raises(ValueError, match="csc_perm must have 4 entries"):
        ops.cuda_spmm_t_add(x, dy, o["delta"], si.flat, si.col_ptr, si.csc_perm[:3])
    with pytest.raises(ValueError, match="csc_perm and col_ptr must share a dtype"):
        ops.cuda_spmm_t_add(x, dy, o["delta"], si.flat, si.col_ptr, si.csc_perm.long())
    with pytest.raises(ValueError, match="4 entries but a zero-width operand"):
        ops.cuda_sddmm(x[:, :0], dy, si.flat, None)
    with pytest.raises(ValueError, match="4 entries but a zero-width operand"):
        ops.cuda_spmm_add(dy, x[:, :0], o["delta"], si.flat, si.row_ptr)
    with pytest.raises(ValueError, match="dy rows must be contiguous"):
        ops.cuda_spmm_t_add(x, dy.t().contiguous().t(), o["delta"], si.flat, si.col_ptr, si.csc_perm)


# --- an fp64 master: the fused GEMM sees bitwise the merged weight ---------------------------


def fp64_master_problem(dtype, out_features=24, in_features=40, seed=3):
    """(index, W0 in ``dtype``, fp64 master) whose sum W0 + Δ rounds to another value when Δ is
    rounded to fp32 first. fp32 weights: random deltas (the bits past fp32's 24 move the sum's
    rounding for about a quarter of the entries). fp16/bf16: every entry sums to just past a tie
    of two ``dtype`` values (W0 = 1, Δ = tie - 1 + 0.75 fp32 ulps of the tie): the fp64 sum breaks
    the tie upward; Δ rounded to fp32 loses that excess (under half an ulp of Δ ≈ -0.94), the sum
    lands on the tie and rounds to the even value below."""
    generator = torch.Generator().manual_seed(seed)
    index = spft.random_index(out_features, in_features, 0.5, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    delta = torch.randn(index.numel(), generator=generator, dtype=torch.float64)
    if dtype != torch.float32:
        fraction_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
        step = 2.0**-4 * 2.0**-fraction_bits  # the dtype's spacing in [1/16, 1/8)
        even = 2.0**-4 + 2 * step * torch.randint(0, 2 ** (fraction_bits - 1), (index.numel(),),
                                                  generator=generator, dtype=torch.float64)
        weight.view(-1)[index.long()] = 1.0
        delta = (even + step / 2) - 1.0 + 0.75 * 2.0**-4 * 2.0**-23
    return index, weight.to(dtype), delta


def _merged(weight, index, delta, backend):
    merged = weight.clone()
    spft.scatter_delta_(merged, index, delta=delta, backend=backend)
    return merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_fp64_master_rounded_to_fp32_first_merges_into_another_weight(dtype):
    """The inputs of the GPU test below tell the two sums apart: the merge (scatter_delta, fp64
    sum for an fp64 master) differs from the merge of the master rounded to fp32, which is what
    the fused op's binding used to hand its kernel."""
    index, weight, delta = fp64_master_problem(dtype)
    exact = _merged(weight, index, delta, "reference")
    rounded_first = _merged(weight, index, delta.float(), "reference")
    differing = (exact != rounded_first).sum().item()
    assert differing >= (index.numel() if dtype != torch.float32 else index.numel() // 10), differing


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_forward_sees_the_merged_weight_of_an_fp64_master_bitwise(dtype):
    cuda_extension_or_skip()
    index, weight, delta = fp64_master_problem(dtype)
    si, _ = spft.SparseIndex.build(index.cuda(), *weight.shape)
    weight, delta = weight.cuda(), delta.cuda()
    # x = I: each output is one product 1 * w plus zeros, exact in any accumulator, so y = Wᵀ.
    x = torch.eye(weight.shape[1], dtype=dtype, device="cuda")
    y = fused_delta_linear(x, weight, delta, si.flat, si.row_ptr, None, "cuda")
    merged = _merged(weight, si.flat, delta, "cuda")  # the merged mode's re-sync
    assert torch.equal(y.t(), merged), (y.t() != merged).sum().item()
