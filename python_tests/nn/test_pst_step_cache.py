"""PSTLinear's step cache (nn/pst_linear.py ``_step_state``): the threshold, the kept mask and
the checks of the layer's own tensors are made once per change of the sparsity, the options or a
tensor, and reused by every forward in between. After each kind of change between two forwards
(optimizer steps of every kind, in-place writes to a factor or to W0, load_state_dict, dtype
casts, a W0 made under inference mode) the layer computes bitwise what an uncached call
(``pst_linear`` with the sparsity: a fresh threshold, the mask made in the step) computes, and
the change is large enough to move the mask, so a stale cache would give another result. Bad
input still fails with a clear error before anything is computed."""

import pytest
import torch

import spft_kernels as spft
from spft_kernels.nn import pst_linear as pst_layer
from spft_kernels.ops import pst_linear as pst


def make_layer(seed=0, dtype=torch.float32, n=12, k=10):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, dtype=dtype)
    layer = spft.PSTLinear.from_linear(linear, 0.5, r1=3, r2=2, beta=0.7, alpha1=1.3, alpha2=0.6,
                                       backend="reference", generator=generator)
    with torch.no_grad():
        for factor in layer.factors():
            factor.copy_(torch.randn(factor.shape, generator=generator) * 0.5)
    return layer


def uncached_step(layer, x, dy):
    """(y, dx, dU, ..., dC) by the functional op on detached copies: no cache of any kind."""
    x = x.detach().clone().requires_grad_(True)
    factors = [p.detach().clone().requires_grad_(True) for p in layer.factors()]
    y = spft.pst_linear(x, layer.weight.detach(), *factors, layer.bias.detach(), sparsity=layer.sparsity,
                        beta=layer.beta, alpha1=layer.alpha1, alpha2=layer.alpha2,
                        abs_score_grad=layer.abs_score_grad, backend=layer.backend)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in factors]


def layer_step(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.factors():
        p.grad = None
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.factors()]


def fresh_mask(layer):
    """M from a threshold made now (not the layer's cached one)."""
    factors = [p.detach() for p in layer.factors()]
    threshold = spft.pst_threshold(layer.weight, *factors, layer.sparsity, beta=layer.beta, alpha1=layer.alpha1,
                                   alpha2=layer.alpha2, backend=layer.backend)
    return pst._pst_dense_op(layer.weight, *factors, threshold, layer.beta, layer.alpha1, layer.alpha2,
                             layer.backend)[1]


def assert_follows(layer, change):
    """A step, ``change(layer)``, a step: the second step is bitwise the uncached one, and the
    change moved the mask (so the cache made before it would have been wrong)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, layer.in_features, generator=generator)
    dy = torch.randn(2, 3, layer.out_features, generator=generator)
    layer_step(layer, x.to(layer.weight.dtype), dy.to(layer.weight.dtype))  # fills the cache
    before = fresh_mask(layer)
    change(layer)
    x, dy = x.to(layer.weight.dtype), dy.to(layer.weight.dtype)
    assert not torch.equal(fresh_mask(layer), before), "the change must move the mask for this test to mean anything"
    for name, got, expected in zip(["y", "x", *"UVABRC"], layer_step(layer, x, dy), uncached_step(layer, x, dy)):
        assert torch.equal(got, expected), name
    assert torch.equal(layer.mask(), fresh_mask(layer))


def optimizer_step(make_optimizer):
    def change(layer):
        optimizer = make_optimizer([p for p in layer.parameters() if p.requires_grad])
        for p in layer.factors():  # a gradient that moves every factor (the last step's, doubled)
            p.grad = p.grad * 2.0
        optimizer.step()

    return change


def in_place(write):
    def change(layer):
        with torch.no_grad():
            write(layer)

    return change


def load_other(sparsity=None):
    def change(layer):
        other = make_layer(seed=7)
        if sparsity is not None:
            other.set_sparsity(sparsity)
        layer.load_state_dict(other.state_dict())

    return change


CHANGES = {
    "sgd foreach": optimizer_step(lambda params: torch.optim.SGD(params, lr=1.0, foreach=True)),
    "sgd for-loop": optimizer_step(lambda params: torch.optim.SGD(params, lr=1.0, foreach=False)),
    # fused optimizers do not bump the version counters: the step count keys the cache
    "adamw fused": optimizer_step(lambda params: torch.optim.AdamW(params, lr=0.5, fused=True)),
    "factor written in place": in_place(lambda layer: layer.A.mul_(-3.0)),
    "factor row written in place": in_place(lambda layer: layer.R[:6].add_(5.0)),
    "w0 written in place": in_place(lambda layer: layer.weight.mul_(torch.linspace(-2, 2, layer.in_features))),
    "load_state_dict": load_other(),
    "load_state_dict with another sparsity": load_other(sparsity=0.8),
    "set_sparsity": lambda layer: layer.set_sparsity(0.25),
}


@pytest.mark.parametrize("kept_mask", [True, False], ids=["mask kept", "mask made in the step"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_two_forwards_is_seen(monkeypatch, change, kept_mask):
    if not kept_mask:
        monkeypatch.setattr(pst_layer, "KEEP_MASK_ENTRIES", 0)
    layer = make_layer()
    assert_follows(layer, CHANGES[change])
    assert (layer._step_cache.mask is not None) == kept_mask


def test_a_cast_to_float64_remakes_the_cache():
    # fp64 scores have int64 order keys where fp32 ones have int32: a threshold kept from fp32
    # would cut the fp64 scores at another place. A cast copies the factors (the same values),
    # so the mask is moved here by a factor written after the cast.
    layer = make_layer()
    negate_b = in_place(lambda cast: cast.B.mul_(-2.0))
    assert_follows(layer, lambda layer: (layer.to(torch.float64), negate_b(layer)))
    assert layer._step_cache.mask.dtype == torch.float64 and layer._step_cache.threshold.dtype == torch.int64


def test_a_cast_alone_gives_what_an_uncached_layer_does():
    layer = make_layer()
    x = torch.randn(5, 10)
    layer(x)
    layer.to(torch.float64)
    x = x.double()
    assert torch.equal(layer(x), uncached_step(layer, x, torch.zeros(5, 12, dtype=torch.float64))[0])


def test_a_w0_made_under_inference_mode_is_read_each_time():
    # An inference tensor has no version counter: the cache cannot tell a write, so it is never reused.
    with torch.inference_mode():
        linear = torch.nn.Linear(10, 12)
    layer = spft.PSTLinear.from_linear(linear, 0.5, r1=3, r2=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for factor in layer.factors():
            factor.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randn(4, 10)
    with torch.inference_mode():
        layer(x)
        before = fresh_mask(layer)
        layer.weight.mul_(torch.linspace(-2, 2, 10))
        assert not torch.equal(fresh_mask(layer), before)
        y = layer(x)
        expected = spft.pst_linear(x, layer.weight, *layer.factors(), layer.bias, sparsity=0.5)
    assert torch.equal(y, expected)


def test_gradient_accumulation_and_evaluation_reuse_the_cache(monkeypatch):
    # Three micro-batches, a no_grad and an inference_mode evaluation: one threshold, one mask.
    layer = make_layer()
    made = []
    real = pst._pst_dense_op
    monkeypatch.setattr(pst_layer, "_pst_dense_op", lambda *a: made.append(1) or real(*a))
    x = torch.randn(4, 10)
    for _ in range(3):
        layer(x).sum().backward()
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    assert len(made) == 1
    cache = layer._step_cache
    layer(x)
    assert layer._step_cache is cache


class TestBadInputToTheLayer:
    """The lean forward checks x and the bias itself (the layer's own tensors were checked when
    the cache was made): the errors name the problem and come before anything is computed."""

    def test_x_width(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="x must be a tensor of shape \\[\\.\\.\\., 10\\]"):
            layer(torch.randn(3, 9))
        assert layer._step_cache is None  # nothing made for the bad call

    def test_x_dtype(self):
        layer = make_layer()
        layer(torch.randn(3, 10))
        with pytest.raises(ValueError, match="must share a dtype"):
            layer(torch.randn(3, 10, dtype=torch.float64))

    def test_x_device(self):
        layer = make_layer()
        with pytest.raises(ValueError, match="one device"):
            layer(torch.randn(3, 10, device="meta"))

    def test_bias_replaced_by_a_wrong_shape(self):
        layer = make_layer()
        layer(torch.randn(3, 10))
        layer.bias = torch.nn.Parameter(torch.zeros(5), requires_grad=False)
        with pytest.raises(ValueError, match="bias must have shape \\(12,\\)"):
            layer(torch.randn(3, 10))

    def test_factor_replaced_by_a_wrong_shape(self):
        # A new parameter has a new storage: the cache is made again, and its checks name the factor.
        layer = make_layer()
        layer(torch.randn(3, 10))
        layer.V = torch.nn.Parameter(torch.zeros(2, 9))
        with pytest.raises(ValueError, match="V has shape \\(2, 9\\)"):
            layer(torch.randn(3, 10))
