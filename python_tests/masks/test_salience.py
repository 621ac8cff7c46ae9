import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import spft_kernels as spft
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.masks.targets import find_target_linears

from tiny_models import convert, hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("bert", "llama", "opt")
FIRST_ORDER = {
    "magnitude": lambda g, w: w.abs(),
    "gradient": lambda g, w: g.abs(),
    "snip": lambda g, w: (g * w).abs(),
    "force": lambda g, w: -g * w,
    "taylor_fo": lambda g, w: (g * w) ** 2,
}


def target_weights(model):
    return {name: module.weight for name, module in find_target_linears(model).items()}


def mean_gradient(model, batches, loss_fn, weights):
    """Direct autograd: g = mean over batches of dℓ/dθ (fp64 when the model is)."""
    names = list(weights)
    total = {name: torch.zeros_like(weights[name]) for name in names}
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), [weights[n] for n in names])
        for name, grad in zip(names, grads):
            total[name] += grad
    return {name: total[name] / len(batches) for name in names}


def assert_scores_close(ours, reference, rtol=1e-5):
    assert list(ours) == list(reference)
    for name, ref in reference.items():
        assert ours[name].dtype == torch.float32 and ours[name].shape == ref.shape, name
        scale = float(ref.abs().max())
        torch.testing.assert_close(ours[name].double(), ref.double(), rtol=rtol, atol=1e-6 * scale, msg=name)


def snapshot(model):
    """Everything scoring must leave as it was: values (bitwise: the state dict and the parameters as
    they are, W_eff of merged layers included), requires_grad flags, .grad objects."""
    return (
        {**{k: v.detach().clone() for k, v in model.state_dict().items()},
         **{"raw " + n: p.detach().clone() for n, p in model.named_parameters()}},
        {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    values, flags = before
    after_values, after_flags = snapshot(model)
    assert values.keys() == after_values.keys()
    for key, value in values.items():
        assert torch.equal(value, after_values[key]), key
    for name, (flag, grad) in flags.items():
        assert after_flags[name][0] == flag, name
        assert after_flags[name][1] is grad, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", list(FIRST_ORDER))
def test_first_order_metrics_equal_direct_autograd(kind, metric):
    model = tiny_model(kind)
    batches = tiny_batches(kind)
    before = snapshot(model)
    ours = spft.salience_scores(model, batches, hf_loss, metric)
    assert_unchanged(model, before)
    weights = target_weights(model)
    g = mean_gradient(model, batches, hf_loss, weights)
    reference = {name: FIRST_ORDER[metric](g[name], w.detach()) for name, w in weights.items()}
    assert_scores_close(ours, reference)


def per_example_fisher(model, batches, weights):
    names = list(weights)
    total = {name: torch.zeros_like(weights[name]) for name in names}
    count = 0
    for batch in batches:
        for e in range(batch["input_ids"].shape[0]):
            example = {k: v[e : e + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(hf_loss(model, example), [weights[n] for n in names])
            for name, grad in zip(names, grads):
                total[name] += grad**2
            count += 1
    return {name: total[name] / count for name in names}


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_equals_a_loop_over_single_examples(kind, recwarn):
    model = tiny_model(kind)
    batches = tiny_batches(kind, count=2)
    before = snapshot(model)
    ours = spft.salience_scores(model, batches, hf_loss, "fisher")
    assert_unchanged(model, before)
    fallback = [w for w in recwarn if "vmap cannot trace" in str(w.message)]
    # BERT's mask code calls .item(), which vmap cannot trace: the loop takes over, with a warning.
    assert bool(fallback) == (kind == "bert")
    reference = per_example_fisher(model, batches, target_weights(model))
    assert_scores_close(ours, reference)
    if kind == "llama":
        assert_scores_close(spft.salience_scores(model, batches, hf_loss, "fisher", fisher_mode="loop"), reference)
        chunked = spft.salience_scores(model, batches, hf_loss, "fisher", fisher_mode="vmap", fisher_chunk_size=3)
        assert_scores_close(chunked, reference)


def test_fisher_accepts_tuple_batches_and_rejects_unsplittable_ones():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.randint(0, 2, (5,), generator=generator))]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    ours = spft.salience_scores(model, batches, loss_fn, "fisher", target_modules=["0", "2"], fisher_mode="vmap")
    weights = {"0": model[0].weight, "2": model[2].weight}
    reference = {n: torch.zeros_like(w) for n, w in weights.items()}
    for e in range(5):
        grads = torch.autograd.grad(loss_fn(model, (batches[0][0][e : e + 1], batches[0][1][e : e + 1])), list(weights.values()))
        for name, grad in zip(weights, grads):
            reference[name] += grad**2 / 5
    assert_scores_close(ours, reference)
    with pytest.raises(ValueError, match="leading dimensions"):
        spft.salience_scores(model, [(torch.ones(5, 3), torch.ones(4))], loss_fn, "fisher", target_modules=["0"])
    with pytest.raises(ValueError, match="no batched tensor"):
        spft.salience_scores(model, [{"x": 3}], loss_fn, "fisher", target_modules=["0"])


def test_grasp_equals_an_explicit_hessian_on_a_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # 26 parameters
    assert sum(p.numel() for p in model.parameters()) <= 60
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.randint(0, 2, (5,), generator=generator))
        for _ in range(3)
    ]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    before = snapshot(model)
    ours = spft.salience_scores(model, batches, loss_fn, "grasp", target_modules=["0", "2"])
    assert_unchanged(model, before)

    theta = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])

    def mean_loss(flat):
        params = {"0.weight": flat[:12].view(4, 3), "2.weight": flat[12:].view(2, 4)}
        return sum(loss_fn(lambda x: torch.func.functional_call(model, params, (x,)), b) for b in batches) / len(batches)

    hessian = torch.autograd.functional.hessian(mean_loss, theta)  # 20 x 20, the target weights
    g = torch.autograd.functional.jacobian(mean_loss, theta)
    reference = (hessian @ g) * theta
    assert_scores_close(ours, {"0": reference[:12].view(4, 3), "2": reference[12:].view(2, 4)})


def test_grasp_on_a_transformer_with_fused_attention():
    # The default SDPA kernels are not twice differentiable; scoring switches to the math backend.
    model = tiny_model("llama")
    batches = tiny_batches("llama", count=2)
    ours = spft.salience_scores(model, batches, hf_loss, "grasp")
    weights = target_weights(model)
    g = mean_gradient(model, batches, hf_loss, weights)
    hvp = {name: torch.zeros_like(w) for name, w in weights.items()}
    with sdpa_kernel([SDPBackend.MATH]):
        for batch in batches:
            grads = torch.autograd.grad(hf_loss(model, batch), list(weights.values()), create_graph=True)
            inner = sum((grad * g[name]).sum() for name, grad in zip(weights, grads))
            for name, h in zip(weights, torch.autograd.grad(inner, list(weights.values()))):
                hvp[name] += h / len(batches)
    assert_scores_close(ours, {name: hvp[name] * w.detach() for name, w in weights.items()}, rtol=1e-4)


def standard_synflow(model, shape_in):
    """Tanaka et al.'s recipe: |θ| in place (on a copy), fp64, all-ones input, R = Σ output."""
    linear = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in linear.parameters():
            p.abs_()
    out = linear(torch.ones(1, shape_in, dtype=torch.float64)).sum()
    weights = [m.weight for m in linear if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(out, weights)
    return out.detach(), [(g * w).abs().detach() for g, w in zip(grads, weights)]


def test_synflow_is_standard_synflow_on_an_mlp_scaled_by_r():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)
    )
    before = snapshot(model)
    ours = spft.salience_scores(model, metric="synflow", target_modules=["0", "2", "4"])
    assert_unchanged(model, before)
    r, reference = standard_synflow(model, 5)
    assert_scores_close({n: s * float(r) for n, s in ours.items()}, dict(zip(["0", "2", "4"], reference)))
    for score in ours.values():  # SynFlow's conservation: every layer carries all of R
        assert float(score.double().sum()) == pytest.approx(1.0, rel=1e-5)


def test_synflow_spreads_the_flow_uniformly_between_layers_that_do_not_chain():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(5, 2)})
    ours = spft.salience_scores(model, metric="synflow", target_modules=["a", "b"])
    wa = model["a"].weight.detach().double().requires_grad_(True)
    wb = model["b"].weight.detach().double().requires_grad_(True)
    # R = 1ᵀ |Wb| J |Wa| 1 with J the all-ones 5 x 3 connector (biases are not part of R).
    r = torch.ones(2, dtype=torch.float64) @ wb.abs() @ torch.ones(5, 3, dtype=torch.float64) @ wa.abs() @ torch.ones(4, dtype=torch.float64)
    ga, gb = torch.autograd.grad(r, [wa, wb])
    reference = {"a": (ga * wa).abs().detach() / r.detach(), "b": (gb * wb).abs().detach() / r.detach()}
    assert_scores_close(ours, reference)


def test_synflow_does_not_overflow_on_a_deep_model():
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16, bias=False) for _ in range(150)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(30)  # R ≈ 384**150 ≈ 1e388: beyond fp64, let alone fp32
    model = nn.Sequential(*layers)
    ours = spft.salience_scores(model, metric="synflow", target_modules=r"\d+")
    for score in ours.values():
        assert bool(torch.isfinite(score).all()) and float(score.min()) >= 0
        assert float(score.double().sum()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_synflow_on_transformers_is_finite_and_leaves_the_model_bitwise_unchanged(kind):
    model = tiny_model(kind, dtype=torch.float32)
    before = snapshot(model)
    scores = spft.salience_scores(model, metric="synflow")
    assert_unchanged(model, before)
    assert list(scores) == list(find_target_linears(model))
    for score in scores.values():
        assert bool(torch.isfinite(score).all()) and float(score.min()) >= 0
        assert float(score.double().sum()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_converted_models_are_scored_at_w0_plus_delta_and_restored(mode):
    model = tiny_model("llama")
    indices = spft.random_indices(model, 0.2, generator=torch.Generator().manual_seed(0))
    convert(model, indices, mode=mode)
    with torch.no_grad():
        for name in indices:
            model.get_submodule(name).delta.normal_(0, 0.05)
    model(input_ids=torch.zeros(1, 3, dtype=torch.long))  # the merged mode merges on its first forward
    plain = tiny_model("llama")
    with torch.no_grad():
        for name in indices:
            plain.get_submodule(name).weight.copy_(model.get_submodule(name).merged_weight())
    batches = tiny_batches("llama", count=2)
    merged_flags = {name: model.get_submodule(name).merged for name in indices}
    for metric in ("magnitude", "gradient", "fisher", "grasp", "synflow"):
        before = snapshot(model)
        ours = spft.salience_scores(model, batches, hf_loss, metric)
        assert_unchanged(model, before)
        assert merged_flags == {name: model.get_submodule(name).merged for name in indices}
        assert all(type(model.get_submodule(name)).forward is spft.SparseDeltaLinear.forward for name in indices)
        assert_scores_close(ours, spft.salience_scores(plain, batches, hf_loss, metric), rtol=1e-4)


def test_flags_and_existing_gradients_are_restored():
    model = tiny_model("opt")
    model.model.decoder.embed_tokens.weight.requires_grad_(False)
    name = next(iter(find_target_linears(model)))
    stale = torch.ones_like(model.get_submodule(name).weight)
    model.get_submodule(name).weight.grad = stale
    before = snapshot(model)
    spft.salience_scores(model, tiny_batches("opt"), hf_loss, "snip")
    assert_unchanged(model, before)
    assert model.get_submodule(name).weight.grad is stale


def test_num_batches_progress_bar_and_random_determinism(capsys):
    model = tiny_model("llama")
    batches = tiny_batches("llama", count=3)
    capped = spft.salience_scores(model, batches, hf_loss, num_batches=2, progress=True)
    assert "salience (gradient)" in capsys.readouterr().err
    assert_scores_close(capped, spft.salience_scores(model, batches[:2], hf_loss, progress=False))
    spft.salience_scores(model, iter(batches), hf_loss)  # a one-shot iterator is fine for one pass
    assert capsys.readouterr().err == ""  # no bar when stderr is not a terminal
    first = spft.salience_scores(model, metric="random", generator=torch.Generator().manual_seed(3))
    again = spft.salience_scores(model, metric="random", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_salience_validation():
    model = tiny_model("llama")
    batches = tiny_batches("llama", count=1)
    with pytest.raises(ValueError, match="unknown metric 'hessian'"):
        spft.salience_scores(model, batches, hf_loss, "hessian")
    with pytest.raises(ValueError, match="needs calibration batches"):
        spft.salience_scores(model, None, hf_loss, "gradient")
    with pytest.raises(ValueError, match="needs loss_fn"):
        spft.salience_scores(model, batches, None, "snip")
    with pytest.raises(ValueError, match="got no batches"):
        spft.salience_scores(model, [], hf_loss, "gradient")
    with pytest.raises(ValueError, match="got no batches"):
        spft.salience_scores(model, [], hf_loss, "fisher")
    with pytest.raises(ValueError, match="reads the batches twice"):
        spft.salience_scores(model, iter(batches), hf_loss, "grasp")
    with pytest.raises(ValueError, match="scalar loss"):
        spft.salience_scores(model, batches, lambda m, b: m(**b).logits, "gradient")
    with pytest.raises(ValueError, match="does not depend on the target weights"):
        spft.salience_scores(model, batches, lambda m, b: hf_loss(m, b).detach(), "gradient")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches"):
            spft.salience_scores(model, batches, hf_loss, num_batches=bad)
    with pytest.raises(ValueError, match="unknown fisher_mode"):
        spft.salience_scores(model, batches, hf_loss, "fisher", fisher_mode="jit")
    with pytest.raises(ValueError, match="no linear layer matches"):
        spft.salience_scores(model, batches, hf_loss, target_modules=["nope"])
    assert_unchanged(model, snapshot(model))


def test_hooks_keep_one_layer_gradient_alive_not_the_whole_model():
    """The peak of the hook-based calibration is the model + the scores + one forward/backward
    (activations and one layer's transient gradient); the naive loop that lets every target's
    .grad accumulate also holds all target gradients at once."""
    model = tiny_model(
        "llama", dtype=torch.float32, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    batches = tiny_batches("llama", count=2, batch=2, tokens=8)
    params = list(model.parameters())
    weights = target_weights(model)
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    score_bytes = sum(w.numel() * 4 for w in weights.values())  # fp32 scores = the target gradients
    largest_grad = max(w.numel() * w.element_size() for w in weights.values())

    with TensorMemoryTracker(baseline=params) as hooked:
        spft.salience_scores(model, batches, hf_loss, "gradient")

    # Activations of one forward/backward (each gradient freed on arrival, no score buffers).
    for p in params:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    handles = [w.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for w in weights.values()]
    with TensorMemoryTracker() as one_pass:
        hf_loss(model, batches[0]).backward()
    for handle in handles:
        handle.remove()

    with TensorMemoryTracker(baseline=params) as naive:
        for batch in batches:
            hf_loss(model, batch).backward()
        naive_scores = {name: w.grad.div(len(batches)).abs_() for name, w in weights.items()}
    del naive_scores
    for w in weights.values():
        w.grad = None

    print(
        f"model {model_bytes} B, scores {score_bytes} B, one forward/backward {one_pass.peak_bytes} B; "
        f"peak above the model: hooks {hooked.peak_bytes - model_bytes} B, naive {naive.peak_bytes - model_bytes} B"
    )
    assert hooked.peak_bytes <= model_bytes + score_bytes + largest_grad + one_pass.peak_bytes
    assert naive.peak_bytes >= model_bytes + 2 * score_bytes  # all target gradients + the scores
    assert hooked.peak_bytes < naive.peak_bytes


def test_scores_kept_off_the_device_leave_one_layer_gradient_there():
    """score_device moves the score buffers off the device the model trains on. The CPU is the
    only device here, so "meta" stands in for host memory: the tracker counts what stays on the
    CPU (the model's device), and the scores are not there."""
    model = tiny_model(
        "llama", dtype=torch.float32, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    batches = tiny_batches("llama", count=2, batch=2, tokens=8)
    params = list(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    score_bytes = sum(w.numel() * 4 for w in target_weights(model).values())
    with TensorMemoryTracker(baseline=params) as on_device:
        spft.salience_scores(model, batches, hf_loss, "gradient")
    with TensorMemoryTracker(baseline=params) as off_device:
        scores = spft.salience_scores(model, batches, hf_loss, "snip", score_device="meta")
    assert all(score.device.type == "meta" for score in scores.values())
    print(f"\nabove the model: scores on the device {on_device.peak_bytes - model_bytes} B, "
          f"off it {off_device.peak_bytes - model_bytes} B (scores {score_bytes} B)")
    assert off_device.peak_bytes <= on_device.peak_bytes - score_bytes


@pytest.mark.parametrize("metric", ["gradient", "taylor_fo", "fisher"])
def test_scores_in_bf16_rank_like_fp32(metric):
    model = tiny_model("llama", dtype=torch.float32)
    batches = tiny_batches("llama")
    exact = spft.salience_scores(model, batches, hf_loss, metric, fisher_mode="loop")
    low = spft.salience_scores(model, batches, hf_loss, metric, fisher_mode="loop", score_dtype=torch.bfloat16,
                               score_device="cpu")
    for name, score in exact.items():
        assert low[name].dtype == torch.bfloat16
        # One bf16 rounding per batch (3 here): about 2**-8 of the largest batch gradient, absolute.
        torch.testing.assert_close(low[name].float(), score, rtol=2e-2, atol=1e-2 * float(score.abs().max()))
    with pytest.raises(ValueError, match="score_dtype must be a floating-point"):
        spft.salience_scores(model, batches, hf_loss, metric, score_dtype=torch.int8)
