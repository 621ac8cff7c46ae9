"""Frozen bases held in bitsandbytes storage: ``Linear4bit`` (nf4 / fp4, with or without double
quantization of the block scales) and ``Linear8bitLt`` (LLM.int8(), row-wise scales), the base
that QLoRA users train on. Two parts:

- ``Bnb4bitBase`` / ``Bnb8bitBase``: a view on one bitsandbytes layer's weight
  (``quantized_base_for(linear)``), kept on an spft layer as ``layer.quantized_base``;
- ``Bnb4bitKind`` / ``Bnb8bitKind``: the registered frozen-base kinds (``frozen_base.py``), which
  answer a layer's questions through its view.

What such a base lets a layer do with W0:

- a dense W0 for one GEMM: ``dequantize`` (what bitsandbytes makes for its own GEMM), into which
  a delta layer adds Δ for the call (``ops/delta_term.py``); ``base_forward`` is bitsandbytes'
  own matmul (bias included, a gradient for x only), for a layer that adds a term to it;
- merged mode is impossible: it writes ``W0 + Δ`` into the weight, and 4 or 8 bits a value cannot
  hold it (``merge_refusal``); a kind that needs a dense W0 (PST) is refused (``refusal_for``);
- a dense W0 exists only on request (``dequantize``: the whole weight or a band of rows, a new
  tensor in the compute dtype, for a layer's GEMM, ``to_linear`` and selection), never kept;
- ``read`` gives W0 at flat positions (the exact fp32 products, for fingerprints) without
  dequantizing anything else (O(positions));
- ``describe`` is what an adapter records so that it is not loaded onto a base quantized another
  way (``check_compatible``); ``requantize`` stores a merged dense weight the same way again.

W0 is ``dequant(Wq)`` rounded to the compute dtype, which is what bitsandbytes multiplies by:
4-bit dequantizes in fp32 (code value x block scale), rounds to the dtype the weight was quantized
from and casts; 8-bit multiplies the int8 row in the input dtype by ``SCB / 127`` (its CPU/XPU
training path, ``MatMul8bitFp``).

``bitsandbytes`` is imported only when a bitsandbytes layer exists (``matches`` looks the class up
in the already imported module), so this package imports without it.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from .frozen_base import FrozenBase, register_base_kind

_MERGE_REFUSAL = (
    "{layer}: the base weight is quantized ({what}); merged mode writes W0 + delta into the weight, and a "
    "quantized weight cannot hold it: use mode='split' (or 'auto', which picks split)"
)


def _bnb_class(name: str):
    """The bitsandbytes class ``name`` when bitsandbytes is already imported (a bitsandbytes
    layer exists only then), else None."""
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, name, None) if module is not None else None


class QuantizedBase:
    """What the two bitsandbytes kinds share. ``module`` is the bitsandbytes layer; its weight and
    bias Parameters are the ones the spft layer holds (shared, never copied), read at each call."""

    _CLASS = ""

    def __init__(self, module: nn.Linear) -> None:
        if not self.matches(module):
            raise TypeError(f"{type(self).__name__} wraps a bitsandbytes {self._CLASS}, got {type(module).__name__}")
        self.module = module

    @classmethod
    def matches(cls, linear) -> bool:
        bnb_class = _bnb_class(cls._CLASS)
        return bnb_class is not None and isinstance(linear, bnb_class)

    # --- the interface a layer uses --------------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.module.bias

    @property
    def shape(self) -> tuple[int, int]:
        return (self.module.out_features, self.module.in_features)

    def merge_refusal(self, layer_name: str) -> Optional[str]:
        return _MERGE_REFUSAL.format(layer=layer_name, what=self.summary())

    def _bias_for(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        # A cast copy: bitsandbytes' own forward rewrites bias.data in the input dtype, which
        # the model (and a state dict of it) would observe.
        bias = self.bias
        return None if bias is None else bias.to(dtype)

    def read(self, flat: torch.Tensor) -> torch.Tensor:
        """W0 at the flat positions ``flat`` (row * in + col): the exact fp32 product of code and
        scale, whatever the compute dtype (the quantized storage is what identifies the base, e.g.
        in an adapter's fingerprint); O(positions)."""
        flat = flat.long().to(self.weight.device)
        rows = torch.div(flat, self.shape[1], rounding_mode="floor")
        return self._read(flat, rows)

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())

    def check_compatible(self, described: Optional[dict]) -> Optional[str]:
        """Why an adapter trained on the base ``described`` (its ``describe()``) does not fit this
        one (None: it fits). Deltas are relative to the dequantized base they trained on, so a
        base quantized another way (or a dense one: ``described`` None) gives other W0 values."""
        mine = self.describe()
        if described is None:
            return f"the adapter was trained on a dense base, this base is quantized ({self.summary()})"
        differing = [f"{k}: {described.get(k)!r} in the adapter, {v!r} here" for k, v in mine.items()
                     if k != "compute_dtype" and described.get(k) != v]
        return None if not differing else "the base is quantized differently (" + "; ".join(differing) + ")"

    def state_dict_extras(self, prefix: str, keep_vars: bool) -> dict:
        """The keys bitsandbytes writes next to ``weight`` and ``bias`` (its quantization state), so
        that a converted model's state dict holds the base in bitsandbytes' own checkpoint form."""
        return {prefix + key: value if keep_vars else value.detach() for key, value in self._extras().items()}

    def load_problem(self, state_dict: dict, prefix: str) -> Optional[str]:
        """Why a state dict cannot load into a layer on this base (None: it can). The layer keeps
        its quantized W0: a state dict must hold the same one (or none), since loading bytes into
        the packed weight would pair them with this base's scales."""
        own = {"weight": self.weight.data, **self._extras()}
        for key, value in own.items():
            incoming = state_dict.get(prefix + key)
            if incoming is None:
                continue
            if not isinstance(incoming, torch.Tensor) or incoming.shape != value.shape or \
                    incoming.dtype != value.dtype or not torch.equal(incoming.to(value.device), value):
                return (f"{prefix + key} differs from this layer's quantized base ({self.summary()}); a layer over a "
                        "quantized base loads only its delta and positions (load the base with transformers, the "
                        "training with load_adapter)")
        return None

    def requantize(self, linear: nn.Linear) -> nn.Module:
        """A new bitsandbytes layer of this base's class and settings holding ``linear``'s weight
        (e.g. dequant(Wq) + Δ) quantized again, on this base's device. Quantizing rounds again: the
        result is not W0 + Δ exactly (the deltas are far below a 4-bit step)."""
        layer = self._empty_like(linear)
        layer.load_state_dict({"weight": linear.weight.detach().cpu(), **(
            {"bias": linear.bias.detach().cpu()} if linear.bias is not None else {})})
        return layer.to(self.weight.device)  # (bitsandbytes quantizes when it moves the layer)

    def _check_rows(self, rows) -> tuple[int, int]:
        out_features = self.shape[0]
        if rows is None:
            return 0, out_features
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop = rows.start or 0, out_features if rows.stop is None else rows.stop
            if 0 <= start <= stop <= out_features:
                return start, stop
        raise ValueError(f"dequantize: rows must be a slice start:stop within 0..{out_features}, got {rows!r}")


class Bnb4bitBase(QuantizedBase):
    """A ``bitsandbytes.nn.Linear4bit`` base (nf4 or fp4; blocks of ``blocksize`` consecutive
    values of the row-major weight share one absmax scale, itself 8-bit quantized with double
    quantization)."""

    _CLASS = "Linear4bit"

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self._unpack_cpu_format()

    def _unpack_cpu_format(self) -> None:
        """Back to bitsandbytes' canonical packing. On a CPU with AVX512-BF16, Linear4bit's own
        forward in eval mode without grad repacks the weight in place for its inference kernel
        (``packing_format_for_cpu``; scales in bf16, double quantization expanded), which has no
        backward and which dequantize does not read; bitsandbytes itself undoes it the same way
        before saving a state dict."""
        weight = self.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            self.module.quant_state = weight.quant_state

    @property
    def quant_state(self):
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            state = getattr(self.module, "quant_state", None)  # bitsandbytes keeps a copy on the module
        if state is None:
            raise ValueError(
                f"{type(self.module).__name__}: the weight is not quantized yet (no quant_state); move the layer to "
                "its device (which quantizes it) before wrapping it"
            )
        if state.absmax.device != self.weight.device:
            # The layer was moved: Module._apply moves the weight Parameter's data, not the state
            # bitsandbytes hangs on it (its own Linear4bit repairs this in its forward too).
            state.to(self.weight.device)
        return state

    @property
    def compute_dtype(self) -> torch.dtype:
        # None until the module's first forward picks it from the input; bitsandbytes then uses
        # the dtype the weight was quantized from, which is what dequantize returns.
        return self.module.compute_dtype or self.quant_state.dtype

    def describe(self) -> dict:
        state = self.quant_state
        return {"quantization": "bitsandbytes-4bit", "quant_type": state.quant_type, "blocksize": int(state.blocksize),
                "double_quant": bool(state.nested), "compute_dtype": str(self.compute_dtype).replace("torch.", "")}

    def _extras(self) -> dict:
        return {"weight." + key: value for key, value in self.quant_state.as_dict(packed=True).items()}

    def _empty_like(self, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        state = self.quant_state
        return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 compute_dtype=self.module.compute_dtype, compress_statistics=bool(state.nested),
                                 quant_type=state.quant_type, quant_storage=self.weight.dtype)

    def state_tensors(self) -> list[torch.Tensor]:
        """The quantization state's tensors (scales, codes), which are neither parameters nor buffers."""
        state = self.quant_state
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        return [t for t in tensors if isinstance(t, torch.Tensor)]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' 4-bit matmul ``x dequant(Wq)ᵀ + b`` in the compute dtype, returned in x's
        dtype; differentiable in x only (the weight is frozen storage)."""
        import bitsandbytes as bnb

        self._unpack_cpu_format()  # (an eval forward of the original module may have run since)
        dtype = self.compute_dtype
        x_in = x.to(dtype)
        return bnb.matmul_4bit(x_in, self.weight, bias=self._bias_for(dtype), quant_state=self.quant_state).to(x.dtype)

    def _absmax(self) -> torch.Tensor:
        """The fp32 scale of every block (double quantization: dequantized from its 8 bits)."""
        state = self.quant_state
        if not state.nested:
            return state.absmax.float()
        import bitsandbytes.functional as F

        return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()

    def dequantize(self, rows: Optional[slice] = None) -> torch.Tensor:
        """W0 (rows ``start:stop`` of it, or all) in the compute dtype: a new tensor, computed from
        only the blocks that cover the rows, rounded as bitsandbytes does (fp32 products, to the
        dtype the weight was quantized from, to the compute dtype)."""
        start, stop = self._check_rows(rows)
        out_features, in_features = self.shape
        if (start, stop) == (0, out_features):
            import bitsandbytes.functional as F

            return F.dequantize_4bit(self.weight.data, self.quant_state).to(self.compute_dtype)
        flat = torch.arange(start * in_features, stop * in_features, device=self.weight.device)
        values = self._read(flat, None).to(self.quant_state.dtype)
        return values.view(stop - start, in_features).to(self.compute_dtype)

    def _read(self, flat: torch.Tensor, rows) -> torch.Tensor:
        # Two values a byte, the first in the high nibble; value = code[nibble] * absmax[block], fp32.
        state = self.quant_state
        packed = self.weight.data.view(torch.uint8).reshape(-1)
        byte = packed.index_select(0, torch.div(flat, 2, rounding_mode="floor")).to(torch.int32)
        nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
        absmax = self._absmax()
        block = torch.div(flat, state.blocksize, rounding_mode="floor")
        return state.code.float().to(flat.device)[nibble] * absmax.index_select(0, block)


class Bnb8bitBase(QuantizedBase):
    """A ``bitsandbytes.nn.Linear8bitLt`` base with int8 weights (``has_fp16_weights=False``):
    ``W0 = CB * SCB[:, None] / 127`` (one scale a row)."""

    _CLASS = "Linear8bitLt"

    def __init__(self, module: nn.Linear, compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(module)
        if module.state.has_fp16_weights:
            raise ValueError(
                "Linear8bitLt with has_fp16_weights=True keeps a float weight that bitsandbytes trains itself; "
                "sparse fine-tuning needs a frozen int8 base (has_fp16_weights=False, what load_in_8bit gives)"
            )
        self.scales()  # checks that the weight is quantized
        # The dtype the non-quantized parts compute in (8-bit has no compute_dtype of its own):
        # the bias's, else fp32; forwards follow the input's dtype.
        bias = module.bias
        self._compute_dtype = compute_dtype or (bias.dtype if bias is not None else torch.float32)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def scales(self) -> torch.Tensor:
        """SCB [out]: each row's absmax (bitsandbytes moves it from the weight to the module's
        matmul state on the first forward)."""
        scb = getattr(self.weight, "SCB", None)
        if scb is None:
            scb = self.module.state.SCB
        if scb is None or self.weight.dtype != torch.int8:
            raise ValueError(
                "Linear8bitLt: the weight is not quantized yet (no SCB); move the layer to its device (which "
                "quantizes it) before wrapping it"
            )
        return scb

    def describe(self) -> dict:
        return {"quantization": "bitsandbytes-8bit", "threshold": float(self.module.state.threshold),
                "compute_dtype": str(self.compute_dtype).replace("torch.", "")}

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.scales()]

    def _empty_like(self, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   has_fp16_weights=False, threshold=float(self.module.state.threshold))

    def _extras(self) -> dict:
        # As Linear8bitLt._save_to_state_dict: the row scales and the (row-major) format flag.
        return {"SCB": self.scales(), "weight_format": torch.tensor(0, dtype=torch.uint8)}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' int8 matmul ``x dequant(Wq)ᵀ + b`` (its own path: on CPU/XPU in training
        the dequantized row-scaled weight in x's dtype); differentiable in x only."""
        import bitsandbytes as bnb

        module = self.module
        module.state.is_training = module.training
        if module.weight.CB is not None:
            module.init_8bit_state()  # bitsandbytes' bookkeeping: CB/SCB move into the matmul state
        return bnb.matmul(x, module.weight, bias=self._bias_for(x.dtype), state=module.state)

    def dequantize(self, rows: Optional[slice] = None) -> torch.Tensor:
        start, stop = self._check_rows(rows)
        dtype = self.compute_dtype
        # As MatMul8bitFp: the int8 rows in the compute dtype times the fp32 SCB / 127, rounded once.
        return self.weight.data[start:stop].to(dtype).mul_(self.scales()[start:stop].unsqueeze(1).mul(1.0 / 127.0))

    def _read(self, flat: torch.Tensor, rows) -> torch.Tensor:
        codes = self.weight.data.reshape(-1).index_select(0, flat).to(torch.float32)
        return codes.mul_(self.scales().index_select(0, rows).mul(1.0 / 127.0))


QUANTIZED_BASE_KINDS = (Bnb4bitBase, Bnb8bitBase)


def quantized_base_for(linear) -> Optional[QuantizedBase]:
    """The quantized weight of ``linear`` (a view on its bitsandbytes storage), or None for a
    layer no kind here matches (a plain ``nn.Linear``)."""
    for kind in QUANTIZED_BASE_KINDS:
        if kind.matches(linear):
            return kind(linear)
    return None


# --- the registered frozen-base kinds ------------------------------------------------------------


class _QuantizedKind(FrozenBase):
    """A quantized frozen-base kind: the layer keeps the view of its weight (``QuantizedBase``,
    holding the bitsandbytes layer) as ``layer.quantized_base``, and every method asks it."""

    _WEIGHT: type = QuantizedBase

    @classmethod
    def matches(cls, linear: nn.Module) -> bool:
        return cls._WEIGHT.matches(linear)

    @classmethod
    def _of(cls, layer) -> QuantizedBase:
        if cls._WEIGHT.matches(layer):  # the bitsandbytes layer itself (a model not converted yet)
            return cls._WEIGHT(layer)
        view = getattr(layer, "quantized_base", None)
        if view is None:
            raise ValueError(f"{layer.layer_name}: a {cls.name} base was not adopted (build the layer with from_linear)")
        return view

    @classmethod
    def refusal_for(cls, linear, layer_cls: type, mode: str, layer_name: str) -> Optional[str]:
        view = cls._WEIGHT(linear)
        if layer_cls.dense_w0_reason is not None:
            return (f"{layer_name}: a {layer_cls.kind or layer_cls.__name__!r} layer cannot train over a quantized base "
                    f"({view.summary()}): {layer_cls.dense_w0_reason}. Over a quantized base train entries (speft, "
                    "sparta), rows (spruft) or blocks")
        if mode == "merged":
            return view.merge_refusal(layer_name)
        if mode == "fused":
            return (f"{layer_name}: mode='fused' adds the delta into the tiles of a dense weight GEMM; the base weight "
                    f"is quantized ({view.summary()}): use mode='split' (or 'auto')")
        return None

    @classmethod
    def adopt(cls, layer, linear) -> None:
        layer.quantized_base = cls._WEIGHT(linear)

    @classmethod
    def merge_refusal(cls, layer) -> Optional[str]:
        return cls._of(layer).merge_refusal(layer.layer_name)

    @classmethod
    def weight_for_ops(cls, layer) -> None:
        return None

    @classmethod
    def base_forward(cls, layer, x: torch.Tensor) -> torch.Tensor:
        return cls._of(layer).base_forward(x)

    @classmethod
    def read(cls, layer, flat: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return cls._of(layer).read(flat)

    @classmethod
    def dense(cls, layer) -> torch.Tensor:
        return cls._of(layer).dequantize()

    @classmethod
    def describe(cls, layer) -> dict:
        return cls._of(layer).describe()

    @classmethod
    def check_compatible(cls, layer, described: Optional[dict]) -> Optional[str]:
        return cls._of(layer).check_compatible(described)

    @classmethod
    def requantize(cls, layer, linear: nn.Linear) -> nn.Module:
        return cls._of(layer).requantize(linear)

    @classmethod
    def state_dict_extras(cls, layer, prefix: str, keep_vars: bool) -> dict:
        return cls._of(layer).state_dict_extras(prefix, keep_vars)

    @classmethod
    def load_problem(cls, layer, state_dict: dict, prefix: str) -> Optional[str]:
        return cls._of(layer).load_problem(state_dict, prefix)


@register_base_kind
class Bnb4bitKind(_QuantizedKind):
    name = "bnb-4bit"
    _WEIGHT = Bnb4bitBase


@register_base_kind
class Bnb8bitKind(_QuantizedKind):
    name = "bnb-8bit"
    _WEIGHT = Bnb8bitBase
