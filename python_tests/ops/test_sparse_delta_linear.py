import pytest
import torch

import spft_kernels as spft
from conftest import default_device, usable_backends
from helpers import assert_within_budget, dense_oracle, plain_pytorch, random_problem
from spft_kernels.ops.backends import implemented_backends
from spft_kernels.ops.fused_delta_linear import fused_delta_linear
from spft_kernels.ops.sddmm import sddmm
from spft_kernels.ops.spmm import spmm_add, spmm_t_add

# (out, in, leading dims of x, density, bias): odd sizes, 1 token, nnz = 0, nnz = out*in, 3-D x.
CASES = [
    (1, 1, (1,), 1.0, True),
    (7, 13, (1,), 0.3, False),
    (33, 17, (5, 3), 0.1, True),
    (64, 48, (2, 3, 5), 0.0, True),
    (9, 11, (4,), 1.0, False),
    (130, 257, (37,), 0.02, True),
]


def _layer(x, weight, delta, index, bias, mode):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    layer = spft.SparseDeltaLinear.from_linear(linear, index, mode=mode)
    with torch.no_grad():
        layer.delta.copy_(delta)
    return layer


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["split", "merged", "fused"])
def test_fp64_matches_dense_definition(case, mode):
    x, weight, delta, index, bias, dy = random_problem(*case)
    layer = _layer(x, weight, delta, index, bias, mode)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    y_ref, dx_ref, ddelta_ref, dbias_ref = dense_oracle(x, weight, delta, index, bias, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, ddelta_ref, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None
    assert layer.bias is None or layer.bias.grad is None


@pytest.mark.parametrize("case", CASES[:5])
def test_gradcheck_functional(case):
    x, weight, delta, index, bias, _ = random_problem(*case)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    delta.requires_grad_(True)
    inputs = (x, weight, delta) + ((bias.requires_grad_(True),) if bias is not None else ())
    sparse_index, _ = spft.SparseIndex.build(index, *weight.shape)

    def fn(x, weight, delta, bias=None):
        return spft.sparse_delta_linear(x, weight, delta, sparse_index, bias, backend="reference")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["split", "merged", "fused"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], (96, 80, (50,), 0.05, True)])
def test_low_precision_within_twice_plain_pytorch_error(case, mode, dtype):
    x, weight, delta, index, bias, dy = random_problem(*case, dtype=dtype)
    delta = delta.float()
    layer = _layer(x, weight, delta, index, bias, mode)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.delta.grad.dtype == torch.float32
    y_ref, dx_ref, ddelta_ref, _ = dense_oracle(x, weight, delta, index, bias, dy)
    y_plain, dx_plain, ddelta_plain = plain_pytorch(x, weight, delta, index, bias, dy)
    assert_within_budget("y", y, y_plain, y_ref, dtype)
    assert_within_budget("dx", x.grad, dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", layer.delta.grad, ddelta_plain, ddelta_ref, dtype)


@pytest.mark.parametrize("backend", usable_backends(default_device(), ("spmm_add", "spmm_t_add", "sddmm")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_full_step_on_each_backend(backend, dtype, fused):
    """Forward and backward through the layer op with every kernel from one backend (split, and
    fused where the backend has the fused GEMM)."""
    if fused and backend not in implemented_backends("fused_delta_linear"):
        pytest.skip(f"the {backend} backend has no fused GEMM")
    device = default_device()
    x, weight, delta, index, bias, dy = random_problem(45, 38, (3, 7), 0.15, True, seed=21, dtype=dtype)
    x, weight, bias, dy = (t.to(device) for t in (x, weight, bias, dy))
    sparse_index, _ = spft.SparseIndex.build(index.to(device), 45, 38)
    x.requires_grad_(True)
    delta_param = delta.float().to(device).requires_grad_(True)
    y = spft.sparse_delta_linear(x, weight, delta_param, sparse_index, bias, backend=backend, fused=fused)
    y.backward(dy)
    x_cpu, w_cpu, b_cpu, dy_cpu = (t.detach().cpu() for t in (x, weight, bias, dy))
    y_ref, dx_ref, ddelta_ref, _ = dense_oracle(x_cpu, w_cpu, delta_param.detach().cpu(), index, b_cpu, dy_cpu)
    y_plain, dx_plain, ddelta_plain = plain_pytorch(
        x_cpu.float(), w_cpu.float(), delta_param.detach().cpu(), index, b_cpu.float(), dy_cpu.float()
    )
    if dtype == torch.float16:  # CPU fp16 GEMMs are emulated; the plain path runs in fp32, then rounds
        y_plain, dx_plain = y_plain.half(), dx_plain.half()
    assert_within_budget("y", y.cpu(), y_plain, y_ref, dtype)
    assert_within_budget("dx", x.grad.cpu(), dx_plain, dx_ref, dtype)
    assert_within_budget("d delta", delta_param.grad.cpu(), ddelta_plain, ddelta_ref, dtype)


def test_merged_fused_and_split_gradients_agree():
    x, weight, delta, index, bias, dy = random_problem(40, 30, (6, 2), 0.2, True, seed=3)
    grads = {}
    for mode in ("split", "merged", "fused"):
        layer = _layer(x, weight, delta, index, bias, mode)
        xx = x.clone().requires_grad_(True)
        layer(xx).backward(dy)
        grads[mode] = (xx.grad, layer.delta.grad)
        if mode == "fused":
            assert not layer.merged and torch.equal(layer.weight, weight)  # W0 is never written
    torch.testing.assert_close(grads["split"], grads["merged"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["split"], grads["fused"], rtol=0, atol=0)


def test_merged_and_fused_are_exclusive():
    x, weight, delta, index, bias, _ = random_problem(4, 3, (2,), 0.5, True)
    with pytest.raises(ValueError, match="exclusive"):
        spft.sparse_delta_linear(x, weight, delta, index, bias, merged=True, fused=True)


def test_unsorted_index_permutes_delta_with_it():
    x, weight, delta, index, bias, dy = random_problem(12, 10, (3,), 0.4, True, seed=5)
    permutation = torch.randperm(index.numel())
    sorted_delta = delta.clone().requires_grad_(True)
    shuffled_delta = delta[permutation].clone().requires_grad_(True)
    y_sorted = spft.sparse_delta_linear(x, weight, sorted_delta, index, bias)
    y_shuffled = spft.sparse_delta_linear(x, weight, shuffled_delta, index[permutation], bias)
    torch.testing.assert_close(y_sorted, y_shuffled, rtol=0, atol=0)
    y_sorted.backward(dy)
    y_shuffled.backward(dy)
    torch.testing.assert_close(shuffled_delta.grad, sorted_delta.grad[permutation], rtol=0, atol=0)


def test_delta_gradient_is_bitwise_reproducible():
    x, weight, delta, index, bias, dy = random_problem(50, 70, (33,), 0.1, True, seed=7, dtype=torch.float32)
    grads = []
    for _ in range(3):
        d = delta.float().clone().requires_grad_(True)
        spft.sparse_delta_linear(x, weight, d, index, bias).backward(dy)
        grads.append(d.grad)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_reference_blocks_of_one_row_match_the_default_blocks(monkeypatch):
    x, weight, delta, index, bias, dy = random_problem(20, 24, (17,), 0.3, True, seed=9)
    whole = spft.sparse_delta_linear(x, weight, delta, index, bias)
    import spft_kernels.ops.naive as naive

    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 1)  # a budget of one value: blocks of one row
    chunked = spft.sparse_delta_linear(x, weight, delta, index, bias)
    torch.testing.assert_close(whole, chunked, rtol=1e-13, atol=1e-13)


def test_bf16_autocast_on_cpu():
    x, weight, delta, index, bias, dy = random_problem(48, 40, (8,), 0.1, True, seed=11, dtype=torch.float32)
    layer = _layer(x, weight, delta.float(), index, bias, "split")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert layer.delta.grad.dtype == torch.float32
    y_ref, _, ddelta_ref, _ = dense_oracle(x, weight, delta, index, bias, dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(layer.delta.grad.double(), ddelta_ref, rtol=2e-2, atol=0.5)


def _opcheck_args(requires_grad):
    x, weight, delta, index, bias, _ = random_problem(19, 23, (2, 5), 0.2, True, seed=13, dtype=torch.float32)
    sparse_index, _ = spft.SparseIndex.build(index, 19, 23)
    delta = delta.float().requires_grad_(requires_grad)
    x = x.requires_grad_(requires_grad)
    bias = bias.requires_grad_(requires_grad)
    return x, weight, delta, sparse_index, bias


@pytest.mark.parametrize("with_kernel_forms", [False, True])
@pytest.mark.parametrize("mode", ["split", "merged", "fused"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_layer_op(mode, requires_grad, with_kernel_forms, with_weight):
    if mode == "merged" and not with_weight:
        pytest.skip("merged needs the weight")
    x, weight, delta, si, bias = _opcheck_args(requires_grad)
    assert si.tile_ptr is not None  # density 0.2: the tile metadata rides along
    # The op takes the stored CSR (what layers keep) and, for a custom kernel, the derived forms
    # it reads, named by index_form.
    csr = si.csr()
    named = {"crow": csr.crow, "col_bytes": csr.col_bytes}
    if with_kernel_forms:
        named.update(row_ptr=si.row_ptr, col_ptr=si.col_ptr, csc_perm=si.csc_perm, tile_ptr=si.tile_ptr)
    args = (x, weight if with_weight else None, bias, delta, list(named.values()))
    kwargs = dict(index_form=",".join(named), out_features=19, mode=mode, backend="reference")
    torch.library.opcheck(torch.ops.spft.sparse_delta_linear.default, args, kwargs)


def test_opcheck_kernel_ops():
    x, weight, delta, si, bias = _opcheck_args(False)
    x2d = x.reshape(-1, 23)
    dy2d = torch.randn(x2d.shape[0], 19)
    base_out = torch.randn(x2d.shape[0], 19)
    base_in = torch.randn(x2d.shape[0], 23)
    torch.library.opcheck(spmm_add, (base_out, x2d, delta, si.flat, si.row_ptr, "reference"))
    torch.library.opcheck(spmm_t_add, (base_in, dy2d, delta, si.flat, si.col_ptr, si.csc_perm, "reference"))
    torch.library.opcheck(sddmm, (x2d, dy2d, si.flat, si.tile_ptr, "reference"))
    torch.library.opcheck(sddmm, (x2d, dy2d, si.flat, None, "reference"))
    torch.library.opcheck(fused_delta_linear, (x2d, weight, delta, si.flat, si.row_ptr, bias, "reference"))


def test_kernel_ops_match_dense():
    x, weight, delta, index, bias, dy = random_problem(21, 15, (9,), 0.25, False, seed=17)
    si, _ = spft.SparseIndex.build(index, 21, 15)
    from helpers import dense_weight

    dense_delta = dense_weight(torch.zeros(21, 15, dtype=torch.float64), delta, index)
    base_out, base_in = torch.randn(9, 21, dtype=torch.float64), torch.randn(9, 15, dtype=torch.float64)
    torch.testing.assert_close(spmm_add(base_out, x, delta, si.flat, si.row_ptr, "auto"), base_out + x @ dense_delta.t())
    torch.testing.assert_close(
        spmm_t_add(base_in, dy, delta, si.flat, si.col_ptr, si.csc_perm, "auto"), base_in + dy @ dense_delta
    )
    torch.testing.assert_close(sddmm(x, dy, si.flat, None, "auto"), (dy.t() @ x).view(-1)[index.long()])


class TestBadInput:
    def setup_method(self):
        self.x, self.weight, self.delta, self.index, self.bias, _ = random_problem(8, 6, (3,), 0.5, True)

    def call(self, **overrides):
        args = dict(x=self.x, weight=self.weight, delta=self.delta, index=self.index, bias=self.bias)
        args.update(overrides)
        return spft.sparse_delta_linear(**args)

    def test_x_width(self):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 6\]"):
            self.call(x=torch.randn(3, 7, dtype=torch.float64))

    def test_delta_length(self):
        with pytest.raises(ValueError, match="delta must be 1-D with one value per index entry"):
            self.call(delta=self.delta[:-1])

    def test_dtype_mismatch(self):
        with pytest.raises(ValueError, match="must share a dtype"):
            self.call(x=self.x.float())

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            self.call(bias=torch.zeros(7, dtype=torch.float64))

    def test_index_out_of_range(self):
        with pytest.raises(ValueError, match="out of range"):
            self.call(index=torch.tensor([0, 48]), delta=torch.zeros(2, dtype=torch.float64))

    def test_index_duplicates(self):
        with pytest.raises(ValueError, match="duplicate"):
            self.call(index=torch.tensor([3, 3]), delta=torch.zeros(2, dtype=torch.float64))

    def test_sparse_index_for_other_shape(self):
        other, _ = spft.SparseIndex.build(torch.tensor([1]), 6, 8)
        with pytest.raises(ValueError, match="built for shape"):
            self.call(index=other, delta=torch.zeros(1, dtype=torch.float64))

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="unknown backend"):
            spft.sparse_delta_linear(self.x, self.weight, self.delta, self.index, self.bias, backend="cublas")

    def test_cuda_backend_on_cpu_tensors_fails_before_running(self):
        error = ValueError if "cuda" in spft.available_backends() else RuntimeError
        for fused in (False, True):
            with pytest.raises(error, match="cuda"):
                spft.sparse_delta_linear(self.x, self.weight, self.delta, self.index, self.bias, backend="cuda", fused=fused)

    def test_fused_on_a_backend_without_the_fused_gemm_fails_before_running(self):
        if "triton" not in spft.available_backends():
            pytest.skip("triton is not installed")
        with pytest.raises(NotImplementedError, match="fused_delta_linear: backend 'triton' has no implementation"):
            spft.sparse_delta_linear(self.x, self.weight, self.delta, self.index, self.bias, backend="triton", fused=True)

    def test_triton_on_cpu_tensors_needs_the_interpreter(self, monkeypatch):
        if "triton" not in spft.available_backends():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors \\(or TRITON_INTERPRET=1"):
            spft.sparse_delta_linear(self.x, self.weight, self.delta, self.index, self.bias, backend="triton")

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="one device"):
            self.call(x=self.x.to("meta"))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
@pytest.mark.parametrize("mode", ["split", "merged", "fused"])
def test_zero_width_layers_train(shape, mode):
    """A layer with no inputs or no outputs (hence no entries) runs forward and backward."""
    linear = torch.nn.Linear(shape[1], shape[0], dtype=torch.float64)
    layer = spft.SparseDeltaLinear.from_linear(linear, torch.tensor([], dtype=torch.int64), mode=mode)
    x = torch.randn(3, 2, shape[1], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 2, shape[0])
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.delta.grad.shape == (0,)


def test_the_mode_is_a_string_end_to_end():
    """The layer hands its mode to the op as the string it is (no pair of bools on the way); the
    keywords of earlier versions say the same."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=generator)
    index = spft.random_index(7, 5, 0.4, generator)
    delta = torch.randn(index.numel(), dtype=torch.float64, generator=generator)
    x = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    split = spft.sparse_delta_linear(x, weight, delta, index, mode="split")
    assert torch.equal(split, spft.sparse_delta_linear(x, weight, delta, index))
    merged_weight = weight.clone().view(-1).index_add_(0, index.long(), delta).view(7, 5)
    merged = spft.sparse_delta_linear(x, merged_weight, delta, index, mode="merged")
    assert torch.equal(merged, spft.sparse_delta_linear(x, merged_weight, delta, index, merged=True))
    torch.testing.assert_close(merged, split)
    for bad in ("dense", "auto"):
        with pytest.raises(ValueError, match="mode must be one of"):
            spft.sparse_delta_linear(x, weight, delta, index, mode=bad)
    with pytest.raises(ValueError, match="given alone"):
        spft.sparse_delta_linear(x, weight, delta, index, mode="split", merged=True)
