"""Selection scores for targets whose W0 is quantized (bitsandbytes, ``nn/bnb_base.py``).

Their weight is packed storage that cannot require grad, so a gradient metric gets
``∂loss/∂W = Σ_t dy_tᵀ x_t`` from each layer's input x and output gradient dy, captured with module
hooks (``activation_gradients``): one layer's out x in product at a time, handed to the same
accumulation the dense path uses, never a dense weight gradient held by autograd. For the
gradient to reach every target, the first targets' inputs are made to require grad (as QLoRA's
``enable_input_require_grads`` does). Metrics that multiply by W read it in bands of rows
(``dequantize(rows)``), freed band by band.

SPEFT's salience: ``magnitude``, ``random``, ``gradient``, ``snip``, ``force``, ``taylor_fo``;
SPruFT's row importance: ``l2``, ``random``, ``taylor``. The others (second order, zeroth order,
class-aware) are refused with the reason.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..nn.bnb_base import quantized_base_for
from ..ops import naive

Tensor = torch.Tensor

SALIENCE_METRICS = ("magnitude", "random", "gradient", "snip", "force", "taylor_fo")
ROW_METRICS = ("l2", "random", "taylor")


def quantized_targets(targets: Mapping[str, nn.Module]) -> dict:
    """``{name: quantized base}`` of the targets held in bitsandbytes storage."""
    return {name: base for name, base in ((n, quantized_base_for(m)) for n, m in targets.items()) if base is not None}


def check_metric(who: str, metric: str, allowed: tuple, quantized: Mapping) -> None:
    if metric not in allowed:
        name, base = next(iter(quantized.items()))
        raise ValueError(
            f"{who}: metric {metric!r} is not available for a quantized base ({name!r}: {base.summary()}); over a "
            f"quantized base the scores come from x and dy or from W0 read in bands of rows: use one of {allowed}"
        )


def _row_bands(out_features: int, in_features: int) -> list[tuple[int, int]]:
    step = max(1, naive.CHUNK_ELEMENTS // max(in_features, 1))
    return [(start, min(start + step, out_features)) for start in range(0, out_features, step)]


def weight_rows(module: nn.Module, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of W0 as a dense tensor (dequantized for a quantized base)."""
    base = quantized_base_for(module)
    return module.weight.detach()[start:stop] if base is None else base.dequantize(slice(start, stop))


def multiply_by_weight_(scores: Tensor, module: nn.Module, transform: Callable[[Tensor, Tensor], None]) -> Tensor:
    """``transform(scores_band, W_band)`` in place, band of rows by band of rows."""
    for start, stop in _row_bands(*scores.shape[:1], module.in_features):
        transform(scores[start:stop], weight_rows(module, start, stop).to(scores.device))
    return scores


@contextlib.contextmanager
def activation_gradients(modules: Mapping[str, nn.Module], consume: Callable[[str, Tensor], None]):
    """While active, each backward through module ``name`` calls ``consume(name, dyᵀ x)`` (fp32,
    fp64 for fp64 inputs; [out, in], freed after the call). Every parameter of the model may stay
    frozen: an input that does not require grad is replaced by a leaf that does."""

    def make_input_differentiable(module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def watch(name: str):
        def hook(module, args, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            x = args[0]

            def on_grad(dy: Tensor) -> None:
                tokens = dy.numel() // dy.shape[-1]
                x2d, dy2d = x.reshape(tokens, x.shape[-1]), dy.reshape(tokens, dy.shape[-1])
                consume(name, naive.mm_tn_acc(dy2d, x2d, naive.accumulate_dtype(x2d, dy2d)))

            output.register_hook(on_grad)

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_input_differentiable))
            handles.append(module.register_forward_hook(watch(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def gradient_sums(targets: Mapping[str, nn.Module], losses, zeros: Callable[[nn.Module], Tensor],
                  add: Callable[[Tensor, Tensor], None], frozen) -> tuple[dict, int]:
    """``(Σ over the batches of ∂loss/∂W per target, number of batches)`` from x and dy.
    ``losses`` yields one scalar loss per batch (computed inside, so the hooks see the forward);
    ``frozen``: the caller's context that freezes every parameter, with gradients enabled."""
    sums = {name: zeros(module) for name, module in targets.items()}
    count = 0
    with frozen, torch.enable_grad(), activation_gradients(targets, lambda name, grad: add(sums[name], grad)):
        for loss in losses():
            loss.backward()
            count += 1
    return sums, count


def magnitude(module: nn.Module, device: Optional[torch.device] = None) -> Tensor:
    """``|W0|`` [out, in] in fp32, filled band by band."""
    scores = torch.empty(module.out_features, module.in_features, dtype=torch.float32,
                         device=device or module.weight.device)
    return multiply_by_weight_(scores, module, lambda band, w: band.copy_(w).abs_())


def row_l2(module: nn.Module) -> Tensor:
    norms = torch.empty(module.out_features, dtype=torch.float32, device=module.weight.device)
    for start, stop in _row_bands(module.out_features, module.in_features):
        norms[start:stop] = torch.linalg.vector_norm(weight_rows(module, start, stop).float(), dim=1)
    return norms


def row_taylor(grad_sum: Tensor, module: nn.Module, count: int) -> Tensor:
    """``Σ_j |grad_sum[i, j] / count · W[i, j]|`` per row; consumes ``grad_sum``."""
    scores = torch.empty(module.out_features, dtype=grad_sum.dtype, device=grad_sum.device)
    for start, stop in _row_bands(module.out_features, module.in_features):
        band = grad_sum[start:stop].mul_(weight_rows(module, start, stop).to(grad_sum.device)).abs_()
        scores[start:stop] = band.sum(dim=1)
    return scores.div_(count)
