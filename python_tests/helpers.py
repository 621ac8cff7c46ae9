"""fp64 dense oracles and the error-budget rule shared by the tests (tests only: they may build
out x in tensors, the package may not)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spft_kernels as spft

# atol of the flash-attention rule, relative to the reference's magnitude.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dense_weight(weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().to(torch.float64).clone().view(-1)
    flat.index_add_(0, index.long(), delta.detach().to(torch.float64))
    return flat.view(weight.shape)


def dense_oracle(x, weight, delta, index, bias, dy):
    """(y, dx, d delta, d bias) in fp64 from the dense definition y = x (W0 + Δ)ᵀ + b."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    w64 = dense_weight(weight, delta, index).requires_grad_(True)
    b64 = None if bias is None else bias.detach().to(torch.float64).requires_grad_(True)
    y = F.linear(x64, w64, b64)
    inputs = [x64, w64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(y, inputs, dy.to(torch.float64))
    dbias = grads[2] if b64 is not None else None
    return y.detach(), grads[0], grads[1].view(-1)[index.long()], dbias


def plain_pytorch(x, weight, delta, index, bias, dy):
    """The same step done the plain way in the inputs' dtype: a dense W0 + Δ, autograd for dW."""
    w = dense_weight(weight, delta, index).to(weight.dtype).requires_grad_(True)
    xx = x.detach().clone().requires_grad_(True)
    y = F.linear(xx, w, None if bias is None else bias.detach())
    dx, dw = torch.autograd.grad(y, [xx, w], dy)
    return y.detach(), dx, dw.view(-1)[index.long()]


def max_error(value, reference) -> float:
    if reference.numel() == 0:
        return 0.0
    return (value.detach().to(torch.float64) - reference).abs().max().item()


def assert_within_budget(name, ours, plain, reference, dtype):
    """flash-attention's rule: error(ours) <= 2 * error(plain PyTorch, same dtype) + atol."""
    scale = max(reference.abs().max().item(), 1.0) if reference.numel() else 1.0
    ours_error, plain_error = max_error(ours, reference), max_error(plain, reference)
    bound = 2 * plain_error + ATOL[dtype] * scale
    assert ours_error <= bound, f"{name}: error {ours_error:.3g} > 2 x plain {plain_error:.3g} + atol ({dtype})"


def random_problem(out_features, in_features, lead, density, bias, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    index = spft.random_index(out_features, in_features, density, generator=generator)
    delta = torch.randn(index.numel(), generator=generator, dtype=torch.float64) * 0.5
    b = torch.randn(out_features, generator=generator, dtype=torch.float64) if bias else None
    x = torch.randn(*lead, in_features, generator=generator, dtype=torch.float64)
    dy = torch.randn(*lead, out_features, generator=generator, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), delta, index, cast(b), cast(dy)


def fit_mse(layer, optimizer, x, target, steps):
    """``steps`` optimizer steps on the mean squared error of ``layer(x)``; returns the losses."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_merge_round_trip(layer, merged_weight, w0):
    """merge() writes exactly ``merged_weight``, unmerge() restores W0 bitwise, both idempotent."""
    layer.merge()
    assert torch.equal(layer.weight, merged_weight)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge()
    layer.merge()
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
