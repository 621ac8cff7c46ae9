"""One rank of the DDP / FSDP2 parity runs of test_training_stack.py (CPU, gloo).

    python distributed_worker.py RANK WORLD_SIZE PORT OUT_DIR PHASES

Every phase trains the same converted tiny Llama (fp64) for ``STEPS`` AdamW steps on the same
global batches, each rank taking its contiguous share of every batch; ``train`` with
``world_size=1`` is the single-process reference the test compares against. Results go to
``OUT_DIR``: ``<phase>.safetensors`` (the adapter, written by rank 0 with save_adapter) and
``<phase>_rank<r>.json`` (the losses each rank saw).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import spft_kernels as spft

from tiny_models import tiny_batches, tiny_model

STEPS = 3
GLOBAL_BATCH = 4
PHASES = ("ddp", "fsdp2")


def build(mode: str = "auto") -> torch.nn.Module:
    """The converted model every run starts from (gradient salience on fixed calibration batches,
    so every rank picks the same positions)."""
    model = tiny_model("llama", dtype=torch.float64)
    config = spft.SpftConfig(method="speft", match_lora_rank=2, mode=mode)
    return spft.get_spft_model(model, config, tiny_batches("llama", seed=5), lambda m, b: m(**b).loss)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The causal LM loss in the logits' own dtype (transformers' loss upcasts to fp32 only, which
    would round an fp64 run's loss to fp32)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model: torch.nn.Module, rank: int = 0, world_size: int = 1) -> list[float]:
    """AdamW on this rank's share of each global batch; returns the local losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    share = GLOBAL_BATCH // world_size
    losses = []
    for batch in tiny_batches("llama", count=STEPS, batch=GLOBAL_BATCH):
        ids = batch["input_ids"][rank * share : (rank + 1) * share]
        loss = next_token_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# The mode the layers of each phase end up in: FSDP2 swaps gathered weights in for every forward,
# so mode 'auto' falls back from merged to split there (the single-process reference runs that).
REFERENCE_MODES = {"ddp": "auto", "fsdp2": "split"}


def wrap(phase: str, model: torch.nn.Module) -> torch.nn.Module:
    if phase == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def main() -> None:
    rank, world_size, port, out_dir, phases = sys.argv[1:6]
    rank, world_size = int(rank), int(world_size)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for phase in phases.split(","):
            model = wrap(phase, build())
            losses = train(model, rank, world_size)
            spft.save_adapter(model, os.path.join(out_dir, f"{phase}.safetensors"))  # collective under FSDP2
            with open(os.path.join(out_dir, f"{phase}_rank{rank}.json"), "w") as handle:
                json.dump(losses, handle)
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: a gloo or autograd worker thread still joinable at exit makes
    # libstdc++ abort ("terminate called without an active exception", seen once in 4 CI runs)
    # after all results were written and the process group was destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
