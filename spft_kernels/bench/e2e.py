"""End-to-end training throughput: a Llama-style model built from a config (no weights are
downloaded), a few AdamW steps per method at matched trainable parameters, tokens per second
and peak memory. ``spft-bench --e2e`` runs it.

Methods: ``full`` (every parameter trains), ``lora-peft`` (rank r on every linear layer of the
blocks), ``spft-sparta`` (random mask), ``spft-speft`` (gradient-salience mask, global top-k), ``spruft``
(whole rows by l2 importance), ``spft-blocks`` (random 64x64 blocks) and whatever else is registered in ``METHODS``, each with the same number of trainable parameters as LoRA rank r (to within
rounding): r·(in + out) per targeted layer.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from ..ops.index import random_index
from ..nn.sparse_delta_linear import SparseDeltaLinear
from .memory import TensorMemoryTracker
from ..integration.surgery import replace_linears
from ..masks.targets import find_target_linears

# (hidden, intermediate, layers, heads, kv heads, vocab, sequence, batch)
CPU_MODEL = dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=1024, sequence=128, batch=4)
GPU_MODEL = dict(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=16, vocab=32000, sequence=1024, batch=8)


def build_llama(spec: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        vocab_size=spec["vocab"],
        max_position_embeddings=spec["sequence"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def method_full(model: nn.Module, rank: int) -> nn.Module:
    return model


def method_lora_peft(model: nn.Module, rank: int) -> nn.Module:
    import peft

    targets = sorted({name.rpartition(".")[2] for name in find_target_linears(model)})
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(model, config)


def method_sparta(model: nn.Module, rank: int) -> nn.Module:
    _freeze(model)
    generator = torch.Generator().manual_seed(0)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        count = rank * (linear.in_features + linear.out_features)
        density = count / (linear.in_features * linear.out_features)
        index = random_index(linear.out_features, linear.in_features, density, generator=generator)
        return SparseDeltaLinear.from_linear(linear, index.to(linear.weight.device), name=name)

    replace_linears(model, make)
    return model


def method_speft(model: nn.Module, rank: int) -> nn.Module:
    """SPEFT's recommended setting: gradient salience on calibration batches, global top-k, static."""
    from ..masks.salience import salience_scores
    from ..masks.select import lora_equivalent_params, select_topk

    spec_vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    device = next(model.parameters()).device
    calibration = [torch.randint(0, spec_vocab, (2, 64), generator=generator).to(device) for _ in range(2)]
    scores = salience_scores(
        model, calibration, lambda m, ids: m(input_ids=ids, labels=ids).loss, metric="gradient", progress=False
    )
    indices = select_topk(scores, num_params=lora_equivalent_params(scores, rank), scope="global")
    del scores
    _freeze(model)
    replace_linears(model, lambda name, linear: SparseDeltaLinear.from_linear(linear, indices[name], name=name))
    return model


def method_spruft(model: nn.Module, rank: int) -> nn.Module:
    """SPruFT at LoRA's budget: per layer round(r (in + out) / in) rows chosen by their l2 norm."""
    from ..nn.row_sparse_linear import RowSparseLinear
    from ..masks.row_importance import row_importance, select_rows

    rows = select_rows(row_importance(model, metric="l2"), lora_rank=rank, model=model)
    _freeze(model)
    replace_linears(model, lambda name, linear: RowSparseLinear.from_linear(linear, rows[name], name=name))
    return model


def method_blocks(model: nn.Module, rank: int, block_size=(64, 64)) -> nn.Module:
    """Block-sparse deltas at LoRA's budget: per layer the number of 64x64 blocks closest to
    r (in + out) (rounding half up), drawn at random (the step time does not depend on which)."""
    from ..masks.select_blocks import random_blocks
    from ..nn.block_sparse_linear import BlockSparseLinear

    blocks = random_blocks(model, block_size, lora_rank=rank, scope="local", generator=torch.Generator().manual_seed(0))
    _freeze(model)
    targets = {name: linear for name, linear in find_target_linears(model).items() if blocks[name].numel()}
    replace_linears(model, lambda name, linear: BlockSparseLinear.from_linear(linear, blocks[name], block_size=block_size, name=name),
                    targets)
    return model


METHODS: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "full": method_full,
    "lora-peft": method_lora_peft,
    "spft-sparta": method_sparta,
    "spft-speft": method_speft,
    "spruft": method_spruft,
    "spft-blocks": method_blocks,
}


def _batch(spec: dict, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, spec["vocab"], (spec["batch"], spec["sequence"]), generator=generator).to(device)


def run_e2e(device: torch.device, dtype: torch.dtype, steps: int = 5, warmup: int = 2, rank: int = 16,
            spec: dict | None = None, methods: list[str] | None = None, env: dict | None = None) -> list[dict]:
    spec = spec or (GPU_MODEL if device.type == "cuda" else CPU_MODEL)
    base = build_llama(spec, device, dtype)
    tokens = _batch(spec, device)
    records = []
    for name in methods or list(METHODS):
        try:
            model = METHODS[name](copy.deepcopy(base), rank)
        except ImportError as error:
            print(f"  skip {name}: {error}")
            continue
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            return loss

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            loss = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - begin)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            state = [t for t in optimizer.state.values() for t in t.values() if isinstance(t, torch.Tensor)]
            with TensorMemoryTracker(baseline=list(model.parameters()) + list(model.buffers()) + state) as tracker:
                step()
            peak = tracker.peak_bytes
        median = statistics.median(times)
        records.append(
            {
                "op": "e2e_step",
                "provider": name,
                "model": f"llama h{spec['hidden']} i{spec['intermediate']} L{spec['layers']} v{spec['vocab']}",
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable_params": sum(p.numel() for p in trainable),
                "tokens": spec["batch"] * spec["sequence"],
                "dtype": str(dtype).replace("torch.", ""),
                "lora_rank_matched": rank,
                "median_ms": median * 1e3,
                "tokens_per_s": spec["batch"] * spec["sequence"] / median,
                "peak_mem_bytes": peak,
                "final_loss": float(loss),
                "steps": steps,
                **(env or {}),
            }
        )
        del model, optimizer
    return records


def format_e2e(records: list[dict]) -> str:
    header = f"{'method':<14}{'trainable':>12}{'step ms':>10}{'tokens/s':>11}{'peak MiB':>10}{'loss':>8}"
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['provider']:<14}{r['trainable_params']:>12}{r['median_ms']:>10.1f}{r['tokens_per_s']:>11.0f}"
            f"{r['peak_mem_bytes'] / 2**20:>10.1f}{r['final_loss']:>8.3f}"
        )
    return "\n".join(lines)
