"""``y = x (W0 + Δ)ᵀ + b`` with a trainable sparse ``Δ``: the op, its autograd and the
functional entry point.

The op ``spft::sparse_delta_linear(x, weight, bias, delta, index, *, index_form, mode, backend)``
takes five tensors and named options (with a fake implementation, so torch.compile traces
through it). ``index`` is the index form the step reads, decided once per index change (the
layer keeps it): ``crow`` and ``col_bytes``, the stored CSR with 16-bit columns
(csr_index.py), plus, for a custom kernel backend asked for by name, the derived forms it reads;
``index_form`` names them, in order. ``mode`` is the layer's: ``split`` (GEMM + SpMM),
``merged`` (the weight already holds W0 + Δ: a plain GEMM) or ``fused`` (one GEMM adding Δ into
the weight tiles: the cuda kernel; elsewhere computed as split). ``weight=None``: the base term
is computed elsewhere (a quantized base's own matmul): the op returns ``x Δᵀ (+ b)`` only.

The default path (backend ``reference``, what ``auto`` runs on every device) is the library's
sparse products, one op each (library_sparse.py): a step is the GEMMs plus a cast of the
columns, the CSR products and the bias sum, whatever the tokens and the size of the weight.

Backward: ``dx = dy W + dy Δ`` (``dy W`` alone in merged mode, where W already holds W0 + Δ),
``d delta = SDDMM(x, dy)``, ``db = Σ dy``; only ``x`` is saved besides the layer's own tensors
(W, delta and the 2-byte index). ``dW = dyᵀ x`` only if the weight itself requires grad.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import library_sparse, naive
from ._guards import autocast_off
from ._eager import TensorList, eager_autograd, runs_eagerly
from ._linear_args import check_x_and_weight, prepare_operands, weight_for_dx
from .backends import check_backend_name, resolve_backend
from .csr_index import CsrIndex
from .fused_delta_linear import fused_delta_linear
from .index import SparseIndex, index_dtype_for
from .sddmm import sddmm
from .spmm import spmm_add, spmm_t_add

Tensor = torch.Tensor

STORED = ("crow", "col_bytes")


# --- the index form an op reads ----------------------------------------------------------------


class _IndexForm:
    """The op's ``index`` list by name (``index_form``: the names, comma-separated)."""

    def __init__(self, tensors, names: str, out_features: int, in_features: int):
        self.tensors = dict(zip(names.split(","), tensors))
        self.csr = CsrIndex(self.tensors["crow"], self.tensors["col_bytes"], out_features, in_features)
        self._columns = self._flat = None

    def columns(self) -> Tensor:
        """int32 CSR columns, cast once per call and shared by the call's products."""
        if self._columns is None:
            self._columns = self.csr.columns()
        return self._columns

    def flat(self) -> Tensor:
        """The canonical flat index: the one the layer keeps (small weights), else expanded (3-4
        ops: the custom kernels only)."""
        if self._flat is None:
            self._flat = self.tensors.get("flat")
        if self._flat is None:
            self._flat = self.csr.flat(index_dtype_for(self.csr.out_features, self.csr.in_features))
        return self._flat

    def get(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(name)


_KERNEL_CHOICES: dict = {}


def _kernel(op: str, backend: str, device: torch.device) -> bool:
    """Whether ``op`` runs a custom kernel (cuda, triton: asked for by name) instead of the
    library's sparse products. Resolved once per (op, backend, device type) and process: the
    registry does not change after import, and resolving costs ~10 µs, 2-4 times a step."""
    if backend == "reference":
        return False
    if torch.compiler.is_compiling():
        # Not through the cache: Dynamo would guard on the process-wide dict's contents, and the
        # first eager call after the trace that adds a key would force a recompile.
        return resolve_backend(op, backend, device) != "reference"
    key = (op, backend, device.type)
    choice = _KERNEL_CHOICES.get(key)
    if choice is None:
        choice = _KERNEL_CHOICES[key] = resolve_backend(op, backend, device) != "reference"
    return choice


def _x_delta_t(y2d: Optional[Tensor], x2d: Tensor, delta: Tensor, index: _IndexForm, dtype, backend: str) -> Tensor:
    if _kernel("spmm_add", backend, x2d.device):
        base = y2d if y2d is not None else x2d.new_zeros(x2d.shape[0], index.csr.out_features)
        return spmm_add(base, x2d, delta, index.flat(), index.get("row_ptr"), backend)
    return library_sparse.add_rounded_(y2d, library_sparse.x_delta_t(x2d, delta, index.csr, index.columns()), dtype)


def _dy_delta(dx2d: Optional[Tensor], dy2d: Tensor, delta: Tensor, index: _IndexForm, dtype, backend: str) -> Tensor:
    if _kernel("spmm_t_add", backend, dy2d.device):
        base = dx2d if dx2d is not None else dy2d.new_zeros(dy2d.shape[0], index.csr.in_features)
        return spmm_t_add(base, dy2d, delta, index.flat(), index.get("col_ptr"), index.get("csc_perm"), backend)
    return library_sparse.add_rounded_(dx2d, library_sparse.dy_delta(dy2d, delta, index.csr, index.columns()), dtype)


def _delta_grad(x2d: Tensor, dy2d: Tensor, index: _IndexForm, backend: str) -> Tensor:
    if _kernel("sddmm", backend, x2d.device):
        return sddmm(x2d, dy2d, index.flat(), index.get("tile_ptr"), backend)
    flat = index.get("flat")
    dense = flat is not None and library_sparse.uses_dense_gradient(index.csr, x2d.shape[0])
    return library_sparse.sddmm(x2d, dy2d, index.csr, None if dense else index.columns(), flat)


# --- the layer op ------------------------------------------------------------------------------


@torch.library.custom_op("spft::sparse_delta_linear", mutates_args=())
def _sparse_delta_linear_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    delta: Tensor,
    index: list[Tensor],
    *,
    index_form: str,
    out_features: int,
    mode: str,
    backend: str,
) -> Tensor:
    return _linear_impl(x, weight, bias, delta, index, index_form=index_form, out_features=out_features, mode=mode,
                        backend=backend)


def _linear_impl(x, weight, bias, delta, index, *, index_form, out_features, mode, backend) -> Tensor:
    in_features = x.shape[-1]
    num_tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) cannot infer it for a zero-width layer
    x2d = x.reshape(num_tokens, in_features)
    form = _IndexForm(index, index_form, out_features, in_features)
    has_delta = mode != "merged" and form.csr.nnz > 0
    # The op chooses its own precision (prepare_operands cast x for autocast already): under
    # autocast the sparse products would otherwise be cast to a dtype the library lacks.
    with autocast_off(x.device.type):
        y2d = _forward(x2d, weight, bias, delta, form, num_tokens, out_features, has_delta, mode, backend)
    return y2d.reshape(*x.shape[:-1], out_features)


def _forward(x2d, weight, bias, delta, form, num_tokens, out_features, has_delta, mode, backend) -> Tensor:
    if mode == "fused" and has_delta and weight is not None and _kernel("fused_delta_linear", backend, x2d.device):
        return fused_delta_linear(x2d, weight, delta, form.flat(), form.get("row_ptr"), bias, backend)
    if weight is not None:
        if has_delta and not _kernel("spmm_add", backend, x2d.device):
            y2d = library_sparse.linear_with_delta(x2d, weight, bias, delta, form.csr, form.columns())
            if y2d is not None:
                return y2d
        y2d = F.linear(x2d, weight, bias)
        return _x_delta_t(y2d, x2d, delta, form, x2d.dtype, backend) if has_delta else y2d
    if has_delta:
        y2d = _x_delta_t(None, x2d, delta, form, x2d.dtype, backend)
        return y2d if bias is None else y2d.add_(bias)
    return x2d.new_zeros(num_tokens, out_features) if bias is None else bias.expand(num_tokens, out_features).clone()


@_sparse_delta_linear_op.register_fake
def _(x, weight, bias, delta, index, *, index_form, out_features, mode, backend):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, weight, bias, delta, index = inputs
    ctx.save_for_backward(x, weight_for_dx(ctx, weight) if weight is not None else None, delta, *index)
    ctx.options = keyword_only_inputs
    ctx.index_count = len(index)
    ctx.bias_dtype = None if bias is None else bias.dtype


@torch.library.custom_op("spft::sparse_delta_linear_backward", mutates_args=())
def _sparse_delta_linear_backward_op(
    dy2d: Tensor,
    x2d: Tensor,
    weight: Optional[Tensor],
    delta: Tensor,
    index: list[Tensor],
    *,
    index_form: str,
    mode: str,
    backend: str,
    need_dx: bool,
    need_delta: bool,
) -> tuple[Tensor, Tensor]:
    """``(dx, d delta)`` for 2-D ``dy``, ``x``; an output not asked for is empty. One op for the
    tracer: the sparse tensors the library's products build inside are not traceable."""
    return _backward_impl(dy2d, x2d, weight, delta, index, index_form, mode, backend, need_dx, need_delta)


def _backward_impl(dy2d, x2d, weight, delta, index, index_form, mode, backend, need_dx, need_delta):
    out_features, in_features = dy2d.shape[1], x2d.shape[1]
    form = _IndexForm(index, index_form, out_features, in_features)
    has_delta = mode != "merged" and form.csr.nnz > 0
    dx2d = ddelta = None
    with autocast_off(x2d.device.type):
        if need_dx:
            dx2d = None
            if has_delta and weight is not None and not _kernel("spmm_t_add", backend, dy2d.device):
                dx2d = library_sparse.dx_with_delta(dy2d, weight, delta, form.csr, form.columns())
            if dx2d is None:
                dx2d = dy2d.mm(weight) if weight is not None else None
                if has_delta:
                    dx2d = _dy_delta(dx2d, dy2d, delta, form, x2d.dtype, backend)
            elif dx2d is None:
                dx2d = x2d.new_zeros(x2d.shape)
        if need_delta:
            ddelta = _delta_grad(x2d, dy2d, form, backend)
            if ddelta.dtype != delta.dtype:
                ddelta = ddelta.to(delta.dtype)
    return (x2d.new_empty(0) if dx2d is None else dx2d), (delta.new_empty(0) if ddelta is None else ddelta)


@_sparse_delta_linear_backward_op.register_fake
def _(dy2d, x2d, weight, delta, index, *, index_form, mode, backend, need_dx, need_delta):
    return x2d.new_empty(x2d.shape if need_dx else (0,)), delta.new_empty(delta.shape if need_delta else (0,))


def _backward(ctx, dy):
    """``(dx, dweight, dbias, ddelta)``; the callers add the index's (no) gradient."""
    x, weight, delta, *index = ctx.saved_tensors
    need_x, need_weight, need_bias, need_delta = ctx.needs_input_grad[:4]  # x, weight, bias, delta
    options = ctx.options
    num_tokens = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) cannot infer it for a zero-width layer
    dy2d = dy.reshape(num_tokens, options["out_features"])
    x2d = x.reshape(num_tokens, x.shape[-1])
    dx = dweight = ddelta = dbias = None
    if need_x or need_delta:
        arguments = dict(index_form=options["index_form"], mode=options["mode"], backend=options["backend"],
                         need_dx=need_x, need_delta=need_delta)
        if runs_eagerly(dy2d, x2d, weight, delta, *index):
            dx2d, ddelta = _backward_impl(dy2d, x2d, weight, delta, index, **arguments)
        else:
            dx2d, ddelta = _sparse_delta_linear_backward_op(dy2d, x2d, weight, delta, index, **arguments)
        dx = dx2d.reshape(x.shape) if need_x else None
        ddelta = ddelta if need_delta else None
    if need_weight:
        dweight = dy2d.t().mm(x2d)
    if need_bias:
        dbias = dy2d.sum(dim=0, dtype=naive.accumulate_dtype(dy2d)).to(ctx.bias_dtype)
    return dx, dweight, dbias, ddelta


def _op_backward(ctx, dy):
    # ctx.saved_tensors is read once (activation checkpointing allows no second unpack)
    return (*_backward(ctx, dy), [None] * ctx.index_count)


_sparse_delta_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


_EagerSparseDeltaLinear = eager_autograd(
    _linear_impl, _setup_context, _op_backward, keyword_setup=True
)


# --- functional entry point ------------------------------------------------------------------

_KERNEL_OPS = {
    "split": ("spmm_add", "spmm_t_add", "sddmm"),
    "merged": ("sddmm",),
    "fused": ("fused_delta_linear", "spmm_t_add", "sddmm"),
}

# The derived index forms each op's kernels read (``SparseIndex``); the reference
# implementations read none. The forward's op is the first of the mode's kernel ops.
_METADATA = {
    "spmm_add": ("row_ptr",),
    "fused_delta_linear": ("row_ptr",),
    "spmm_t_add": ("col_ptr", "csc_perm"),
    "sddmm": ("tile_ptr",),
}


def index_form_for(sparse_index: SparseIndex, mode: str, backend: str, device: torch.device) -> tuple[list, str]:
    """``(tensors, names)``: what the op reads of ``sparse_index`` in ``mode`` on ``backend``
    (the op's ``index`` and ``index_form``): the stored CSR, plus the derived forms a custom
    kernel of this mode reads (built on first use and kept by the index's owner). Decided once
    per index change by a layer (kept in ``sparse_index.decided``); the library path reads the
    stored CSR only."""
    key = ("index_form", mode, backend, device.type)
    decided = None if torch.compiler.is_compiling() else sparse_index.decided.get(key)
    if decided is None:
        decided = _index_form(sparse_index, mode, backend, device)
        if not torch.compiler.is_compiling():
            sparse_index.decided[key] = decided
    return decided


def _index_form(sparse_index: SparseIndex, mode: str, backend: str, device: torch.device) -> tuple[list, str]:
    csr = sparse_index.csr()
    named = {"crow": csr.crow, "col_bytes": csr.col_bytes}
    kept = sparse_index.kept_flat()
    if kept is not None:  # a small weight's flat positions, kept by its layer (index.py): no bytes added
        named["flat"] = kept
    if sparse_index.nnz:
        for op in _KERNEL_OPS[mode]:
            if _kernel(op, backend, device):
                for name in _METADATA[op]:
                    tensor = getattr(sparse_index, name)
                    if tensor is not None:
                        named[name] = tensor
    return list(named.values()), ",".join(named)


_MODES = ("split", "merged", "fused")


def sparse_delta_linear(
    x: Tensor,
    weight: Optional[Tensor],
    delta: Tensor,
    index: Union[Tensor, SparseIndex],
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    merged: bool = False,
    fused: bool = False,
    mode: Optional[str] = None,
) -> Tensor:
    """``y = x (W0 + Δ)ᵀ + b`` where ``Δ`` holds ``delta[k]`` at flat position ``index[k]``.

    ``x``: [..., in]; ``weight``: [out, in] (frozen W0); ``delta``: [nnz] (fp32 master);
    ``index``: a :class:`SparseIndex`, or a 1-D integer tensor of flat positions, which is then
    validated and its CSR form built on every call (a host sync: layers cache a SparseIndex).
    An unsorted index tensor is sorted and ``delta`` permuted with it (differentiably).
    ``mode``: ``"split"`` (default), ``"merged"`` or ``"fused"``; ``merged=True`` / ``fused=True``
    say the same (kept for callers of earlier versions). ``merged=True`` declares that ``weight`` already holds ``W0 + Δ``: the forward is then a plain
    GEMM and only the delta gradient is sparse (the layer's merged mode). ``fused=True`` computes
    the forward as one GEMM that adds Δ into the weight tiles (the layer's fused mode; the cuda
    backend has the kernel, the reference computes the split form).

    ``weight=None``: the base term ``x W0ᵀ`` is computed elsewhere (e.g. by a quantized base's own
    matmul); the result is then ``x Δᵀ + b`` alone, its backward ``dx = dy Δ`` and the same delta
    gradient. ``index`` must then be a :class:`SparseIndex` (it gives the weight's shape) and
    ``merged`` is refused (there is no weight to hold Δ).
    """
    name = "sparse_delta_linear"
    check_backend_name(backend)
    if mode is not None:  # the layer's way: the mode as a string end to end
        if mode not in _MODES or merged or fused:
            raise ValueError(f"{name}: mode must be one of {_MODES} (and given alone, without merged/fused), got {mode!r}")
        merged, fused = mode == "merged", mode == "fused"
    if merged and fused:
        raise ValueError(f"{name}: merged and fused are exclusive (a merged weight already holds Δ)")
    mode = "merged" if merged else "fused" if fused else "split"
    if weight is None:
        if merged:
            raise ValueError(f"{name}: merged=True needs the weight that holds W0 + Δ, got weight=None")
        if not isinstance(index, SparseIndex):
            raise ValueError(f"{name}: with weight=None give index as a SparseIndex (it carries the weight's shape)")
        out_features, in_features = index.shape
        check_x_and_weight(name, x, torch.empty(out_features, in_features, device="meta"), delta, "delta")
    else:
        out_features, in_features = check_x_and_weight(name, x, weight, delta, "delta")
    if isinstance(index, SparseIndex):
        sparse_index = index
        if sparse_index.shape != (out_features, in_features):
            raise ValueError(
                f"{name}: index was built for shape {sparse_index.shape}, weight is {(out_features, in_features)}"
            )
    else:
        sparse_index, order = SparseIndex.build(index, out_features, in_features, device=weight.device, name=name)
        if order is not None:
            if delta.shape != order.shape:
                raise ValueError(f"{name}: delta has shape {tuple(delta.shape)}, expected ({order.numel()},)")
            delta = delta[order.to(delta.device)]
    if delta.dim() != 1 or delta.numel() != sparse_index.nnz:
        raise ValueError(
            f"{name}: delta must be 1-D with one value per index entry ({sparse_index.nnz}), "
            f"got shape {tuple(delta.shape)}"
        )
    if not delta.is_floating_point():
        raise ValueError(f"{name}: delta must be floating point, got {delta.dtype}")
    csr = sparse_index.csr()
    x, weight, bias = prepare_operands(
        name, x, weight, bias, (delta, csr.crow, csr.col_bytes), _KERNEL_OPS[mode], backend, out_features=out_features
    )
    tensors, form = index_form_for(sparse_index, mode, backend, x.device)
    options = dict(index_form=form, out_features=out_features, mode=mode, backend=backend)
    if runs_eagerly(x, weight, bias, delta, *tensors):
        return _EagerSparseDeltaLinear.apply(x, weight, bias, delta, TensorList(tensors), options)
    return _sparse_delta_linear_op(
        x, weight, bias, delta, tensors, **options
    )
