"""PST (spft_kernels/ops/pst_linear.py, spft_kernels/nn/pst_linear.py): parameter count, the exact top-v mask and its tie rule, the cubic
schedule, gradients against a hand-written straight-through autograd oracle, the Triton fused
path (interpreter on a CPU) against it, the no n x k claim, export, state dict and a short
training run."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft
from conftest import default_device, usable_backends
from helpers import assert_within_budget
from spft_kernels.ops import pst_linear as pst
from spft_kernels.nn import pst_linear as pst_layer
from spft_kernels.bench.memory import TensorMemoryTracker

DEVICE = default_device()
BACKENDS = usable_backends(DEVICE)
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")


def make_layer(n, k, sparsity, backend="reference", dtype=torch.float64, bias=True, r1=3, r2=2, seed=0,
               random_factors=True, abs_score_grad=True, weight=None):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator) if weight is None else weight)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=generator))
    layer = spft.PSTLinear.from_linear(
        linear.to(DEVICE), sparsity, r1=r1, r2=r2, beta=0.7, alpha1=1.3, alpha2=0.6, backend=backend,
        abs_score_grad=abs_score_grad, generator=generator,
    )
    if random_factors:
        with torch.no_grad():
            for factor in layer.factors():
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.5)
    return layer


class _StraightThrough(torch.autograd.Function):
    """Forward: the given 0/1 mask. Backward: the mask's gradient goes to the score unchanged."""

    @staticmethod
    def forward(ctx, score, mask):
        return mask.to(score.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def top_v_mask(score, keep):
    """The tie rule written independently: stable descending sort, lower flat position first."""
    order = torch.sort(score.reshape(-1).cpu(), descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(score.shape)


def dense_pst(layer, x, dy, dtype, mask=None):
    """The layer's step by plain dense autograd: W_eff, S, M in fp64 (dtype fp64) or fp32, the
    GEMM in ``dtype``. Returns (y, dx, [dU, dV, dA, dB, dR, dC], mask)."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    factors = [p.detach().cpu().to(exact).requires_grad_(True) for p in layer.factors()]
    U, V, A, B, R, C = factors
    w = layer.weight.detach().cpu().to(exact) + layer.beta * U @ V
    magnitude = w.abs() if layer.abs_score_grad else w.detach().abs()
    score = magnitude + layer.alpha1 * A @ B + layer.alpha2 * (R + C)
    mask = top_v_mask(score.detach(), layer.kept) if mask is None else mask.cpu()
    masked = w * _StraightThrough.apply(score, mask)
    xx = x.detach().cpu().to(dtype).requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().cpu().to(dtype)
    y = F.linear(xx, masked.to(dtype), bias)
    grads = torch.autograd.grad(y, [xx] + factors, dy.cpu().to(dtype))
    return y.detach(), grads[0], list(grads[1:]), mask


def run_layer(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in layer.factors()]


# --- sizes, schedule, mask ---------------------------------------------------------------------


@pytest.mark.parametrize("n, k, r1, r2", [(24, 19, 8, 8), (7, 50, 3, 5), (16, 16, 0, 4), (5, 3, 2, 0)])
def test_trainable_parameter_count_is_the_formula(n, k, r1, r2):
    linear = torch.nn.Linear(k, n)
    layer = spft.PSTLinear.from_linear(linear, 0.5, r1=r1, r2=r2)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == (n + k) * (r1 + r2 + 1)
    assert layer.weight is linear.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters() if p.requires_grad}
    assert shapes == dict(U=(n, r2), V=(r2, k), A=(n, r1), B=(r1, k), R=(n, 1), C=(1, k))


def test_initialisation_follows_the_paper_and_starts_as_magnitude_pruning():
    layer = make_layer(13, 11, 0.6, random_factors=False)
    assert all(torch.count_nonzero(getattr(layer, name)) == 0 for name in "VBRC")
    assert layer.U.std() > 0.5 and layer.A.std() > 0.5  # N(0, 1)
    w0 = layer.weight.detach()
    expected = w0 * top_v_mask(w0.abs(), layer.kept)
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.bias), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_mask_keeps_exactly_v_entries(backend, sparsity):
    n, k = 37, 29
    layer = make_layer(n, k, sparsity, backend=backend, dtype=torch.float32, seed=3)
    mask = layer.mask()
    assert layer.kept == round((1 - sparsity) * n * k)
    assert int(mask.sum()) == layer.kept
    reference = make_layer(n, k, sparsity, backend="reference", dtype=torch.float32, seed=3)
    assert torch.equal(mask.cpu(), reference.mask().cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.35, 0.5, 0.99])
def test_ties_are_broken_by_flat_position(backend, dtype, sparsity):
    # Five distinct magnitudes over 41 x 23 entries: nearly every score is tied. At the start
    # (V, B, R, C = 0) the score is exactly |W0| in every backend.
    generator = torch.Generator().manual_seed(5)
    weight = torch.randint(-2, 3, (41, 23), generator=generator).to(dtype)
    layer = make_layer(41, 23, sparsity, backend=backend, dtype=dtype, random_factors=False, weight=weight)
    mask = layer.mask().cpu()
    assert int(mask.sum()) == layer.kept
    assert torch.equal(mask, top_v_mask(weight.abs().double(), layer.kept))
    # Scores are bitwise equal across backends here, so the threshold pairs (t, p) must be too.
    reference = make_layer(41, 23, sparsity, dtype=dtype, random_factors=False, weight=weight)
    assert torch.equal(layer.threshold().cpu(), reference.threshold())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("shift", [0.0, -9.0])
def test_threshold_is_the_v_th_score_and_its_position(backend, sparsity, shift):
    # Dyadic values: every score is exact in fp32, so it is the same in every backend and the
    # threshold pair can be checked exactly. shift < 0 puts the threshold among negative scores.
    generator = torch.Generator().manual_seed(13)
    n, k = 33, 45
    dyadic = lambda *shape, scale: (torch.randint(-12, 13, shape, generator=generator) / scale)  # noqa: E731
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(dyadic(n, k, scale=8))
    layer = spft.PSTLinear.from_linear(linear.to(DEVICE), sparsity, r1=3, r2=2, beta=0.5, alpha1=2.0, alpha2=0.25,
                                       backend=backend)
    with torch.no_grad():
        for factor in layer.factors():
            factor.copy_(dyadic(*factor.shape, scale=4))
        layer.R.add_(shift)
    w = layer.weight.double().cpu() + 0.5 * layer.U.double().cpu() @ layer.V.double().cpu()
    score = w.abs() + 2.0 * layer.A.double().cpu() @ layer.B.double().cpu() + 0.25 * (layer.R + layer.C).double().cpu()
    assert (score < 0).any() and (score > 0).any()
    order = torch.sort(score.view(-1), descending=True, stable=True).indices
    vth = order[layer.kept - 1]
    t_key = pst.order_keys(score.view(-1)[vth].float().view(1))[0]
    assert layer.threshold().tolist() == [t_key.item(), vth.item() + 1]
    assert torch.equal(layer.mask().cpu(), top_v_mask(score, layer.kept))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_scores_keep_the_first_positions(backend):
    layer = make_layer(6, 10, 0.45, backend=backend, dtype=torch.float32, random_factors=False,
                       weight=torch.ones(6, 10))
    expected = torch.arange(60).view(6, 10) < 33
    assert torch.equal(layer.mask().cpu(), expected)


def test_cubic_schedule_phase_boundaries():
    total, final = 100, 0.9
    sparsity = [spft.cubic_sparsity(step, total, final) for step in range(total + 1)]
    assert sparsity[0] == 0.0 and sparsity[10] == 0.0  # warm-up: the first 10% of the steps
    assert 0.0 < sparsity[11] < 0.1
    assert math.isclose(sparsity[70], final) and all(s == final for s in sparsity[71:])  # cool-down: the last 30%
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:]))
    # halfway through the cubic phase: final * (1 - 0.5**3)
    assert math.isclose(sparsity[40], final * (1 - 0.5**3))
    assert spft.cubic_sparsity(7, 10, 0.5, warmup=0.0, cooldown=0.0) == pytest.approx(0.5 * (1 - 0.3**3))
    assert spft.cubic_sparsity(500, 100, 0.5) == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 10, 0.5), "step"), ((1, 0, 0.5), "total_steps"), ((1, 10.0, 0.5), "total_steps"),
        ((1, 10, 1.0), "final_sparsity"), ((1, 10, -0.1), "final_sparsity"),
        ((1, 10, 0.5, 0.8, 0.3), "warmup \\+ cooldown"), ((1, 10, 0.5, -0.1), "warmup"),
    ],
)
def test_cubic_schedule_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        spft.cubic_sparsity(*args)


# --- gradients ---------------------------------------------------------------------------------

# (n, k, leading dims of x, sparsity, bias, r1, r2)
CASES = [
    (1, 1, (1,), 0.0, True, 1, 1),
    (29, 41, (37,), 0.7, True, 3, 2),
    (17, 33, (2, 3), 0.5, False, 8, 8),
    (70, 20, (1,), 0.9, True, 0, 4),
    (40, 96, (70,), 0.3, False, 2, 0),
]


@pytest.mark.parametrize("abs_score_grad", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_hand_written_straight_through_autograd_fp64(case, abs_score_grad):
    n, k, lead, sparsity, bias, r1, r2 = case
    layer = make_layer(n, k, sparsity, bias=bias, r1=r1, r2=r2, abs_score_grad=abs_score_grad, seed=7)
    x = torch.randn(*lead, k, dtype=torch.float64)
    dy = torch.randn(*lead, n, dtype=torch.float64)
    y, dx, grads = run_layer(layer, x, dy)
    y_ref, dx_ref, grads_ref, mask_ref = dense_pst(layer, x, dy, torch.float64)
    assert torch.equal(layer.mask(), mask_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    for name, grad, grad_ref in zip("UVABRC", grads, grads_ref):
        assert grad.dtype == torch.float64 and grad.shape == getattr(layer, name).shape
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_score_magnitude_term_changes_the_weight_gradient():
    # The two readings differ exactly by dS ⊙ sign(W_eff) pushed through βUV.
    grads = {}
    x, dy = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    for abs_score_grad in (True, False):
        layer = make_layer(9, 12, 0.5, abs_score_grad=abs_score_grad, seed=2)
        _, _, grads[abs_score_grad] = run_layer(layer, x, dy)
    assert not torch.allclose(grads[True][0], grads[False][0])
    for index in range(2, 6):  # A, B, R, C see dS only
        torch.testing.assert_close(grads[True][index], grads[False][index], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_gradient_of_a_trainable_w0(backend):
    # W0 is frozen in the layer; through the functional API it may require grad: dW0 = dW_eff.
    dtype = torch.float64 if backend == "reference" else torch.float32
    layer = make_layer(7, 9, 0.4, backend=backend, dtype=dtype, seed=12)
    x, dy = torch.randn(5, 9, dtype=dtype, device=DEVICE), torch.randn(5, 7, dtype=dtype, device=DEVICE)
    w0 = layer.weight.detach().clone().requires_grad_(True)
    factors = [p.detach() for p in layer.factors()]
    y = spft.pst_linear(x, w0, *factors, layer.bias, sparsity=0.4, beta=0.7, alpha1=1.3, alpha2=0.6, backend=backend)
    (dw,) = torch.autograd.grad(y, [w0], dy)
    w0_ref = w0.detach().cpu().double().requires_grad_(True)
    U, V, A, B, R, C = (f.cpu().double() for f in factors)
    w = w0_ref + 0.7 * U @ V
    score = w.abs() + 1.3 * A @ B + 0.6 * (R + C)
    masked = w * _StraightThrough.apply(score, top_v_mask(score.detach(), layer.kept))
    y_ref = F.linear(x.cpu().double(), masked, layer.bias.detach().cpu().double())
    (dw_ref,) = torch.autograd.grad(y_ref, [w0_ref], dy.cpu().double())
    torch.testing.assert_close(dw.cpu().double(), dw_ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES + [(9, 13, (1100,), 0.6, True, 2, 3)])
def test_triton_fused_path_matches_the_fp64_oracle(case, dtype):
    n, k, lead, sparsity, bias, r1, r2 = case
    layer = make_layer(n, k, sparsity, backend="triton", dtype=dtype, bias=bias, r1=r1, r2=r2, seed=11)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(*lead, k, generator=generator).to(dtype).to(DEVICE)
    dy = torch.randn(*lead, n, generator=generator).to(dtype).to(DEVICE)
    y, dx, grads = run_layer(layer, x, dy)
    mask = layer.mask()
    assert int(mask.sum()) == layer.kept
    reference_mask = make_layer(n, k, sparsity, dtype=dtype, bias=bias, r1=r1, r2=r2, seed=11).mask()
    assert torch.equal(mask.cpu(), reference_mask)
    y_ref, dx_ref, grads_ref, _ = dense_pst(layer, x, dy, torch.float64, mask=mask)
    y_plain, dx_plain, grads_plain, _ = dense_pst(layer, x, dy, dtype, mask=mask)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == (*lead, n)
    assert_within_budget("y", y.cpu(), y_plain, y_ref, dtype)
    assert_within_budget("dx", dx.cpu(), dx_plain, dx_ref, dtype)
    for name, grad, plain, reference in zip("UVABRC", grads, grads_plain, grads_ref):
        assert grad.dtype == torch.float32
        assert_within_budget(f"d{name}", grad.cpu(), plain, reference, dtype)


@needs_triton
def test_triton_gradients_are_bitwise_reproducible():
    runs = []
    for _ in range(2):
        layer = make_layer(21, 34, 0.6, backend="triton", dtype=torch.float32, seed=4)
        runs.append(run_layer(layer, torch.ones(600, 34, device=DEVICE) * 0.1, torch.ones(600, 21, device=DEVICE)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


@needs_triton
def test_fused_training_step_allocates_no_n_by_k_tensor():
    n, k = 64, 48
    layer = make_layer(n, k, 0.8, backend="triton", dtype=torch.float16, r1=8, r2=8)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(3, 5, k, dtype=torch.float16, device=DEVICE, requires_grad=True)
    with TensorMemoryTracker() as tracker:
        for _ in range(2):  # threshold pass, forward, backward, step, and again with new factors
            optimizer.zero_grad()
            layer(x).float().square().mean().backward()
            optimizer.step()
    assert tracker.largest_numel < n * k, (tracker.largest_shape, tracker.largest_op)
    with TensorMemoryTracker() as threshold_tracker:
        layer.threshold()  # the factors changed in the last step: a fresh threshold
    print(f"\nPST threshold ({n}x{k}, triton): largest allocation {threshold_tracker.largest_numel} values, "
          f"peak {threshold_tracker.peak_bytes} bytes")
    assert threshold_tracker.largest_numel <= max(4 * 256, n)
    # the detector does see an n x k tensor (the export's)
    with TensorMemoryTracker() as tracker:
        layer.masked_weight()
    assert tracker.largest_numel >= n * k


def test_threshold_is_computed_once_per_change(monkeypatch):
    calls = []
    real = pst.pst_threshold
    monkeypatch.setattr(pst_layer, "pst_threshold", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = make_layer(12, 10, 0.5, dtype=torch.float32)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 10)
    for _ in range(3):  # gradient accumulation: one threshold
        layer(x).sum().backward()
    assert len(calls) == 1
    optimizer.step()
    layer(x)
    assert len(calls) == 2
    layer.set_sparsity(0.25)
    layer(x)
    layer(x)
    assert len(calls) == 3 and int(layer.mask().sum()) == layer.kept == 90
    with torch.no_grad():
        layer.R.add_(1.0)
    layer(x)
    assert len(calls) == 4


def _fresh_threshold(layer):
    return spft.pst_threshold(layer.weight, *layer.factors(), layer.sparsity, beta=layer.beta,
                              alpha1=layer.alpha1, alpha2=layer.alpha2, backend=layer.backend)


def test_fused_optimizer_steps_refresh_the_threshold():
    # Fused AdamW (the Trainer's default) does not bump the factors' version counters: the
    # threshold must still follow every step, or the mask stays the one of step 0.
    layer = make_layer(12, 10, 0.5, dtype=torch.float32)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(4, 10)
    for _ in range(3):
        layer(x).square().sum().backward()
        versions = [p._version for p in layer.factors()]
        optimizer.step()
        optimizer.zero_grad()
        assert [p._version for p in layer.factors()] == versions  # the step is invisible to them
        assert torch.equal(layer.threshold(), _fresh_threshold(layer))
    assert int(layer.mask().sum()) == layer.kept


def test_evaluation_under_inference_mode_between_steps_keeps_training():
    layer = make_layer(12, 10, 0.5, dtype=torch.float32)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 10)
    for _ in range(2):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.inference_mode():  # evaluation right after a step: the threshold is made here
            layer(x)
        assert not layer.threshold().is_inference()
        with torch.no_grad():
            layer(x)
    layer(x).square().sum().backward()  # would fail saving an inference tensor for backward
    assert all(p.grad is not None for p in layer.factors())


# --- training, export, state ---------------------------------------------------------------------


def test_short_training_run_reaches_the_target_sparsity():
    # Teacher-student regression: the teacher is 80% sparse; the student starts from a dense
    # "pre-trained" weight (teacher + noise) and is pruned to 80% by the cubic schedule.
    generator = torch.Generator().manual_seed(0)
    n, k, target, steps = 24, 32, 0.8, 300
    teacher = torch.randn(n, k, generator=generator) * (torch.rand(n, k, generator=generator) < 0.2)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(teacher + 0.3 * torch.randn(n, k, generator=generator))
    x = torch.randn(512, k, generator=generator)
    target_y = x @ teacher.t()
    w0 = linear.weight.detach().clone()
    magnitude_loss = F.mse_loss(x @ (w0 * top_v_mask(w0.abs(), round((1 - target) * n * k))).t(), target_y).item()
    for abs_score_grad in (True, False):
        layer = spft.PSTLinear.from_linear(linear, 0.0, abs_score_grad=abs_score_grad,
                                           generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=5e-3)
        losses = []
        for step in range(steps):
            layer.set_sparsity(spft.cubic_sparsity(step, steps, target))
            loss = F.mse_loss(layer(x), target_y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        exported, report = layer.to_linear(return_report=True)
        export_loss = F.mse_loss(exported(x), target_y).item()
        print(
            f"\nPST teacher-student {n}x{k}, {steps} steps, abs_score_grad={abs_score_grad}: loss {losses[0]:.4f} -> "
            f"{losses[-1]:.4f} (exported {export_loss:.4f}; magnitude-pruned W0 {magnitude_loss:.4f}); sparsity "
            f"{report['mask_sparsity']:.4f} (target {target}, kept {report['kept']} of {report['numel']})"
        )
        assert layer.sparsity == target and report["kept"] == round((1 - target) * n * k) == 154
        assert report["nonzero"] == report["kept"]
        assert export_loss < 0.35 * losses[0] and export_loss < 0.6 * magnitude_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_linear_exports_the_pruned_weight(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    layer = make_layer(19, 23, 0.6, backend=backend, dtype=dtype, seed=8)
    linear, report = layer.to_linear(return_report=True)
    assert type(linear) is torch.nn.Linear and linear.weight.dtype == dtype
    assert torch.equal(linear.weight, layer.masked_weight()) and torch.equal(linear.bias, layer.bias)
    assert report["kept"] == layer.kept == int((linear.weight != 0).sum()) == report["nonzero"]
    assert report["mask_sparsity"] == 1 - layer.kept / (19 * 23) and report["target_sparsity"] == 0.6
    assert report == layer.sparsity_report()
    x = torch.randn(5, 23, dtype=dtype, device=DEVICE)
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        linear.weight.zero_()
    assert int((layer.masked_weight() != 0).sum()) == layer.kept


def test_report_counts_kept_zeros_apart():
    weight = torch.ones(4, 5, dtype=torch.float16)
    weight[0, :3] = 0
    layer = make_layer(4, 5, 0.0, dtype=torch.float16, random_factors=False, weight=weight)
    report = layer.sparsity_report()
    assert report["kept"] == 20 and report["mask_sparsity"] == 0.0
    assert report["nonzero"] == 17 and report["weight_sparsity"] == pytest.approx(0.15)


def test_state_dict_round_trip():
    layer = make_layer(14, 9, 0.6, seed=9)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "U", "V", "A", "B", "R", "C", "_extra_state"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = spft.PSTLinear(9, 14, sparsity=0.1, r1=3, r2=2, dtype=torch.float64)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.sparsity == 0.6 and (other.beta, other.alpha1, other.alpha2) == (0.7, 1.3, 0.6)
    assert torch.equal(other.mask(), layer.mask())
    x = torch.randn(3, 9, dtype=torch.float64)
    assert torch.equal(other(x), layer(x))


def test_dtype_casts_keep_fp32_masters():
    layer = make_layer(8, 6, 0.5, dtype=torch.float32)
    before = [p.detach().clone() for p in layer.factors()]
    layer.half()
    assert layer.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(layer.factors(), before))
    assert layer(torch.randn(2, 6, dtype=torch.float16)).dtype == torch.float16


def test_bf16_autocast_reads_w0_as_stored():
    layer = make_layer(10, 12, 0.5, dtype=torch.float32, seed=10)
    x = torch.randn(6, 12)
    expected = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.U.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


def test_repr():
    text = repr(make_layer(8, 6, 0.25))
    assert "r1=3" in text and "r2=2" in text and "sparsity=0.25" in text


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    layer = make_layer(11, 7, 0.5, dtype=torch.float32, seed=6)
    factors = tuple(p.detach().clone().requires_grad_(requires_grad) for p in layer.factors())
    x = torch.randn(2, 3, 7, requires_grad=requires_grad)
    threshold = layer.threshold()
    torch.library.opcheck(
        torch.ops.spft.pst_linear.default,
        (x, layer.weight, *factors, layer.bias, threshold, 0.7, 1.3, 0.6, True, "reference"),
    )
    plain = tuple(p.detach() for p in factors)
    torch.library.opcheck(torch.ops.spft.pst_threshold.default, (layer.weight, *plain, 0.7, 1.3, 0.6, 38, "reference"))
    torch.library.opcheck(torch.ops.spft.pst_dense.default, (layer.weight, *plain, threshold, 0.7, 1.3, 0.6, "reference"))


class TestBadInput:
    def setup_method(self):
        self.layer = make_layer(6, 5, 0.5)
        self.x = torch.randn(3, 5, dtype=torch.float64)

    def call(self, **overrides):
        layer = self.layer
        args = dict(x=self.x, weight=layer.weight, U=layer.U, V=layer.V, A=layer.A, B=layer.B, R=layer.R, C=layer.C,
                    bias=layer.bias, sparsity=0.5)
        args.update(overrides)
        return spft.pst_linear(**args)

    @pytest.mark.parametrize("sparsity", [1.0, -0.1, True, "0.5", float("nan")])
    def test_sparsity(self, sparsity):
        with pytest.raises(ValueError, match="sparsity"):
            self.layer.set_sparsity(sparsity)
        with pytest.raises(ValueError, match="sparsity"):
            spft.PSTLinear.from_linear(torch.nn.Linear(3, 2), sparsity)

    def test_ranks(self):
        with pytest.raises(ValueError, match="r1 must be an integer >= 0"):
            spft.PSTLinear.from_linear(torch.nn.Linear(3, 2), 0.5, r1=-1)
        with pytest.raises(ValueError, match="r2 must be an integer >= 0"):
            spft.PSTLinear(3, 2, r2=2.5)

    def test_not_a_linear(self):
        with pytest.raises(TypeError, match="nn.Linear"):
            spft.PSTLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 0.5)

    def test_factor_shapes(self):
        with pytest.raises(ValueError, match="V has shape \\(2, 4\\)"):
            self.call(V=torch.zeros(2, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="R has shape"):
            self.call(R=torch.zeros(6, dtype=torch.float64))

    def test_x_width_and_dtype(self):
        with pytest.raises(ValueError, match="x must be a tensor of shape \\[\\.\\.\\., 5\\]"):
            self.call(x=torch.randn(3, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="must share a dtype"):
            self.call(x=self.x.float())

    def test_sparsity_or_threshold(self):
        with pytest.raises(ValueError, match="exactly one of sparsity and threshold"):
            self.call(sparsity=None)
        with pytest.raises(ValueError, match="exactly one of sparsity and threshold"):
            self.call(threshold=self.layer.threshold())
        with pytest.raises(ValueError, match="int64 \\[2\\]"):
            self.call(sparsity=None, threshold=torch.zeros(2))

    def test_scalars(self):
        with pytest.raises(ValueError, match="beta must be a finite number"):
            self.call(beta=float("inf"))

    @needs_triton
    def test_triton_rejects_fp64(self):
        with pytest.raises(ValueError, match="backend='reference' for fp64"):
            self.call(backend="triton")
