"""``spft-bench --memory``: will it fit? The peak memory of one training step per method, for a
model given by its config alone, computed on the CPU with fake tensors (no GPU, no weights).

The model is built from its config (e.g. ``bench/configs/llama-2-7b.json``: LlamaConfig fields)
under ``FakeTensorMode``, converted by each method, and trained one step (AdamW, steady state:
the optimizer state exists) while :class:`~spft_kernels.bench.memory.TensorMemoryTracker` follows
every tensor storage the step creates, inside spft's own ops too. A fake tensor has the size of
the real one, so the numbers are exact allocations of this code, without a byte of weights.
On a small real model the tracker agreed with the allocator to within 224 bytes.

Each row gives the peak and what is alive at that moment: weights (frozen base, trainable
values and their buffers: index, W0 at the trained positions), gradients, optimizer state and
the rest (activations and temporaries), plus what ``model.state_dict()`` allocates (a
checkpoint) and any temporary of a target weight's shape (out x in). For ``speft`` the
selection pass (gradient salience over one batch) is measured too, with the scores on the
device and with ``score_device="cpu"`` (host memory; "meta" stands in for it here, the one
device there is).

Positions: ``sparta`` and ``speft`` place LoRA-rank-r's parameter count at one uniform density
(the per-layer count of a global top-k depends on the data), ``spruft`` takes
``round(r (in + out) / in)`` rows per layer, ``pst`` r1 = r2 = (r - 1) // 2 (at most LoRA's
count), ``lora`` is peft's LoRA (fp32 adapters, dropout 0). A new method is one entry of
``METHODS``.

``--quantize nf4|fp4|int8``: the target linears become bitsandbytes ``Linear4bit`` (blocks of 64,
double quantization unless ``--no-double-quant``, computing in ``--dtype``) or ``Linear8bitLt``,
quantized with bitsandbytes' own ops (their fake implementations here), the rest of the model
(embeddings, norms, LM head) in ``--dtype`` as transformers loads it: ``lora`` is then QLoRA
(peft's LoRA on the bitsandbytes layers) and the sparse layers run split over the quantized base
(``nn/bnb_base.py``); ``full`` and ``pst`` need a dense W0 and are skipped. The block scales live
on the weight (``quant_state``), not as parameters, and are counted with the weights. The 4-bit
step is bitsandbytes' CUDA path (its fused 4-bit GEMM forward, a dequantized W0 of one layer in
backward; the GEMM's own scratch is not seen), 8-bit its CPU/XPU training path (dequantize and
GEMM; CUDA's int8 GEMM path keeps other temporaries).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..masks.progress import progress_bar
from ..masks.select import lora_equivalent_params
from ..masks.targets import find_target_linears
from ..nn.pst_linear import PSTLinear
from ..nn.row_sparse_linear import RowSparseLinear
from ..nn.sparse_delta_linear import SparseDeltaLinear
from ..ops.index import SparseIndex, index_dtype_for
from .known_noise import known_noise
from .memory import TensorMemoryTracker

GIB = 2**30
NOT_COUNTED = (
    "the CUDA context (about 0.3-0.6 GiB a process)",
    "allocator fragmentation and cached blocks (reserved can exceed allocated by 10-30%)",
    "cuBLAS/cuDNN workspaces and kernels' own scratch memory (tens of MiB)",
    "NCCL buffers (distributed runs)",
)



class MethodUnavailable(Exception):
    """The method cannot be built in this version (the reason is shown, the row skipped)."""


# --- fake model ---------------------------------------------------------------------------------


def load_model_config(path: str):
    """A transformers config from a JSON of its fields (``model_type`` names the class)."""
    with open(path) as handle:
        return load_model_config_from(json.load(handle), path)


def load_model_config_from(fields: dict, where: str = "model config"):
    from transformers import CONFIG_MAPPING

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: 'model_type' must name a transformers config (e.g. 'llama'), got {model_type!r}")
    fields.pop("architectures", None)
    return CONFIG_MAPPING[model_type](**fields)


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode, with module casts that work on fake parameters (``nn.Module._apply``
    swaps a fake parameter's tensor, which fails while the fake mode holds a weak reference to
    it: the swap falls back to ``.data``, the same result for a cast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real_swap = torch.utils.swap_tensors

    def swap(first, second):
        try:
            return real_swap(first, second)
        except RuntimeError:
            first.data = second.data if isinstance(second, nn.Parameter) else second

    torch.utils.swap_tensors = swap
    try:
        with FakeTensorMode(), torch.device("cpu"):
            yield
    finally:
        torch.utils.swap_tensors = real_swap


@contextlib.contextmanager
def accelerator_paths():
    """The reference ops as they run on an accelerator: an op with a ``sync_free`` switch
    (reading the index on the host is free on the CPU only, so the CPU takes another path) takes
    the path a GPU run takes, in fake and real runs alike, and so does the masked gradient over a
    quantized base (the sddmm op, not torch.sparse's CPU ``sampled_addmm``)."""
    import inspect

    from ..ops import naive

    from ..ops import delta_term

    real = {name: getattr(naive, name) for name in ("sddmm", "spmm_add", "spmm_t_add") if hasattr(naive, name)}
    patched = {name: _with_defaults(fn, sync_free=True) for name, fn in real.items()
               if "sync_free" in inspect.signature(fn).parameters}
    sampled = delta_term.CPU_SAMPLED_ADDMM
    try:
        for name, fn in patched.items():
            setattr(naive, name, fn)
        delta_term.CPU_SAMPLED_ADDMM = False  # (a masked gradient over a quantized base: the sddmm op)
        yield
    finally:
        delta_term.CPU_SAMPLED_ADDMM = sampled
        for name, fn in real.items():
            setattr(naive, name, fn)


def _with_defaults(fn, **defaults):
    def call(*args, **kwargs):
        return fn(*args, **{**defaults, **kwargs})

    return call


def build_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _targets(model) -> dict[str, nn.Linear]:
    return find_target_linears(model)


def quantize_targets(model, kind: str, compute_dtype: torch.dtype, double_quant: bool = True) -> None:
    """Replace every target linear by a bitsandbytes layer holding its quantized weight, built
    with bitsandbytes' quantization ops, so that it works on fake tensors as on real ones (a
    bitsandbytes Params class cannot wrap a fake tensor: the weight is a plain Parameter carrying
    the same ``quant_state`` / ``CB`` / ``SCB`` attributes)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError as error:
        raise MethodUnavailable(f"bitsandbytes is not installed ({error})") from None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    for name, linear in _targets(model).items():
        shape = (linear.in_features, linear.out_features)
        with unset_fake_temporarily():  # (its __init__ makes a Params object of a meta tensor)
            if kind == "int8":
                module = bnb.nn.Linear8bitLt(*shape, bias=linear.bias is not None, has_fp16_weights=False,
                                             threshold=0.0, device="meta")
            else:
                module = bnb.nn.Linear4bit(*shape, bias=linear.bias is not None, compute_dtype=compute_dtype,
                                           compress_statistics=double_quant, quant_type=kind, device="meta")
        with torch.no_grad():
            if kind == "int8":
                codes, scales, _ = F.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
                weight = nn.Parameter(codes, requires_grad=False)
                weight.CB, weight.SCB = codes, scales
            else:
                packed, state = _quantize_4bit(linear.weight.detach(), kind, double_quant)
                weight = nn.Parameter(packed, requires_grad=False)
                weight.quant_state = state
        module.weight = weight
        if linear.bias is not None:
            module.bias = linear.bias
        _swap(model, name, module)


def _quantize_4bit(weight: torch.Tensor, kind: str, double_quant: bool):
    """bitsandbytes' quantize_4bit (blocks of 64), its double quantization spelled out: the code
    of the scales' 8-bit quantization is built on real tensors (bitsandbytes builds it from Python
    numbers, which a fake tensor has none of) and handed in. Returns (packed weight, quant_state)."""
    import bitsandbytes.functional as F
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=kind)
    if double_quant:
        with unset_fake_temporarily():
            code = F.create_dynamic_map().to(weight.device)
        fake_mode = detect_fake_mode()
        if fake_mode is not None:
            code = fake_mode.from_tensor(code)
        offset = state.absmax.mean()
        scales, state2 = F.quantize_blockwise(state.absmax - offset, code=code, blocksize=256)
        state = F.QuantState(absmax=scales, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                             code=state.code, quant_type=kind, offset=offset, state2=state2)
    return packed, state


class _PackedOffset(float):
    """A stand-in for a fake offset that packs as a number (the value is irrelevant to sizes)."""

    def item(self) -> float:
        return float(self)


@contextlib.contextmanager
def _packable_quantization_state(model):
    """A state dict of a double-quantized 4-bit layer packs the scales' offset as a Python number
    (``offset.item()``), which a fake offset has not: each fake offset is swapped for a number
    while the state dict is taken."""
    from torch._subclasses.fake_tensor import FakeTensor

    from ..nn.bnb_base import Bnb4bitBase

    states = [base.quant_state for base in _quantized_bases(model) if isinstance(base, Bnb4bitBase)]
    fake = [s for s in states if s.nested and isinstance(s.offset, FakeTensor)]
    offsets = [s.offset for s in fake]
    try:
        for state in fake:
            state.offset = _PackedOffset(0.0)
        yield
    finally:
        for state, offset in zip(fake, offsets):
            state.offset = offset


def _quantized_bases(model) -> list:
    """The quantized base of every bitsandbytes layer and every spft layer built on one."""
    from ..nn.bnb_base import quantized_base_for

    bases = [getattr(m, "quantized_base", None) or quantized_base_for(m) for m in model.modules()]
    return [base for base in bases if base is not None]


def _quantization_state(model) -> list[torch.Tensor]:
    """The tensors of every quantized base that are neither parameters nor buffers (scales, codes)."""
    return [t for base in _quantized_bases(model) for t in base.state_tensors()]


def _swap(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- methods ------------------------------------------------------------------------------------
# Each maker converts the model in place. Positions are evenly spread (valid, of the right size),
# installed without the validation pass, which reads values (a fake tensor has none).


def _full(model, args):
    if getattr(args, "quantize", None):
        raise MethodUnavailable("full fine-tuning trains W0 itself, which a quantized base cannot hold")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(model, args):
    try:
        import peft
    except ImportError as error:
        raise MethodUnavailable(f"peft is not installed ({error})") from None
    names = list(_targets(model))
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=names)
    return peft.get_peft_model(model, config)


def _sparse_entries(model, args):
    targets = _targets(model)
    density = lora_equivalent_params(targets, args.rank) / sum(m.out_features * m.in_features for m in targets.values())
    for name, linear in targets.items():
        out_f, in_f = linear.out_features, linear.in_features
        nnz = min(out_f * in_f, round(density * out_f * in_f))
        layer = _trusted(SparseDeltaLinear, linear, args.mode, name)
        spread = torch.arange(nnz, dtype=torch.int64) * (out_f * in_f // max(nnz, 1))  # valid, evenly spread
        layer._install(SparseIndex(spread.to(index_dtype_for(out_f, in_f)), out_f, in_f), None)
        _swap(model, name, layer)
    return model


def _rows(model, args):
    for name, linear in _targets(model).items():
        out_f, in_f = linear.out_features, linear.in_features
        count = min(out_f, round(args.rank * (in_f + out_f) / in_f))
        layer = _trusted(RowSparseLinear, linear, args.mode, name)
        layer._install(torch.arange(count, dtype=torch.int64), None)
        _swap(model, name, layer)
    return model


def _pst(model, args):
    if getattr(args, "quantize", None):
        raise MethodUnavailable("PST prunes W0 itself, which needs a dense base")
    rank = max(0, (args.rank - 1) // 2)
    for name, linear in _targets(model).items():
        _swap(model, name, PSTLinear.from_linear(linear, 0.5, r1=rank, r2=rank, name=name))
    return model


def _block(model, args):
    """64 x 64 blocks, per layer the count closest to LoRA's budget, evenly spread. The block
    index is derived on real tensors (its slot groups read ids on the host) and then faked."""
    try:
        from ..nn.block_sparse_linear import BlockSparseLinear
        from ..ops.block_index import BlockIndex, block_grid
    except ImportError:
        raise MethodUnavailable("spft.BlockSparseLinear is not in this version") from None
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode()
    size = (64, 64)
    for name, linear in _targets(model).items():
        out_f, in_f = linear.out_features, linear.in_features
        rows, cols = block_grid(out_f, in_f, size)
        count = max(1, min(rows * cols, round(args.rank * (in_f + out_f) / (size[0] * size[1]))))
        with unset_fake_temporarily():
            index = BlockIndex.from_canonical(torch.arange(count) * (rows * cols // count), out_f, in_f, size)
        if fake_mode is not None:
            index = _faked(index, fake_mode)
        layer = _trusted(BlockSparseLinear, linear, args.mode, name, block_size=size)
        layer._install(index, None)
        _swap(model, name, layer)
    return model


def _faked(value, fake_mode):
    """A dataclass of tensors (nested) with every tensor turned into a fake one."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _faked(getattr(value, f.name), fake_mode)
                                             for f in dataclasses.fields(value)})
    return value


def _trusted(cls, linear, mode, name, **options):
    """A layer on ``linear``'s weight with no positions yet (``_install`` adds them); over a
    quantized base (packed integers), in split mode (the only one there)."""
    dense = linear.weight.is_floating_point()
    layer = cls(linear.in_features, linear.out_features, None, bias=linear.bias is not None, device="meta",
                dtype=linear.weight.dtype if dense else None, mode=mode if dense else "split", name=name, **options)
    layer._share_base(linear)  # the weight and bias shared, the base kind adopted
    return layer


METHODS: dict[str, Callable] = {
    "full": _full,
    "lora": _lora,
    "sparta": _sparse_entries,
    "speft": _sparse_entries,
    "spruft": _rows,
    "pst": _pst,
    "block": _block,
}


# --- measuring ----------------------------------------------------------------------------------


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _optimizer(params, kind: str):
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(params, lr=1e-5, **options)


def measure_method(method: str, config, args, *, fake: bool = True) -> dict:
    """One row: the step's peak and its breakdown for ``method`` (bytes). ``fake=False`` runs the
    same measurement on real tensors (to check the fake one on a small model)."""
    with fake_tensors() if fake else contextlib.nullcontext(), accelerator_paths():
        model = build_model(config, args.dtype)
        shapes = {(m.out_features, m.in_features) for m in _targets(model).values()}
        quantize = getattr(args, "quantize", None)
        if quantize:
            quantize_targets(model, quantize, args.dtype, getattr(args, "double_quant", True))
        model = METHODS[method](model, args)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(trainable, args.optimizer)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))

        def step():
            _loss(model, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # steady state: optimizer state, merged layers, cached thresholds
        quantization_state = _quantization_state(model)
        weights = _bytes(list(model.parameters()) + list(model.buffers()) + quantization_state)
        trainable_bytes = _bytes(trainable)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        optimizer_bytes = _bytes(state)
        at_peak = {}

        def on_peak():
            at_peak["grads"] = _bytes([p.grad for p in trainable])

        smallest = min(math.prod(s) for s in shapes)
        with TensorMemoryTracker(baseline=list(model.parameters()) + list(model.buffers()) + quantization_state + state,
                                 record_at_least=smallest, on_peak=on_peak) as tracker:
            step()
        trainable_shapes = {tuple(p.shape) for p in trainable}
        weight_shaped = sorted({s for s in tracker.large_shapes
                                if (s in shapes or s[::-1] in shapes) and s not in trainable_shapes})
        with _packable_quantization_state(model), TensorMemoryTracker(record_at_least=smallest) as saving:
            checkpoint = model.state_dict()
            checkpoint_keys = len(checkpoint)
            del checkpoint
        grads = at_peak.get("grads", 0)
        peak = tracker.peak_bytes
        count = sum(p.numel() for p in trainable)
        return {
            "op": "train_step_memory",
            "method": method,
            "mode": (("split" if quantize else args.mode) if method in ("sparta", "speft", "spruft", "block") else None),
            "quantize": _quantization_name(args) if quantize else None,
            "trainable_params": count,
            "weights_bytes": weights,
            "trainable_bytes": trainable_bytes,
            "grads_at_peak_bytes": grads,
            "optimizer_bytes": optimizer_bytes,
            "activations_at_peak_bytes": peak - weights - optimizer_bytes - grads,
            "peak_bytes": peak,
            "largest_allocation": list(tracker.largest_shape),
            "largest_allocation_op": tracker.largest_op,
            "weight_shaped_temporaries": [list(s) for s in weight_shaped],
            "state_dict_alloc_bytes": saving.peak_bytes,
            "state_dict_weight_shaped": [list(s) for s in saving.large_shapes],
            "state_dict_keys": checkpoint_keys,
        }


def measure_selection(config, args) -> dict:
    """SPEFT's selection: gradient salience over one batch, scores on the device vs off it."""
    from ..masks.salience import salience_scores

    rows = {}
    for where, score_device in (("device", None), ("cpu", "meta")):
        with fake_tensors():
            model = build_model(config, args.dtype)
            if getattr(args, "quantize", None):  # scored from x and dy (masks/quantized_scores.py)
                quantize_targets(model, args.quantize, args.dtype, getattr(args, "double_quant", True))
            ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
            params = list(model.parameters()) + list(model.buffers()) + _quantization_state(model)
            with TensorMemoryTracker(baseline=params) as tracker:
                scores = salience_scores(model, [ids], _loss, "gradient", score_device=score_device, progress=False)
                del scores
            rows[where] = tracker.peak_bytes
    return {"op": "selection_memory", "method": "speft", "metric": "gradient",
            "peak_scores_on_device_bytes": rows["device"], "peak_scores_on_cpu_bytes": rows["cpu"]}


# --- the report ---------------------------------------------------------------------------------


def entry_bytes(row: dict, base_weights: int) -> Optional[float]:
    """Persistent bytes per trainable parameter: its value, gradient, optimizer state and the
    method's own buffers (index, W0 at the positions), i.e. everything beyond the base model."""
    if not row["trainable_params"] or row["method"] == "full":
        return None
    extra = row["weights_bytes"] - base_weights + row["trainable_bytes"] + row["optimizer_bytes"]
    return extra / row["trainable_params"]


def gib(nbytes: int) -> str:
    """GiB with at least 3 significant digits (a small model's 0.000118, not 0.00), and 2 decimals
    from 1 GiB up (the README's 17.71)."""
    value = nbytes / GIB
    if value == 0:
        return "0"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def count(params: int) -> str:
    """A parameter count: 159.9M from a million up, else exact (34,816)."""
    return f"{params / 1e6:.1f}M" if params >= 1_000_000 else f"{params:,}"


def format_table(rows: list[dict], selection: Optional[dict], header: str) -> str:
    lora = next((r for r in rows if r["method"] == "lora"), None)
    base = next((r["weights_bytes"] - r["trainable_bytes"] for r in rows if r["method"] != "full"), None)
    lines = [header, "",
             "| method | trainable | weights | grads | optimizer | activations+temps | peak (GiB) | vs LoRA | "
             "B/param | state_dict() allocates | out×in temporaries |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} |||||||||")
            continue
        ratio = f"{r['peak_bytes'] / lora['peak_bytes']:.3f}×" if lora and "peak_bytes" in lora else ""
        per = entry_bytes(r, base) if base is not None else None
        name = r["method"] + (f" ({r['mode']})" if r.get("mode") else "")
        lines.append(
            f"| {name} | {count(r['trainable_params'])} | {gib(r['weights_bytes'])} | "
            f"{gib(r['grads_at_peak_bytes'])} | {gib(r['optimizer_bytes'])} | "
            f"{gib(r['activations_at_peak_bytes'])} | **{gib(r['peak_bytes'])}** | {ratio} | "
            f"{'' if per is None else f'{per:.1f}'} | {r['state_dict_alloc_bytes'] / 2**20:.3g} MiB | "
            f"{'none' if not r['weight_shaped_temporaries'] else r['weight_shaped_temporaries']} |"
        )
    if selection is not None:
        lines += ["", f"SPEFT selection (gradient salience, one batch): peak {gib(selection['peak_scores_on_device_bytes'])} "
                  f"GiB with fp32 scores on the device, {gib(selection['peak_scores_on_cpu_bytes'])} GiB with "
                  "score_device='cpu'."]
    lines += ["", "GiB = 2^30 bytes. Grads and activations are what is alive at the peak. B/param: value + gradient + "
              "optimizer state + the method's buffers per trainable parameter. Not counted: " + "; ".join(NOT_COUNTED) + "."]
    return "\n".join(lines)


def run(args, env: dict) -> tuple[list[dict], Optional[dict]]:
    config = load_model_config(args.model_config)
    rows = []
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        raise ValueError(f"spft-bench --memory: unknown method {unknown[0]!r}; choose from {sorted(METHODS)}")
    for method in progress_bar(args.methods, desc="spft-bench --memory", unit="method", total=len(args.methods)):
        try:
            with known_noise():
                row = measure_method(method, config, args)
        except MethodUnavailable as reason:
            row = {"op": "train_step_memory", "method": method, "skipped": str(reason)}
        row.update(model_config=os.path.basename(args.model_config), rank=args.rank, batch=args.batch, seq=args.seq,
                   dtype=str(args.dtype).replace("torch.", ""), optimizer=f"adamw-{args.optimizer}",
                   **{k: env[k] for k in ("torch", "peft", "commit", "date")},
                   device="cpu FakeTensorMode estimate (no GPU)", not_counted=list(NOT_COUNTED))
        rows.append(row)
        print(f"  {method}: " + (f"skipped ({row['skipped']})" if "skipped" in row else
                                 f"peak {gib(row['peak_bytes'])} GiB"), flush=True)
    with known_noise():
        selection = measure_selection(config, args) if "speft" in args.methods else None
    if selection is not None:
        selection.update({k: rows[0][k] for k in ("model_config", "batch", "seq", "dtype", "torch", "commit", "date",
                                                  "device", "not_counted")})
    return rows, selection


def write(rows: list[dict], selection: Optional[dict], table: str, output: str, command: str) -> list[str]:
    os.makedirs(output, exist_ok=True)
    records = rows + ([selection] if selection else [])
    for record in records:
        record["command"] = command
    paths = [os.path.join(output, "memory.json"), os.path.join(output, "summary.md")]
    with open(paths[0], "w") as handle:
        json.dump(records, handle, indent=1)
    with open(paths[1], "w") as handle:
        handle.write(table + f"\n\nCommand: `{command}`\n")
    return paths


def _quantization_name(args) -> str:
    dq = args.quantize != "int8" and getattr(args, "double_quant", True)
    return args.quantize + ("+dq" if dq else "")


def main(args, env: dict) -> int:
    """``spft-bench --memory`` (arguments parsed by benchmark.py)."""
    import shlex
    import sys

    print(f"spft-bench --memory: {args.model_config}, {', '.join(args.methods)}, rank {args.rank}, "
          f"{args.batch}x{args.seq} tokens, {str(args.dtype).replace('torch.', '')}, AdamW ({args.optimizer}), "
          f"mode {args.mode}; fake tensors on the CPU", flush=True)
    rows, selection = run(args, env)
    quantize = getattr(args, "quantize", None)
    layers = (f"sparse layers in {args.mode} mode" if not quantize else
              f"target linears in bitsandbytes {_quantization_name(args)} (lora = QLoRA), sparse layers split")
    header = (f"Peak memory of one training step (GiB), {os.path.basename(args.model_config)}, "
              f"{str(args.dtype).replace('torch.', '')}, {args.batch}x{args.seq} tokens, AdamW ({args.optimizer}), "
              f"rank {args.rank}, {layers} (torch {env['torch']}, commit {env['commit']})")
    table = format_table(rows, selection, header)
    print(table)
    if not args.output:  # nothing is written into the working directory unless asked
        print("(not saved: --output DIR writes memory.json and summary.md there)")
        return 0
    command = "spft-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("wrote " + ", ".join(write(rows, selection, table, args.output, command)))
    return 0
