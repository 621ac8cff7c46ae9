"""Model integration, with the ergonomics of Hugging Face peft: a config, one call that converts a
model, a printout of the trainable parameters, and the way back to a plain model.

    config = spft.SpftConfig(method="speft", match_lora_rank=8, modules_to_save=["classifier"])
    model = spft.get_spft_model(model, config, batches=calib_batches, loss_fn=loss_fn)
    spft.print_trainable_parameters(model)
    ...train with any loop, transformers.Trainer, DDP...
    spft.save_adapter(model, "adapter.safetensors")        # adapter_io.py
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

Conversion shares every weight (no copy): each target ``nn.Linear`` is replaced by a layer built
on its own weight and bias, with a zero delta, so the converted model computes exactly what the
original did (a target that gets no position at all stays a plain linear, unless the mask is
dynamic). Everything else is frozen except ``modules_to_save`` (e.g. a new classification
head, which SpaRTA keeps fully trainable); those are trained in place and stored whole in the
adapter. Layers whose mode resolves to ``merged`` are merged at conversion (O(nnz)), so that a
``torch.compile`` of the converted model traces the merged forward from the start.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .backends import check_backend_name
from .layers import MODES, RowSparseLinear, SparseDeltaLinear
from .pst import PSTLinear
from .row_importance import METRICS as ROW_METRICS
from .row_importance import _DATA_METRICS as ROW_DATA_METRICS
from .row_importance import row_importance, select_rows
from .salience import DATA_FREE_METRICS, METRICS as SALIENCE_METRICS, salience_scores
from .select import lora_equivalent_params, random_indices, select_topk
from .targets import find_target_linears, matches_target

# Every layer type a converted model may hold.
SPFT_LAYER_TYPES: tuple = (SparseDeltaLinear, RowSparseLinear, PSTLinear)

# Attributes get_spft_model leaves on the converted model (removed again by unload/merge_and_unload).
CONFIG_ATTR = "spft_config"
_FLAGS_ATTR = "_spft_original_requires_grad"


# --- the config --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Method:
    """What get_spft_model needs to know about a method: its layer, metrics and scopes, and how it
    chooses positions (``select(model, targets, config, batches, loss_fn, scoring_kwargs)`` ->
    ``{name: positions}``)."""

    layer: type
    metrics: tuple
    default_metric: str
    data_metrics: tuple
    scopes: tuple
    select: Callable


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

    def __post_init__(self) -> None:
        spec = _method_spec(self.method)
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
        return dataclasses.asdict(self)

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
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"SpftConfig: not valid JSON: {error}") from None
        return cls.from_dict(data)


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def _check_int(name: str, value, *, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SpftConfig: {name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _names(field: str, value) -> list:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"SpftConfig: {field} must be a non-empty list of module names, got {value!r}")


def _method_spec(method: str) -> _Method:
    if method not in _METHODS:
        raise ValueError(f"SpftConfig: unknown method {method!r}; choose one of {METHODS}")
    return _METHODS[method]


# --- choosing positions ------------------------------------------------------------------------


def _budget(config: SpftConfig, targets: Mapping[str, nn.Linear]) -> dict:
    """``{"density": d}`` or ``{"num_params": n}`` for select_topk / random_indices."""
    if config.density is not None:
        return {"density": config.density}
    if config.num_params is not None:
        return {"num_params": config.num_params}
    return {"num_params": lora_equivalent_params(dict(targets), config.match_lora_rank)}


def _select_speft(model, targets, config, batches, loss_fn, scoring_kwargs):
    generator = torch.Generator().manual_seed(config.seed) if config.metric == "random" else None
    scores = salience_scores(
        model,
        batches,
        loss_fn,
        config.metric,
        target_modules=list(targets),
        num_batches=config.num_calibration_batches,
        generator=generator,
        **scoring_kwargs,
    )
    budget = _budget(config, targets)
    return select_topk(scores, budget.get("density"), num_params=budget.get("num_params"), scope=config.scope)


def _select_sparta(model, targets, config, batches, loss_fn, scoring_kwargs):
    if scoring_kwargs:
        raise ValueError(f"get_spft_model: method 'sparta' takes no scoring options, got {sorted(scoring_kwargs)}")
    budget = _budget(config, targets)
    return random_indices(
        dict(targets),
        budget.get("density"),
        num_params=budget.get("num_params"),
        scope=config.scope,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _select_spruft(model, targets, config, batches, loss_fn, scoring_kwargs):
    if batches is not None and config.num_calibration_batches is not None:
        batches = list(itertools.islice(batches, config.num_calibration_batches))
    scores = row_importance(
        model, batches, loss_fn, config.metric, target_modules=list(targets), seed=config.seed, **scoring_kwargs
    )
    if config.match_lora_rank is not None:
        return select_rows(scores, lora_rank=config.match_lora_rank, model=model)
    if config.density is not None:
        return select_rows(scores, ratio=config.density)
    total = sum(linear.weight.numel() for linear in targets.values())
    if config.num_params > total:
        raise ValueError(f"get_spft_model: num_params={config.num_params} exceeds the {total} entries of the target weights")
    # The same fraction of rows in every layer: R_m = round(num_params * out_m / N), whole rows.
    return select_rows(scores, ratio=config.num_params / total)


_METHODS: dict[str, _Method] = {
    "speft": _Method(
        SparseDeltaLinear, SALIENCE_METRICS, "gradient",
        tuple(m for m in SALIENCE_METRICS if m not in DATA_FREE_METRICS), ("global", "local"), _select_speft,
    ),
    "sparta": _Method(SparseDeltaLinear, ("random",), "random", (), ("global", "local"), _select_sparta),
    "spruft": _Method(RowSparseLinear, ROW_METRICS, "l2", ROW_DATA_METRICS, ("local",), _select_spruft),
    "pst": _Method(PSTLinear, ("magnitude",), "magnitude", (), ("local",), None),  # no positions to choose
}
METHODS = ("speft", "sparta", "spruft", "pst")


# --- module surgery ----------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers (their ``.module``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    targets: Optional[Mapping[str, nn.Linear]] = None,
) -> dict[str, nn.Module]:
    """Swap each target linear (default: ``find_target_linears(model)``, every ``nn.Linear`` inside
    the transformer blocks) for ``make(name, linear)``; returns ``{name: new module}``. Every new
    module is made before the first is put in, so a ``make`` that raises leaves the model as it was."""
    targets = find_target_linears(model) if targets is None else targets
    replaced = {name: make(name, linear) for name, linear in targets.items()}
    for name, module in replaced.items():
        set_submodule(model, name, module)
    return replaced


def spft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified_name: layer}`` of the model's sparse fine-tuning layers, in module order."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, SPFT_LAYER_TYPES)}


def plain_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s weight and bias tensors; an spft layer is unmerged first,
    so the weight holds W0 exactly. A plain linear is returned as it is."""
    if not isinstance(layer, SPFT_LAYER_TYPES):
        return layer
    if not isinstance(layer, PSTLinear):  # a PST layer never writes into W0
        layer.unmerge()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def saved_module_names(model: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    """The modules ``modules_to_save`` names (exact names or suffixes, as peft matches them),
    outermost only; each pattern must match something and no match may hold an spft layer."""
    if not patterns:
        return []
    root = unwrap_model(model)
    names = []
    for pattern in patterns:
        found = [name for name, _ in root.named_modules() if name and matches_target(name, [pattern])]
        if not found:
            raise ValueError(f"modules_to_save: no module of {type(root).__name__} matches {pattern!r}")
        names.extend(found)
    outermost = [n for n in dict.fromkeys(names) if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in outermost:
        if any(isinstance(m, SPFT_LAYER_TYPES) for m in root.get_submodule(name).modules()):
            raise ValueError(f"modules_to_save: {name!r} is (or contains) a sparse fine-tuning layer; it cannot also be trained fully")
    return outermost


def remember_requires_grad(model: nn.Module) -> None:
    """Record the ``requires_grad`` flags of a model about to be converted (once: a converted
    model keeps the flags of its plain form), so that unloading restores them."""
    root = unwrap_model(model)
    if not hasattr(root, _FLAGS_ATTR):
        setattr(root, _FLAGS_ATTR, {n: p.requires_grad for n, p in root.named_parameters()})


def prepare_for_training(model: nn.Module, saved: Sequence[str]) -> None:
    """Freeze everything except the spft deltas and the parameters of the ``saved`` modules, and
    merge the layers whose mode resolves to merged (O(nnz) each), so compiled graphs trace merged."""
    root = unwrap_model(model)
    for parameter in root.parameters():
        parameter.requires_grad_(False)
    for name in saved:
        for parameter in root.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    for layer in spft_layers(root).values():
        if isinstance(layer, PSTLinear):
            for factor in layer.factors():
                factor.requires_grad_(True)
            continue
        layer.delta.requires_grad_(True)
        if layer._wants_merged():
            layer.merge()


def _finish_unload(root: nn.Module) -> None:
    flags = root.__dict__.pop(_FLAGS_ATTR, None) or {}
    for name, parameter in root.named_parameters():
        if name in flags:
            parameter.requires_grad_(flags[name])
    root.__dict__.pop(CONFIG_ATTR, None)


# --- the public calls --------------------------------------------------------------------------


def get_spft_model(
    model: nn.Module,
    config: SpftConfig,
    batches: Optional[Iterable] = None,
    loss_fn: Optional[Callable] = None,
    **scoring_kwargs,
) -> nn.Module:
    """Convert ``model`` in place for sparse fine-tuning and return it (the same object).

    The targets (``config.target_modules``) become ``SparseDeltaLinear`` (speft, sparta),
    ``RowSparseLinear`` (spruft) or ``PSTLinear`` (pst: at sparsity 0, no data needed; raise it
    with ``set_pst_sparsity``) layers sharing the original weights, with positions chosen by
    ``config.metric`` (data metrics need ``batches`` and ``loss_fn(model, batch) -> scalar loss``);
    all other parameters are frozen except those of ``config.modules_to_save``. The converted
    model's output equals the original's exactly until the deltas change. ``scoring_kwargs`` go to
    ``salience_scores`` (speft, e.g. ``fisher_mode``) or ``row_importance`` (spruft, e.g.
    ``label_fn`` for ``qm_taylor``). The config is kept as ``model.spft_config``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"get_spft_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, SpftConfig):
        raise ValueError(f"get_spft_model: config must be an SpftConfig, got {type(config).__name__}")
    spec = _method_spec(config.method)
    root = unwrap_model(model)
    if spft_layers(root):
        raise ValueError(
            "get_spft_model: the model already has sparse fine-tuning layers; call spft.unload(model) first, "
            "or spft.load_adapter(model, path) to replace its adapter"
        )
    targets = _find_targets(root, config)
    saved = saved_module_names(root, config.modules_to_save)
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"get_spft_model: modules_to_save {saved} contain target layers {overlap[:3]}")
    if config.metric in spec.data_metrics and (batches is None or not callable(loss_fn)):
        raise ValueError(
            f"get_spft_model: metric {config.metric!r} of method {config.method!r} scores with data; pass "
            "batches=(an iterable of batches) and loss_fn=(loss_fn(model, batch) -> scalar loss)"
        )
    if config.method == "pst":
        make = _pst_maker(config, scoring_kwargs)
    else:
        targets, make = _delta_maker(root, targets, spec, config, batches, loss_fn, scoring_kwargs)
    remember_requires_grad(root)  # before from_linear, which freezes the shared weights
    try:
        replace_linears(root, make, targets)
    except Exception:
        _finish_unload(root)  # the flags back; no module was replaced
        raise
    prepare_for_training(root, saved)
    setattr(root, CONFIG_ATTR, config)
    return model


def _pst_maker(config: SpftConfig, scoring_kwargs: dict) -> Callable[[str, nn.Linear], nn.Module]:
    """PSTLinear.from_linear for every target (data-free), at sparsity 0, the factors drawn from
    one generator seeded with ``config.seed`` in target order."""
    if scoring_kwargs:
        raise ValueError(f"get_spft_model: method 'pst' takes no scoring options, got {sorted(scoring_kwargs)}")
    r1, r2 = config.pst_ranks
    generator = torch.Generator().manual_seed(config.seed)
    return lambda name, linear: PSTLinear.from_linear(
        linear, 0.0, r1, r2, backend=config.backend, generator=generator, name=name
    )


def _delta_maker(root, targets, spec, config, batches, loss_fn, scoring_kwargs):
    """The targets that get positions and the maker of their sparse-delta layers."""
    positions = spec.select(root, targets, config, batches, loss_fn, scoring_kwargs)
    if config.mask_update_interval is None:
        # A target that got no position (a global top-k can leave a layer empty) stays a plain
        # linear: it has nothing to train, and FSDP2 cannot reduce-scatter an empty gradient. A
        # dynamic mask keeps every target, since a later update may move positions there.
        targets = {name: linear for name, linear in targets.items() if positions[name].numel() > 0}
        if not targets:
            raise ValueError("get_spft_model: the budget selects no trainable position in any target")
    return targets, lambda name, linear: spec.layer.from_linear(
        linear, positions[name], mode=config.mode, backend=config.backend, name=name
    )


def _find_targets(root: nn.Module, config: SpftConfig) -> dict[str, nn.Linear]:
    try:
        targets = find_target_linears(root, config.target_modules, exclude_attention=config.exclude_attention)
    except ValueError as error:
        conv1d = [name for name, m in root.named_modules() if type(m).__name__ == "Conv1D"]
        if conv1d:
            raise ValueError(
                f"{error}; this model uses transformers' Conv1D layers (GPT-2 style, e.g. {conv1d[0]!r}), which "
                "sparse fine-tuning does not convert: only nn.Linear layers are supported"
            ) from None
        raise
    unsupported = {name: type(m).__name__ for name, m in targets.items() if type(m) is not nn.Linear}
    if unsupported:
        name, kind = next(iter(unsupported.items()))
        raise ValueError(f"get_spft_model: target {name!r} is a {kind}, not a plain nn.Linear; it cannot be converted")
    seen: dict[int, str] = {}
    for name, linear in targets.items():
        if id(linear.weight) in seen:
            raise ValueError(f"get_spft_model: targets {seen[id(linear.weight)]!r} and {name!r} share one weight")
        seen[id(linear.weight)] = name
    return targets


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: T || all params: N || trainable%: P`` as peft does; returns (T, N)."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
    return trainable, total


def merge_and_unload(model: nn.Module, *, return_report: bool = False):
    """Replace every spft layer with a plain ``nn.Linear`` holding ``W0 + Δ`` and return the model
    (the same object): bitwise the layer's ``merged_weight()`` (fp32 sum, rounded once to the
    weight's dtype), written in place into the layer's own weight tensor (O(nnz); no copy of the
    weight, except for a SparseDeltaLinear on a non-contiguous weight, which gets a new one).
    The original ``requires_grad`` flags come back; ``modules_to_save`` keep their trained values.

    A ``PSTLinear`` becomes its pruned linear ``(W0 + βUV) ⊙ M`` (``to_linear``: new tensors) at
    the sparsity the layer holds now, which need not be ``config.sparsity`` (e.g. a run stopped
    before the schedule reached it): it exports what it has. ``return_report=True`` returns
    ``(model, {name: PSTLinear.sparsity_report()})`` (achieved ``mask_sparsity``,
    ``weight_sparsity``, ...; empty for the other methods) so that this can be checked."""
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("merge_and_unload: the model has no sparse fine-tuning layers")
    reports = {}
    for name, layer in layers.items():
        if isinstance(layer, PSTLinear):
            linear, reports[name] = layer.to_linear(return_report=True)  # flags restored below
        elif layer._MERGE_NEEDS_CONTIGUOUS_WEIGHT and not layer.weight.is_contiguous():
            linear = layer.to_linear()  # never merged in place: split mode
        else:
            layer.merge()  # W0 + Δ in the weight, rounded once; a stale merge re-syncs first
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = layer.weight
            if layer.bias is not None:
                linear.bias = layer.bias
        set_submodule(root, name, linear)
    _finish_unload(root)
    return (model, reports) if return_report else model


def set_pst_sparsity(model: nn.Module, sparsity: float) -> int:
    """Set the sparsity of every ``PSTLinear`` of the model (from its next forward on) and return
    how many there are; the schedule of a training loop, e.g. the paper's cubic one:
    ``spft.set_pst_sparsity(model, spft.cubic_sparsity(step, total_steps, config.sparsity))``."""
    layers = [m for m in spft_layers(model).values() if isinstance(m, PSTLinear)]
    if not layers:
        raise ValueError("set_pst_sparsity: the model has no PSTLinear layers (convert it with method='pst')")
    for layer in layers:
        layer.set_sparsity(sparsity)
    return len(layers)


def unload(model: nn.Module) -> nn.Module:
    """Undo ``get_spft_model``: every spft layer becomes the plain ``nn.Linear`` it was built on,
    holding W0 exactly (its own tensors), and the original ``requires_grad`` flags come back. The
    deltas are dropped (save them first); ``modules_to_save`` keep their trained values."""
    root = unwrap_model(model)
    layers = spft_layers(root)
    if not layers:
        raise ValueError("unload: the model has no sparse fine-tuning layers")
    for name, layer in layers.items():
        set_submodule(root, name, plain_linear(layer))
    _finish_unload(root)
    return model


def make_dynamic_mask(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn, **salience_kwargs):
    """A ``DynamicMask`` over a converted speft model, configured from ``model.spft_config``
    (metric, scope, budget, ``mask_update_interval``); call ``mask.step(step)`` after each
    optimizer step."""
    from .dynamic_mask import DynamicMask

    root = unwrap_model(model)
    config = getattr(root, CONFIG_ATTR, None)
    if config is None or config.method != "speft" or config.mask_update_interval is None:
        raise ValueError(
            "make_dynamic_mask: the model must come from get_spft_model with SpftConfig(method='speft', "
            "mask_update_interval=...)"
        )
    layers = {n: m for n, m in spft_layers(root).items() if isinstance(m, SparseDeltaLinear)}
    budget = _budget(config, layers)
    return DynamicMask(
        root, optimizer, batches, loss_fn,
        metric=config.metric, scope=config.scope, interval=config.mask_update_interval,
        target_modules=list(layers), num_batches=config.num_calibration_batches, **budget, **salience_kwargs,
    )
