"""``Selection``: what a position kind's selection hook gets for one conversion
(``SpftLayer.select_positions``, ``docs/architecture.md``).

A conversion config names a method (how positions are scored: salience for speft, uniform random
for sparta, neuron importance for spruft) and a budget; the kind says what a position is. The
kind's hook calls the chooser for its structure (``entries``, ``rows``, ``blocks``), or, for a
kind of its own, reads ``scores()`` (per-entry scores of the method) and ``budget`` and chooses
itself. Nothing here knows a layer class.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .row_importance import row_importance, select_rows
from .salience import salience_scores
from .select import lora_equivalent_params, random_indices, select_topk
from .select_blocks import random_blocks, select_blocks


class Selection:
    """One conversion's scoring context: ``model``, ``targets`` (``{name: nn.Linear}``), the
    ``config`` (an ``SpftConfig``), the calibration ``batches`` and ``loss_fn``, and the scoring
    options the caller passed to ``get_spft_model``."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Linear], config, batches: Optional[Iterable],
                 loss_fn: Optional[Callable], scoring_kwargs: dict) -> None:
        self.model, self.targets, self.config = model, dict(targets), config
        self.batches, self.loss_fn, self.scoring_kwargs = batches, loss_fn, dict(scoring_kwargs)

    # --- what the budget and the method say --------------------------------------------------

    @property
    def budget(self) -> dict:
        """``{"density": d}`` or ``{"num_params": n}`` in trainable values (``match_lora_rank``
        converted to the count of a rank-r LoRA on the targets)."""
        config = self.config
        if config.density is not None:
            return {"density": config.density}
        if config.num_params is not None:
            return {"num_params": config.num_params}
        return {"num_params": lora_equivalent_params(self.targets, config.match_lora_rank)}

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``config.seed`` (a new one at each call)."""
        return torch.Generator().manual_seed(self.config.seed)

    def takes_no_scoring_options(self) -> None:
        if self.scoring_kwargs:
            raise ValueError(
                f"get_spft_model: method {self.config.method!r} takes no scoring options, got {sorted(self.scoring_kwargs)}"
            )

    def scores(self) -> dict:
        """Per-entry scores ``{name: [out, in]}`` of the config's method: its salience metric
        (speft; uniform random draws for sparta)."""
        config = self.config
        metric = config.metric if config.method == "speft" else "random"
        generator = self.generator() if metric == "random" else None
        return salience_scores(
            self.model, self.batches, self.loss_fn, metric, target_modules=list(self.targets),
            num_batches=config.num_calibration_batches, generator=generator, **self.scoring_kwargs,
        )

    # --- the built-in structures --------------------------------------------------------------

    def entries(self) -> dict:
        """Scattered entries: salience top-k (speft) or uniformly random entries (sparta)."""
        budget = self.budget
        if self.config.method == "sparta":
            self.takes_no_scoring_options()
            return random_indices(self.targets, budget.get("density"), num_params=budget.get("num_params"),
                                  scope=self.config.scope, generator=self.generator())
        return select_topk(self.scores(), budget.get("density"), num_params=budget.get("num_params"),
                           scope=self.config.scope)

    def blocks(self, block_size) -> dict:
        """Whole blocks: the top blocks by summed salience (speft) or random blocks (sparta)."""
        config = self.config
        if config.match_lora_rank is not None:
            budget = {"lora_rank": config.match_lora_rank}
        else:
            budget = {"density": config.density} if config.density is not None else {"num_params": config.num_params}
        if config.method == "sparta":
            self.takes_no_scoring_options()
            return random_blocks(self.targets, block_size, generator=self.generator(), scope=config.scope, **budget)
        return select_blocks(self.scores(), block_size, scope=config.scope, **budget)

    def rows(self) -> dict:
        """Whole rows by neuron importance (spruft's metrics), per layer."""
        config, batches = self.config, self.batches
        if batches is not None and config.num_calibration_batches is not None:
            batches = list(itertools.islice(batches, config.num_calibration_batches))
        scores = row_importance(self.model, batches, self.loss_fn, config.metric, target_modules=list(self.targets),
                                seed=config.seed, **self.scoring_kwargs)
        if config.match_lora_rank is not None:
            return select_rows(scores, lora_rank=config.match_lora_rank, model=self.model)
        if config.density is not None:
            return select_rows(scores, ratio=config.density)
        total = sum(linear.out_features * linear.in_features for linear in self.targets.values())
        if config.num_params > total:
            raise ValueError(f"get_spft_model: num_params={config.num_params} exceeds the {total} entries of the target weights")
        # The same fraction of rows in every layer: R_m = round(num_params * out_m / N), whole rows.
        return select_rows(scores, ratio=config.num_params / total)
