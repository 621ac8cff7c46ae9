"""Calls every rank must make (saving a sharded model gathers its shards): a check that they all
did, with a clear error instead of a hang, and the gathering of DeepSpeed ZeRO-3 partitions."""

from __future__ import annotations

import contextlib
import datetime
import itertools

import torch
import torch.nn as nn

from ...nn.frozen_base import sharding

# How long a rank waits for the others to reach the same collective call before it says which
# did not (a save that gathers shards takes seconds; a rank that never comes would hang to the
# process group's timeout, 10-30 minutes, with no message).
COLLECTIVE_TIMEOUT_S = 120.0

_CALLS = itertools.count()


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is sharded across ranks (FSDP2, tensor parallel, ZeRO-3)."""
    return any(sharding(parameter) is not None for parameter in module.parameters())


def check_all_ranks_called(what: str, why: str) -> None:
    """Under torch.distributed, wait until every rank has made this (the n-th) such call, through
    the process group's key-value store (not a collective, so a rank that never comes cannot make
    the others hang): a ``RuntimeError`` naming the missing ranks after ``COLLECTIVE_TIMEOUT_S``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    prefix = f"spft_kernels/{what}/{next(_CALLS)}/"
    store.set(f"{prefix}{rank}", "1")
    try:
        store.wait([f"{prefix}{r}" for r in range(world)], datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except Exception:  # (torch raises DistStoreError or RuntimeError on a timeout, by version)
        missing = [r for r in range(world) if not store.check([f"{prefix}{r}"])]
        raise RuntimeError(
            f"{what}: {why}, so every rank must call {what} (rank 0 alone writes the files), but rank(s) "
            f"{missing} did not call it within {COLLECTIVE_TIMEOUT_S:g} s"
        ) from None


def gathered(modules) -> contextlib.AbstractContextManager:
    """A context in which the DeepSpeed ZeRO-3 partitioned parameters of ``modules`` are whole (every
    rank gathers; nothing is written back), or a no-op when none is partitioned."""
    partitioned = [
        p for module in modules for p in module.parameters() if getattr(p, "ds_id", None) is not None
    ]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
