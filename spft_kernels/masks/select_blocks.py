"""Choosing trained blocks (``BlockSparseLinear``): the top blocks of a salience score (SMT-style,
any SPEFT metric from ``salience_scores``) and SpaRTA's random blocks.

A block's score is the sum of its entries' scores (the entries of a clipped edge block that lie
in the weight), summed in fp64. Block ids are ``block_row * ceil(in / bw) + block_col``, sorted,
int64, on the score's (weight's) device: what ``BlockSparseLinear.from_linear`` takes.

Budgets, exactly one of:

- ``density``: the fraction of blocks (equal to the fraction of entries when the shapes are
  multiples of the block); ``scope="global"``: ``round(density * B)`` of all ``B`` blocks of the
  targets, ``"local"``: ``round(density * b_m)`` of each module's ``b_m``;
- ``num_params``: trainable values, ``bh * bw`` per block, so ``round(num_params / (bh * bw))``
  blocks in all (global), or that many split over the modules in proportion to their block
  counts by the largest-remainder rule (local), as ``select_topk`` splits entries;
- ``num_blocks``: an exact total (int), or exact per-module counts (``{name: count}``, scope
  ignored);
- ``lora_rank=r`` (what ``SpftConfig(match_lora_rank=r)`` uses): the block count closest to a
  rank-r LoRA's parameter count, rounding half up: ``floor(r (in + out) / (bh bw) + 1/2)`` per
  module (local; at most the module's blocks), or ``floor(Σ r (in + out) / (bh bw) + 1/2)`` in
  all (global). With 64x64 blocks a module smaller than ``2048 / r`` on the side gets no block
  under local scope.

Ties go to the earlier module and the lower block id (``select_topk``'s rule), so the result is
the same on every device.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ..ops._guards import as_int
from ..ops.block_index import block_grid, check_block_size
from .progress import progress_bar
from .select import SCOPES, _check_scores, _counts, _shapes, _top, warn_if_empty
from .targets import TargetModules

Tensor = torch.Tensor


def block_scores(score: Tensor, block_size) -> Tensor:
    """``[grid rows, grid cols]`` sums of ``score`` [out, in] over each block, in fp64 (a clipped
    edge block sums the entries it has)."""
    bh, bw = check_block_size(block_size)
    rows, cols = block_grid(*score.shape, (bh, bw))
    padded = F.pad(score.to(torch.float64), (0, cols * bw - score.shape[1], 0, rows * bh - score.shape[0]))
    return padded.view(rows, bh, cols, bw).sum(dim=(1, 3))


def _block_counts(who: str, grids: Mapping[str, int], block_size, density, num_params, num_blocks, lora_rank,
                  shapes: Mapping[str, tuple], scope: str) -> dict:
    """``{None: k}`` (one global count) or ``{name: k_m}`` from exactly one budget."""
    given = [n for n, v in (("density", density), ("num_params", num_params), ("num_blocks", num_blocks),
                            ("lora_rank", lora_rank)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"{who}: give exactly one of density, num_params, num_blocks or lora_rank, got {given or 'none'}")
    if scope not in SCOPES:
        raise ValueError(f"{who}: unknown scope {scope!r}; choose one of {SCOPES}")
    area = block_size[0] * block_size[1]
    total = sum(grids.values())
    if num_blocks is not None:
        if isinstance(num_blocks, Mapping):
            unknown = sorted(set(num_blocks) - set(grids))
            if unknown:
                raise ValueError(f"{who}: num_blocks names unknown modules {unknown[:3]}")
            counts = {name: num_blocks.get(name, 0) for name in grids}
            for name, count in counts.items():
                if as_int(count) is None or not 0 <= as_int(count) <= grids[name]:
                    raise ValueError(f"{who}: num_blocks[{name!r}] must be an int in [0, {grids[name]}], got {count!r}")
            return {name: as_int(count) for name, count in counts.items()}
        if as_int(num_blocks) is None or not 1 <= as_int(num_blocks) <= total:
            raise ValueError(f"{who}: num_blocks must be an int in [1, {total}] (the targets' blocks), got {num_blocks!r}")
        return _counts(who, grids, None, as_int(num_blocks), scope)
    if lora_rank is not None:
        if as_int(lora_rank) is None or as_int(lora_rank) < 1:
            raise ValueError(f"{who}: lora_rank must be a positive int, got {lora_rank!r}")
        lora_rank = as_int(lora_rank)
        lora = {name: lora_rank * (out_f + in_f) for name, (out_f, in_f) in shapes.items()}
        if scope == "global":
            return {None: min(total, math.floor(sum(lora.values()) / area + 0.5))}
        return {name: min(grids[name], math.floor(params / area + 0.5)) for name, params in lora.items()}
    if num_params is not None:
        if as_int(num_params) is None or as_int(num_params) < 1:
            raise ValueError(f"{who}: num_params must be a positive int, got {num_params!r}")
        num_params = as_int(num_params)
        blocks = math.floor(num_params / area + 0.5)
        if blocks < 1 or blocks > total:
            raise ValueError(
                f"{who}: num_params={num_params} is {num_params / area:.3g} blocks of {block_size[0]}x{block_size[1]}; "
                f"give between half a block and the targets' {total} blocks"
            )
        return _counts(who, grids, None, blocks, scope)
    return _counts(who, grids, density, None, scope)


def select_blocks(
    scores: Mapping[str, Tensor],
    block_size=(64, 64),
    density: Optional[float] = None,
    num_params: Optional[int] = None,
    scope: str = "global",
    *,
    num_blocks: Optional[Union[int, Mapping[str, int]]] = None,
    lora_rank: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, Tensor]:
    """Keep the blocks with the highest summed scores: ``{module_name: sorted block ids}``.

    ``scores``: ``{name: score [out, in]}`` (e.g. ``salience_scores``); the budget and its counts
    are in the module docstring; ``scope="global"`` ranks the blocks of all modules together,
    ``"local"`` ranks each module's own. ``progress``: a bar over the modules (default: as
    ``salience_scores``). A budget that selects no block warns (``EmptySelectionWarning``)."""
    block_size = check_block_size(block_size, "select_blocks")
    _check_scores(scores, "select_blocks")
    summed = {name: block_scores(score, block_size)
              for name, score in progress_bar(scores.items(), total=len(scores), desc="select_blocks: block sums",
                                              unit="module", progress=progress)}
    grids = {name: s.numel() for name, s in summed.items()}
    shapes = {name: tuple(score.shape) for name, score in scores.items()}
    counts = _block_counts("select_blocks", grids, block_size, density, num_params, num_blocks, lora_rank, shapes, scope)
    if None in counts:
        chosen = _top(summed, counts[None])
    else:
        chosen = {name: _top({name: summed[name]}, counts[name])[name] for name in summed}
    chosen = {name: ids.long() for name, ids in chosen.items()}
    warn_if_empty("select_blocks", chosen, "blocks", sum(grids.values()), block_size=block_size, density=density,
                  num_params=num_params, num_blocks=num_blocks, lora_rank=lora_rank, scope=scope)
    return chosen


def random_blocks(
    model_or_modules,
    block_size=(64, 64),
    density: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    *,
    num_params: Optional[int] = None,
    num_blocks: Optional[Union[int, Mapping[str, int]]] = None,
    lora_rank: Optional[int] = None,
    scope: str = "global",
    target_modules: TargetModules = None,
) -> dict[str, Tensor]:
    """SpaRTA on blocks: ``{module_name: sorted block ids}`` drawn uniformly at random.

    ``model_or_modules``: a model (its targets, ``target_modules``) or ``{name: nn.Linear | 2-D
    tensor}``. ``scope="global"``: one uniformly random subset of the exact total over all the
    targets' blocks; ``"local"``: per module, with the module's exact count (module docstring)."""
    block_size = check_block_size(block_size, "random_blocks")
    shapes = _shapes(model_or_modules, target_modules)
    grids = {name: math.prod(block_grid(out_f, in_f, block_size)) for name, (out_f, in_f, _) in shapes.items()}
    counts = _block_counts("random_blocks", grids, block_size, density, num_params, num_blocks, lora_rank,
                           {name: (o, i) for name, (o, i, _) in shapes.items()}, scope)
    if None in counts:
        total = sum(grids.values())
        positions = torch.randperm(total, generator=generator)[: counts[None]].sort().values
        chosen, start = {}, 0
        for name, size in grids.items():
            low, high = torch.searchsorted(positions, torch.tensor([start, start + size])).tolist()
            chosen[name] = positions[low:high] - start
            start += size
    else:
        chosen = {name: torch.randperm(grids[name], generator=generator)[: counts[name]].sort().values for name in grids}
    chosen = {name: ids.to(shapes[name][2]) for name, ids in chosen.items()}
    warn_if_empty("random_blocks", chosen, "blocks", sum(grids.values()), block_size=block_size, density=density,
                  num_params=num_params, num_blocks=num_blocks, lora_rank=lora_rank, scope=scope)
    return chosen
