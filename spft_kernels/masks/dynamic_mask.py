"""Dynamic masks (SPEFT §3.4, Algorithm 1): every ``interval`` steps, fold the trained delta into
the base weight, recompute the salience at the new weights, reselect the mask, zero the delta and
reset the optimizer state of the delta parameters (the paper reinitialises Adam's moments, which
belong to the old positions).

The SPEFT paper finds that a static mask chosen once before training is as good (a dynamic mask
costs a salience pass every ``interval`` steps and rarely helps); use this to reproduce its
ablation or when the task drifts.

Example::

    import spft_kernels as spft

    scores = spft.salience_scores(model, calib_batches, loss_fn, metric="gradient")
    indices = spft.select_topk(scores, density=0.01)
    for name, index in indices.items():          # convert the targets
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, spft.SparseDeltaLinear.from_linear(linear, index))
    model.requires_grad_(False)
    deltas = [p for p in model.parameters() if p.requires_grad]
    for delta in deltas:
        delta.requires_grad_(True)
    optimizer = torch.optim.AdamW(deltas, lr=1e-4)
    mask = spft.DynamicMask(model, optimizer, calib_batches, loss_fn, density=0.01, interval=1000)
    for step, batch in enumerate(train_loader, start=1):
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        mask.step(step)                           # refreshes the mask when step % 1000 == 0

Folding is ``W0[idx] += delta`` on each layer's base weight in place
(``SparseDeltaLinear.fold_delta``: fp32 sum rounded once to the weight's dtype, exactly the merged
mode's ``W_eff``), O(nnz): no ``out × in`` tensor is made besides the salience scores. The model
computes the same function right after an update as right before it (the delta is zero and the
base holds ``W0 + Δ``). The layers keep the original W0 of every folded position aside (in
memory), so ``save_adapter`` still writes an adapter for the *original* base: it holds the union
of every position ever trained (folded or current), each with ``W_trained - W0_original``, and
loading it onto the original base reproduces the trained model. The adapter therefore grows with
each update that moves positions (at most ``(updates + 1) × nnz`` entries). Layers whose weight
another module shares (tied embeddings) are refused: folding would change that module too.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from ..nn.registry import spft_layer_classes
from ..ops._guards import as_int, describe
from .salience import METRICS, DATA_FREE_METRICS, salience_scores
from .select import _check_budget, select_topk
from .targets import TargetModules, find_target_linears, weight_sharers


class DynamicMask:
    """Periodically reselects the masks of a model's ``SparseDeltaLinear`` layers.

    Args:
        model: a model whose target linears are ``SparseDeltaLinear`` layers.
        optimizer: the optimizer holding their ``delta`` parameters; its state for them is reset
            at every update (the ``Parameter`` objects stay the same, so it needs no rebuild).
        batches: calibration batches, re-read at every update: a re-iterable (list, DataLoader)
            or a callable returning a fresh iterable (e.g. new samples each time).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        metric, density, num_params, scope, num_batches, progress: as in ``salience_scores`` and
            ``select_topk`` (exactly one of ``density``, ``num_params``).
        interval: steps between updates (SPEFT uses 1000): ``step(step)`` updates when
            ``step % interval == 0`` (``step > 0``).
        target_modules: which ``SparseDeltaLinear`` layers (default: all of them in the blocks).
        **salience_kwargs: passed on to ``salience_scores`` (``generator``, ``fisher_mode``, ...).

    Attributes: ``num_updates``; ``last_changed``, the number of positions the last update added
    to the mask (as many left it: the counts stay the same). Scoring runs in the model's current
    train/eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Union[Iterable, Callable[[], Iterable], None],
        loss_fn: Optional[Callable],
        *,
        metric: str = "gradient",
        density: Optional[float] = None,
        num_params: Optional[int] = None,
        scope: str = "global",
        interval: int,
        target_modules: TargetModules = None,
        num_batches: Optional[int] = None,
        progress: Optional[bool] = None,
        **salience_kwargs,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"DynamicMask: unknown metric {metric!r}; choose one of {METRICS}")
        if as_int(interval) is None or as_int(interval) < 1:
            raise ValueError(f"DynamicMask: interval must be a positive integer, got {describe(interval)}")
        interval = as_int(interval)
        if metric not in DATA_FREE_METRICS:
            if batches is None or not callable(loss_fn):
                raise ValueError(f"DynamicMask: metric {metric!r} needs batches and loss_fn(model, batch)")
            if not callable(batches) and iter(batches) is batches:
                raise ValueError(
                    "DynamicMask: batches are read again at every update; pass a list, a DataLoader or a "
                    "callable returning a fresh iterable, not a one-shot iterator"
                )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"DynamicMask: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        try:
            self.layers = find_target_linears(model, target_modules, linear_types=_foldable_kinds())
        except ValueError as error:
            raise ValueError(f"DynamicMask: {error}") from None
        shared = weight_sharers(model, list(self.layers))
        shared.update({n: m.weight_shared_with for n, m in self.layers.items() if m.weight_shared_with is not None})
        if shared:
            name, other = next(iter(shared.items()))
            raise ValueError(
                f"DynamicMask: layer {name!r} shares its weight with {other!r}; folding the delta into it would "
                "change that module too. Leave it out of target_modules"
            )
        total = sum(layer.weight.numel() for layer in self.layers.values())
        density, num_params = _check_budget("DynamicMask", density, num_params, scope, total)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers.items() if id(layer.delta) not in optimized]
        if missing:
            raise ValueError(f"DynamicMask: the optimizer does not hold the delta of {missing[:3]}")
        self.model, self.optimizer, self.batches, self.loss_fn = model, optimizer, batches, loss_fn
        self.metric, self.density, self.num_params, self.scope = metric, density, num_params, scope
        self.interval, self.num_batches, self.progress = interval, num_batches, progress
        self.salience_kwargs = salience_kwargs
        self.target_names = list(self.layers)
        self.num_updates = 0
        self.last_changed = 0

    def step(self, step: int) -> bool:
        """Call once per training step, after ``optimizer.step()``, with the number of steps done
        (1-based). Updates the mask when ``step`` is a positive multiple of ``interval``; returns
        whether it did."""
        if step > 0 and step % self.interval == 0:
            self.update()
            return True
        return False

    @torch.no_grad()
    def fold(self) -> None:
        """``W0 ← W0 + Δ`` and ``Δ ← 0`` in every layer, O(nnz); the model's function is unchanged."""
        for layer in self.layers.values():
            layer.fold_delta()

    def update(self) -> int:
        """Fold, rescore, reselect, install the new masks with zero deltas and reset the optimizer
        state of the deltas. Returns the number of positions added to the mask."""
        self.fold()
        batches = self.batches() if callable(self.batches) else self.batches
        scores = salience_scores(
            self.model,
            batches,
            self.loss_fn,
            self.metric,
            target_modules=self.target_names,
            num_batches=self.num_batches,
            progress=self.progress,
            **self.salience_kwargs,
        )
        indices = select_topk(scores, self.density, num_params=self.num_params, scope=self.scope)
        del scores
        changed = 0
        for name, layer in self.layers.items():
            new = indices[name]
            changed += new.numel() - int(torch.isin(new, layer.index).sum())
            layer.set_index(new)  # zero delta (new storage, same Parameter), re-merged if it was
            self.optimizer.state.pop(layer.delta, None)
        self.num_updates += 1
        self.last_changed = changed
        return changed


def _foldable_kinds() -> tuple:
    """The layer kinds a dynamic mask can refresh: those with ``fold_delta`` (scattered entries)."""
    return tuple(cls for cls in spft_layer_classes() if cls.dynamic_masks)
