"""PST's reference backend by row blocks (ops/pst_reference.py): the radix-select threshold is the
pair a stable sort gives, and a training step allocates one n x k tensor (the forward's masked
weight) and no sort buffer."""

import pytest
import torch

import spft_kernels as spft
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.nn import pst_linear as pst_layer
from spft_kernels.ops import pst_reference as ref


def _factors(n, k, r1, r2, dtype, generator, ties=False):
    def draw(*shape):
        if ties:  # few distinct dyadic values: many equal scores at the threshold
            return (torch.randint(-3, 4, shape, generator=generator) / 4).to(dtype)
        return torch.randn(shape, generator=generator, dtype=dtype)

    return draw(n, k), draw(n, r2), draw(r2, k), draw(n, r1), draw(r1, k), draw(n, 1), draw(1, k)


def _sorted_threshold(weight, U, V, A, B, R, C, keep, acc):
    # The old reference: every block's score side by side, one stable descending sort.
    n, k = weight.shape
    scores = torch.cat([ref.block_weight_and_score(weight, U, V, A, B, R, C, 0.7, 1.3, 0.6, a, b, acc)[1]
                        for a, b in ref.row_blocks(n, k)])
    ordered, order = torch.sort(ref.order_keys(scores).view(-1), descending=True, stable=True)
    return [ordered[keep - 1].item(), order[keep - 1].item() + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n, k", [(37, 29), (1, 7), (130, 64)])
def test_radix_select_threshold_is_the_stable_sort_pair(dtype, ties, n, k):
    generator = torch.Generator().manual_seed(n * k)
    weight, U, V, A, B, R, C = _factors(n, k, 3, 2, dtype, generator, ties)
    R -= 1.5  # part of the scores negative
    for keep in sorted({1, 2, n * k // 3, n * k // 2, n * k - 1}):
        if 0 < keep < n * k:
            got = ref.threshold(weight, U, V, A, B, R, C, 0.7, 1.3, 0.6, keep)
            assert got.tolist() == _sorted_threshold(weight, U, V, A, B, R, C, keep, dtype)
            _, mask = ref.dense(weight, U, V, A, B, R, C, got, 0.7, 1.3, 0.6)
            assert int(mask.sum()) == keep


@pytest.mark.parametrize("chunk_rows", [60, 300])
def test_reference_training_step_temporaries_are_bounded_by_the_chunk(monkeypatch, chunk_rows):
    """Besides the forward's masked weight (n x k in x's dtype, the one n x k temporary of a step),
    every temporary fits a chunk of ``CHUNK_ENTRIES`` entries, and the step's transient peak is
    that masked weight plus a few chunk-sized buffers, whatever the weight's size."""
    n, k = 300, 260
    monkeypatch.setattr(ref, "CHUNK_ENTRIES", chunk_rows * k)
    monkeypatch.setattr(ref, "THRESHOLD_CHUNK_ENTRIES", 20 * k)  # ~44 bytes an entry of it, below the bound
    chunk = chunk_rows * k
    linear = torch.nn.Linear(k, n)
    layer = spft.PSTLinear.from_linear(linear, 0.7, r1=4, r2=4, backend="reference",
                                       generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3, fused=True)
    x = torch.randn(2, 9, k, requires_grad=True)
    baseline = [t for t in layer.state_dict().values()] + [x]
    with TensorMemoryTracker(baseline, record_at_least=chunk + 1) as tracker:
        for _ in range(2):  # threshold, forward, backward, step; again with new factors
            layer(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    if chunk_rows < n:  # chunked: only the masked weight is larger than a chunk, once a step
        assert tracker.large_shapes == [(n, k)] * 2, tracker.large_shapes
    transient = tracker.peak_bytes - tracker.baseline_bytes
    # fp32: the masked weight (4 bytes an entry) + at most 18 bytes an entry of a chunk (measured
    # 17.1 with the threshold's small chunks, 14.0 in one chunk; main before: 27.8 and 18.3):
    # ops/pst_reference.py, W_eff, |W_eff|, the score and its key shift, then G and the mask.
    assert transient <= 4 * n * k + 18 * chunk, ((transient - 4 * n * k) / chunk, n * k, chunk)


def _step(layer, x, dy):
    """[y, dx, dU, dV, dA, dB, dR, dC] of one step (the factors' gradients cleared after)."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in layer.factors()]
    for p in layer.factors():
        p.grad = None
    return [y] + grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_step_computes_what_one_chunk_does(monkeypatch, dtype):
    """Over 4 row chunks the forward is bitwise the one-chunk forward (the masked weight is
    written chunk by chunk, rounded to x's dtype as one cast would); the backward sums dx and the
    column factors' gradients over the chunks, so they agree to rounding."""
    monkeypatch.setattr(pst_layer, "KEEP_MASK_ENTRIES", 0)  # the mask made in the step, chunk by chunk
    generator = torch.Generator().manual_seed(5)
    layer = spft.PSTLinear.from_linear(torch.nn.Linear(40, 44).to(dtype), 0.5, r1=3, r2=2, beta=0.7, alpha1=1.3,
                                       alpha2=0.6, backend="reference", generator=generator)
    with torch.no_grad():
        for factor in layer.factors():
            factor.copy_(torch.randn(factor.shape, generator=generator))
    x = torch.randn(6, 40, generator=generator).to(dtype)
    dy = torch.randn(6, 44, generator=generator).to(dtype)
    y_one, *grads_one = _step(layer, x, dy)
    monkeypatch.setattr(ref, "CHUNK_ENTRIES", 11 * 40)
    assert len(ref.row_blocks(44, 40)) == 4
    y_chunked, *grads_chunked = _step(layer, x, dy)
    assert torch.equal(y_chunked, y_one)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, got, expected in zip(["x", *"UVABRC"], grads_chunked, grads_one):
        torch.testing.assert_close(got, expected, msg=name, **tolerance)


@pytest.mark.parametrize("abs_score_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_kept_mask_gives_the_step_bitwise(monkeypatch, dtype, abs_score_grad):
    """A small layer keeps M from one threshold to the next (nn/pst_linear.py,
    KEEP_MASK_ENTRIES) and its step skips the score and the mask: y, dx and every factor
    gradient are bitwise what the step computes when it makes M itself."""
    generator = torch.Generator().manual_seed(9)
    layer = spft.PSTLinear.from_linear(torch.nn.Linear(30, 36).to(dtype), 0.6, r1=3, r2=2, beta=0.7, alpha1=1.3,
                                       alpha2=0.6, abs_score_grad=abs_score_grad, backend="reference",
                                       generator=generator)
    with torch.no_grad():
        for factor in layer.factors():
            factor.copy_(torch.randn(factor.shape, generator=generator))
    x = torch.randn(2, 5, 30, generator=generator).to(dtype)
    dy = torch.randn(2, 5, 36, generator=generator).to(dtype)
    kept = _step(layer, x, dy)
    kept_mask = layer._step_cache.mask  # 0/1 floats, so no bool -> float cast in the step
    assert kept_mask is not None and kept_mask.is_floating_point()
    assert torch.equal(kept_mask.bool(), layer.mask()) and set(kept_mask.unique().tolist()) <= {0.0, 1.0}
    monkeypatch.setattr(pst_layer, "KEEP_MASK_ENTRIES", 0)
    made = _step(layer, x, dy)
    assert layer._step_cache.mask is None  # the step made M itself
    for name, a, b in zip(["y", "x", *"UVABRC"], kept, made):
        assert torch.equal(a, b), name
