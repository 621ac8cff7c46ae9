"""``SpftConfig``: how ``get_spft_model`` converts a model (the peft-style entry point: a config,
one call that converts a model, a printout of the trainable parameters, the way back).

    config = spft.SpftConfig(method="speft", match_lora_rank=8, modules_to_save=["classifier"])
    model = spft.get_spft_model(model, config, batches=calib_batches, loss_fn=loss_fn)
    spft.print_trainable_parameters(model)
    ...train with any loop, transformers.Trainer, DDP...
    spft.save_adapter(model, "adapter.safetensors")        # adapter/save.py
    model = spft.merge_and_unload(model)                    # plain nn.Linear layers holding W0 + Δ

Methods (``SpftConfig.method``) and how positions are chosen:

========  =====================  ==================================================================
method    layer                  positions
========  =====================  ==================================================================
speft     SparseDeltaLinear      top entries of a salience score (``salience_scores`` +
                                 ``select_topk``); ``metric`` default ``"gradient"`` (the SPEFT
                                 paper's recommendation), global or local scope
sparta    SparseDeltaLinear      uniformly random entries (``random_indices``); ``metric`` is
                                 always ``"random"``
spruft    RowSparseLinear        top rows of each layer by neuron importance (``row_importance`` +
                                 ``select_rows``); ``metric`` default ``"l2"``: the SPruFT paper uses
                                 the neuron's ℓ2 norm for LLMs (no data, no memory beyond the model);
                                 ``"taylor"``/``"qm_taylor"`` score slightly better in its ablations
                                 but cost a gradient pass. Rows are always chosen per layer.
pst       PSTLinear              none: PST trains low-rank factors and prunes W0 to ``sparsity``
                                 with a learned top-v mask (``metric`` is always ``"magnitude"``:
                                 the mask starts as the magnitude top-v of W0). Data-free.
========  =====================  ==================================================================

With ``block_size=(bh, bw)``, speft and sparta train whole blocks instead (``BlockSparseLinear``:
``select_blocks`` ranks blocks by their summed scores, ``random_blocks`` draws them), "select
sparsely, compute densely" as S2FT and SMT do.

The budget is exactly one of ``density`` (fraction of the target weights), ``num_params`` (a
total) or ``match_lora_rank=r`` (as many as a rank-r LoRA on the same modules, ``Σ r·(in+out)``).
For spruft, whole rows are trained, so the count is met to within rounding to whole rows per layer.

PST's trainable count is fixed by its ranks, ``(n + k)(r1 + r2 + 1)`` per [n, k] layer, so it
takes no ``density`` / ``num_params``: give ``pst_r1`` / ``pst_r2`` (default 8 / 8) or
``match_lora_rank=r``, which picks ``r1 = r2 = max(0, (r - 1) // 2)`` (the largest equal ranks
with ``(n + k)(r1 + r2 + 1) <= r(n + k)``, i.e. at most a rank-r LoRA's count; odd r matches it
exactly). ``sparsity`` is the final target sparsity; the layers start at sparsity 0 (so the
converted model computes exactly what the original did) and a training loop raises it with
``set_pst_sparsity(model, cubic_sparsity(step, total_steps, config.sparsity))``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping, Optional, Union

from ..masks.row_importance import METRICS as ROW_METRICS
from ..masks.row_importance import _DATA_METRICS as ROW_DATA_METRICS
from ..masks.salience import DATA_FREE_METRICS, METRICS as SALIENCE_METRICS
from ..nn.delta_layer import MODES
from ..nn.registry import kind_class
from ..ops._guards import as_float, as_int, describe
from ..ops.block_index import check_block_size
from ..ops.backends import check_backend_name
from .json_input import loads_json


@dataclasses.dataclass(frozen=True)
class _Method:
    """What a config may say for a method: its metrics (and which need data) and scopes."""

    metrics: tuple
    default_metric: str
    data_metrics: tuple
    scopes: tuple


@dataclasses.dataclass
class SpftConfig:
    """How ``get_spft_model`` converts a model (serialises to JSON; stored in adapter files).

    Args:
        method: ``"speft"``, ``"sparta"``, ``"spruft"`` or ``"pst"``.
        density / num_params / match_lora_rank: the trainable budget, exactly one of them: a
            fraction in (0, 1] of the target weights, a number of parameters, or the parameter
            count of a rank-r LoRA on the same modules. pst: no density / num_params (its count
            is fixed by the ranks); ``match_lora_rank=r`` sets ``r1 = r2 = max(0, (r - 1) // 2)``.
        sparsity: pst only, and required there: the final target sparsity in [0, 1) (the layers
            start at 0; ``set_pst_sparsity`` moves them).
        kind: the registered position kind to train (``None``: the method's own, entries for speft
            and sparta, blocks with ``block_size``, rows for spruft, pst for pst); a kind of your
            own registered with ``spft.register_kind`` chooses its positions with its hook.
        block_size: speft / sparta only: ``(bh, bw)`` trains whole blocks (``BlockSparseLinear``,
            chosen by ``select_blocks`` / ``random_blocks`` on the summed scores) instead of
            scattered entries; ``None``: entries. The budget is met in whole blocks:
            ``match_lora_rank=r`` takes the block count closest to LoRA's (rounding half up; per
            module for local scope, in total for global), ``num_params`` ``round(n / (bh bw))``
            blocks, ``density`` that fraction of the blocks.
        pst_r1 / pst_r2: pst only: the ranks of the importance term AB and of the update UV
            (ints >= 0; ``None``: 8, or derived from ``match_lora_rank``, which excludes them).
        metric: how positions are scored; ``None`` picks the method's default (speft
            ``"gradient"``, sparta ``"random"``, spruft ``"l2"``). speft takes the
            ``salience_scores`` metrics, spruft the ``row_importance`` metrics.
        scope: ``"global"`` (one ranking over all targets) or ``"local"`` (the same density in
            every module); ``None``: ``"global"`` for speft/sparta, ``"local"`` for spruft (the
            only scope it has: rows are chosen per layer).
        target_modules: ``None`` (every ``nn.Linear`` inside the transformer blocks, never the
            embeddings or the LM/classification head), a list of names or name suffixes, or a
            regular expression matching whole names (``find_target_linears``).
        mask_update_interval: speft only: refresh the mask every this many steps with
            ``make_dynamic_mask`` (``None``: static, which SPEFT found as good).
        mode: the layers' execution mode (``"auto"``, ``"merged"``, ``"split"``, or ``"fused"`` for
            speft/sparta).
        exclude_attention: leave every module under an attention block out of the targets
            (SPruFT's "FA" setting).
        modules_to_save: names (or suffixes) of modules trained fully and saved whole in the
            adapter, e.g. ``["classifier"]`` or ``["score"]`` for a new classification head.
        backend: the kernels' backend (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).
        seed: seeds the random choices (sparta's positions, the ``random`` metrics, zo_taylor).
        num_calibration_batches: score on at most this many of the given batches.
    """

    method: str = "speft"
    density: Optional[float] = None
    num_params: Optional[int] = None
    match_lora_rank: Optional[int] = None
    metric: Optional[str] = None
    scope: Optional[str] = None
    target_modules: Optional[Union[str, list]] = None
    mask_update_interval: Optional[int] = None
    mode: str = "auto"
    exclude_attention: bool = False
    modules_to_save: Optional[list] = None
    backend: str = "auto"
    seed: int = 0
    num_calibration_batches: Optional[int] = None
    sparsity: Optional[float] = None
    pst_r1: Optional[int] = None
    pst_r2: Optional[int] = None
    block_size: Optional[tuple] = None
    kind: Optional[str] = None

    def __post_init__(self) -> None:
        spec = _method_spec(self.method)
        self._normalise_numbers()
        given = [n for n in ("density", "num_params", "match_lora_rank") if getattr(self, n) is not None]
        if self.method == "pst":
            self._check_pst(given)
        elif [n for n in ("sparsity", "pst_r1", "pst_r2") if getattr(self, n) is not None]:
            raise ValueError("SpftConfig: sparsity, pst_r1 and pst_r2 apply to method='pst' only")
        elif len(given) != 1:
            raise ValueError(
                f"SpftConfig: give exactly one of density, num_params or match_lora_rank, got {given or 'none'}"
            )
        if self.density is not None:
            if _not_number(self.density) or not 0.0 < self.density <= 1.0:
                raise ValueError(f"SpftConfig: density must be a number in (0, 1], got {self.density!r}")
        for name in ("num_params", "match_lora_rank"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.metric is None:
            self.metric = spec.default_metric
        if self.metric not in spec.metrics:
            raise ValueError(
                f"SpftConfig: metric {self.metric!r} does not apply to method {self.method!r}; choose one of {spec.metrics}"
            )
        if self.scope is None:
            self.scope = spec.scopes[0]
        if self.scope not in spec.scopes:
            reason = " (SPruFT chooses rows per layer)" if self.method == "spruft" else ""
            raise ValueError(f"SpftConfig: method {self.method!r} takes scope in {spec.scopes}{reason}, got {self.scope!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"SpftConfig: target_modules is not a valid regular expression: {error}") from None
        elif self.target_modules is not None:
            self.target_modules = _names("target_modules", self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _names("modules_to_save", self.modules_to_save)
        _check_int("mask_update_interval", self.mask_update_interval, minimum=1)
        if self.mask_update_interval is not None and self.method != "speft":
            raise ValueError("SpftConfig: mask_update_interval (dynamic masks) applies to method='speft' only")
        if self.mode not in MODES:
            raise ValueError(f"SpftConfig: unknown mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "fused" and self.method == "spruft":
            raise ValueError(
                "SpftConfig: mode='fused' is the sparse-delta layers' (speft, sparta); spruft's rows merge "
                "exactly, use 'auto', 'merged' or 'split'"
            )
        if not isinstance(self.exclude_attention, bool):
            raise ValueError(f"SpftConfig: exclude_attention must be a bool, got {self.exclude_attention!r}")
        check_backend_name(self.backend)
        _check_int("seed", self.seed, minimum=0, optional=False)
        _check_int("num_calibration_batches", self.num_calibration_batches, minimum=1)
        if self.block_size is not None:
            self._check_blocks()
        if self.kind is not None:
            kind_class(self.kind, "SpftConfig")  # a registered kind (nn/registry.py)

    def _check_blocks(self) -> None:
        self.block_size = check_block_size(self.block_size, "SpftConfig")  # a JSON list comes back as a tuple
        if self.method not in ("speft", "sparta"):
            raise ValueError(f"SpftConfig: block_size applies to methods 'speft' and 'sparta', not {self.method!r}")
        if self.mode == "fused":
            raise ValueError("SpftConfig: mode='fused' is the scattered entries' GEMM; blocks use 'auto', 'merged' or 'split'")
        if self.mask_update_interval is not None:
            raise ValueError("SpftConfig: mask_update_interval (dynamic masks) applies to scattered entries, not blocks")

    def _normalise_numbers(self) -> None:
        """numpy scalars (e.g. sizes computed with numpy) become Python ints and floats, so that the
        checks below accept them and the config serialises to JSON."""
        for name in ("num_params", "match_lora_rank", "mask_update_interval", "seed", "num_calibration_batches",
                     "pst_r1", "pst_r2"):
            value = getattr(self, name)
            if not isinstance(value, int) and as_int(value) is not None:
                setattr(self, name, as_int(value))
        for name in ("density", "sparsity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) and as_float(value) is not None:
                setattr(self, name, as_float(value))

    def _check_pst(self, given: list) -> None:
        if self.density is not None or self.num_params is not None:
            raise ValueError(
                "SpftConfig: method='pst' takes no density or num_params: its trainable count is fixed by the "
                "ranks, (in + out)(pst_r1 + pst_r2 + 1) per layer; give pst_r1/pst_r2 or match_lora_rank"
            )
        if self.match_lora_rank is not None and (self.pst_r1 is not None or self.pst_r2 is not None):
            raise ValueError("SpftConfig: give either match_lora_rank or pst_r1/pst_r2 for method='pst', not both")
        for name in ("pst_r1", "pst_r2"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.sparsity is None:
            raise ValueError("SpftConfig: method='pst' needs sparsity (the final target sparsity, 0 <= sparsity < 1)")
        if _not_number(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SpftConfig: sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.mode != "auto":
            raise ValueError(f"SpftConfig: mode applies to the sparse-delta methods, not to method='pst' (got {self.mode!r})")

    @property
    def pst_ranks(self) -> tuple[int, int]:
        """``(r1, r2)`` of a pst config: the explicit ranks (8 where not given), or
        ``max(0, (r - 1) // 2)`` twice for ``match_lora_rank=r``."""
        if self.match_lora_rank is not None:
            rank = max(0, (self.match_lora_rank - 1) // 2)
            return rank, rank
        return (8 if self.pst_r1 is None else self.pst_r1), (8 if self.pst_r2 is None else self.pst_r2)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["kind"] is None:  # the method's own kind: configs read the same as before the field existed
            del data["kind"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SpftConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"SpftConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpftConfig: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SpftConfig":
        try:
            data = loads_json(text)
        except (TypeError, ValueError) as error:
            raise ValueError(f"SpftConfig: not valid JSON: {error}") from None
        return cls.from_dict(data)


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def _shown(value) -> str:
    return repr(value) if value is None or type(value) in (int, float) else describe(value)


def _check_int(name: str, value, *, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"SpftConfig: {name} must be an integer >= {minimum}{' or None' if optional else ''}, got {_shown(value)}"
        )


def _names(field: str, value) -> list:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"SpftConfig: {field} must be a non-empty list of module names, got {value!r}")


def _method_spec(method: str) -> _Method:
    if method not in _METHODS:
        raise ValueError(f"SpftConfig: unknown method {method!r}; choose one of {METHODS}")
    return _METHODS[method]


_METHODS: dict[str, _Method] = {
    "speft": _Method(
        SALIENCE_METRICS, "gradient", tuple(m for m in SALIENCE_METRICS if m not in DATA_FREE_METRICS), ("global", "local")
    ),
    "sparta": _Method(("random",), "random", (), ("global", "local")),
    "spruft": _Method(ROW_METRICS, "l2", ROW_DATA_METRICS, ("local",)),
    "pst": _Method(("magnitude",), "magnitude", (), ("local",)),  # no positions to choose
}
METHODS = ("speft", "sparta", "spruft", "pst")
