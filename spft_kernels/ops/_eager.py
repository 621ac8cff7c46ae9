"""When an op may skip its ``torch.library`` custom op wrapper and run its body directly.

A custom op costs ~30-60 µs of Python per call in eager mode (schema defaults, pytree, the
autograd and ADInplaceOrView redispatches: measured with cProfile on the development CPU), as much
as the whole step of a 64x64 layer, so a training step of 3 custom ops spent more time in the
wrappers than LoRA's 12 ops take in all. The wrapper is needed only where something traces the
op (torch.compile, AOT autograd, opcheck, fake tensors); there the inputs are tensor subclasses
(FakeTensor, FunctionalTensor) or a compile is under way. Plain tensors in eager mode run the
same body through a ``torch.autograd.Function`` (or directly, for ops without autograd):
the same math, the same ops, no wrapper.
"""

from __future__ import annotations

import torch


def runs_eagerly(*tensors) -> bool:
    """Whether every given tensor is a plain ``torch.Tensor`` (or None) and nothing is compiling."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def eager_autograd(body, setup_context, backward, *, keyword_setup: bool):
    """A ``torch.autograd.Function`` running a custom op's ``body`` with its registered
    ``setup_context`` and ``backward``, for :func:`runs_eagerly` inputs. Call ``apply(*args,
    options)``: ``args`` the op's positional inputs (a list of tensors among them is passed as is),
    ``options`` a dict of its keyword-only inputs. ``ctx.needs_input_grad`` keeps the op's
    positions for every input before a list (the ops here put their list last)."""

    def split(inputs):
        *args, options = inputs
        return tuple(args), options

    class EagerOp(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with the latter, apply() binds
        # the arguments to forward's signature on every call (inspect.signature: ~30 µs).
        @staticmethod
        def forward(ctx, *inputs):
            args, options = split(inputs)
            args = tuple(_lists(args))
            output = body(*args, **options)
            if keyword_setup:
                setup_context(ctx, args, options, output)
            else:
                setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            result = backward(ctx, *grads)
            return tuple(None if isinstance(g, list) else g for g in result) + (None,)

    return EagerOp


class TensorList(tuple):
    """A list input of an op, passed through ``autograd.Function.apply`` (which takes lists of
    tensors as plain objects, without gradients: the ops' lists are index forms)."""


def _lists(args):
    return [list(a) if isinstance(a, TensorList) else a for a in args]
