"""One rank of the distributed tests of test_distributed.py (CPU, gloo, 2 processes).

    python distributed_scenarios.py RANK WORLD_SIZE PORT OUT_DIR GROUPS

Every scenario trains a tiny Llama (fp64) for ``STEPS`` AdamW steps on the same global batches,
each rank taking its contiguous share; the test runs the same recipe in one process and compares.
Groups (comma-separated):

- ``parity``: DDP and FSDP2 x {entries, rows, blocks, PST} x {auto, split}, from get_spft_model;
- ``unmerge``: a merged layer with a nonzero delta, ``unmerge()``d, then sharded (FSDP2);
- ``load``: ``load_adapter`` (default mode) of ``OUT_DIR/start.safetensors``, then sharded;
- ``resume``: state dicts of sharded models: taken before the first forward, and the ``load``
  result restored into fresh sharded models by ``set_model_state_dict`` (full, broadcast from
  rank 0), by torch.distributed.checkpoint and by accelerate's ``fsdp2_load_full_state_dict``;
- ``rank0_save``: ``save_adapter`` of a sharded model called on rank 0 only (a clear error);
- ``deepspeed``: DeepSpeed ZeRO-2 and ZeRO-3 on its CPU accelerator (when installed).

Results: ``<scenario>.safetensors`` (adapters, written by rank 0), ``<scenario>_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import types
import warnings

import torch

import spft_kernels as spft

from distributed_worker import GLOBAL_BATCH, STEPS, next_token_loss, train  # the DDP test's loop, loss and sizes
from tiny_models import tiny_batches, tiny_model

CONFIGS = {
    "entries": dict(method="sparta", density=0.2, seed=3),
    "rows": dict(method="spruft", density=0.3),
    "blocks": dict(method="sparta", density=0.3, block_size=[8, 8], seed=3),
    "pst": dict(method="pst", sparsity=0.5, pst_r1=2, pst_r2=3, backend="reference"),
}
# (PST computes one way, whatever the mode: its config takes none)
PARITY = [(wrap, kind, mode) for wrap in ("ddp", "fsdp2") for kind in CONFIGS for mode in ("auto", "split")
          if kind != "pst" or mode == "auto"]


def convert(kind: str, mode: str = "auto") -> torch.nn.Module:
    modes = {} if kind == "pst" else {"mode": mode}
    return spft.get_spft_model(tiny_model("llama"), spft.SpftConfig(**modes, **CONFIGS[kind]))


def start_with_delta(model: torch.nn.Module) -> torch.nn.Module:
    """Deterministic nonzero deltas (the same on every rank and in the test's reference)."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad and name.endswith(".delta"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
    return model


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = tiny_batches("llama", count=1, batch=GLOBAL_BATCH, seed=9)[0]["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def wrap(how: str, model: torch.nn.Module) -> torch.nn.Module:
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return shard(model)


def _write(out_dir: str, name: str, rank: int, result) -> None:
    with open(os.path.join(out_dir, f"{name}_rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def run_parity(out_dir: str, rank: int, world: int) -> None:
    for how, kind, mode in PARITY:
        name = f"parity-{how}-{kind}-{mode}"
        model = wrap(how, convert(kind, mode))
        losses = train(model, rank, world)
        spft.save_adapter(model, os.path.join(out_dir, f"{name}.safetensors"))
        _write(out_dir, name, rank, losses)


def run_unmerge(out_dir: str, rank: int, world: int) -> None:
    model = start_with_delta(convert("entries"))
    probe_logits(model)  # merges W0 + delta into the weights
    for module in model.modules():
        if isinstance(module, spft.SpftLayer):
            module.unmerge()  # what the old error message advised before sharding
    model = shard(model)
    losses = train(model, rank, world)
    spft.save_adapter(model, os.path.join(out_dir, "unmerge.safetensors"))
    _write(out_dir, "unmerge", rank, losses)


def write_start(out_dir: str) -> None:
    """The adapter the ``load`` and ``resume`` scenarios start from (written by the test, one process)."""
    spft.save_adapter(start_with_delta(convert("entries")), os.path.join(out_dir, "start.safetensors"))


def loaded_and_sharded(out_dir: str) -> torch.nn.Module:
    return shard(spft.load_adapter(tiny_model("llama"), os.path.join(out_dir, "start.safetensors")))


def run_load(out_dir: str, rank: int, world: int) -> torch.nn.Module:
    model = loaded_and_sharded(out_dir)
    losses = train(model, rank, world)
    spft.save_adapter(model, os.path.join(out_dir, "load.safetensors"))
    _write(out_dir, "load", rank, losses)
    return model


def run_resume(out_dir: str, rank: int, world: int, trained: torch.nn.Module) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        StateDictOptions,
    )

    result = {}
    fresh = loaded_and_sharded(out_dir)
    # Why 4: any state dict of a sharded model taken before its first forward
    get_model_state_dict(fresh)
    get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result["state_dict_before_forward"] = "ok"
    expected = probe_logits(trained)
    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    set_model_state_dict(fresh, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    result["broadcast_from_rank0"] = float((probe_logits(fresh) - expected).abs().max())
    checkpoint = os.path.join(out_dir, "dcp")
    dcp.save(get_model_state_dict(trained), checkpoint_id=checkpoint)
    other = loaded_and_sharded(out_dir)
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(other, state)
    result["dcp"] = float((probe_logits(other) - expected).abs().max())
    load_full = _accelerate_fsdp2_loader()  # accelerate's RAM-efficient loading (rank 0 holds the full state dict)
    if load_full is None:
        result["accelerate"] = None
    else:
        # (a new full state dict: set_model_state_dict above rewrote the one it was given)
        full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        third = loaded_and_sharded(out_dir)
        accelerator = types.SimpleNamespace(is_main_process=rank == 0, device=torch.device("cpu"))
        load_full(accelerator, third, full if rank == 0 else {})
        result["accelerate"] = float((probe_logits(third) - expected).abs().max())
    _write(out_dir, "resume", rank, result)


def _accelerate_fsdp2_loader():
    """accelerate's ``fsdp2_load_full_state_dict``, or None: not installed, or older than 1.16, which
    takes every state-dict entry for a sharded parameter, while the positions (``index``, ``rows``,
    ``blocks``) are plain buffers (README: Distributed)."""
    try:
        import accelerate
        from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    except ImportError:
        return None
    if tuple(int(part) for part in accelerate.__version__.split(".")[:2]) < (1, 16):
        return None
    return fsdp2_load_full_state_dict


def run_rank0_save(out_dir: str, rank: int, world: int) -> None:
    from spft_kernels.integration.adapter import collective

    collective.COLLECTIVE_TIMEOUT_S = 3.0
    model = shard(convert("entries"))
    result = {}
    if rank == 0:
        try:
            spft.save_adapter(model, os.path.join(out_dir, "rank0_save.safetensors"))
            result["error"] = None
        except RuntimeError as error:
            result["error"] = str(error)
    _write(out_dir, "rank0_save", rank, result)


def run_deepspeed(out_dir: str, rank: int, world: int) -> None:
    import deepspeed

    for stage in (2, 3):
        name = f"deepspeed-zero{stage}"
        model = convert("entries")
        # torch's AdamW, as in the one-process reference (DeepSpeed's own would JIT-compile a C++ op first)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
            },
        )
        share = GLOBAL_BATCH // world
        losses = []
        for batch in tiny_batches("llama", count=STEPS, batch=GLOBAL_BATCH):
            ids = batch["input_ids"][rank * share : (rank + 1) * share]
            loss = next_token_loss(engine(input_ids=ids).logits, ids)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        spft.save_adapter(engine, os.path.join(out_dir, f"{name}.safetensors"))
        _write(out_dir, name, rank, losses)


def main() -> None:
    rank, world, port, out_dir, groups = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    groups = groups.split(",")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)  # DeepSpeed takes this group
    try:
        for group in groups:
            if group == "parity":
                run_parity(out_dir, rank, world)
            elif group == "unmerge":
                run_unmerge(out_dir, rank, world)
            elif group == "load":
                trained = run_load(out_dir, rank, world)
            elif group == "resume":
                run_resume(out_dir, rank, world, trained)
            elif group == "rank0_save":
                run_rank0_save(out_dir, rank, world)
            elif group == "deepspeed":
                run_deepspeed(out_dir, rank, world)
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown (see distributed_worker.py: a joinable gloo thread can abort it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
