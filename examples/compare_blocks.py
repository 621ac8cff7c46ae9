"""Scattered entries vs 16x16 blocks vs 64x64 blocks vs whole rows vs LoRA, at equal trainable
parameters, on the task that ships with the repository (``examples/data/sentiment.jsonl``).

    python examples/compare_blocks.py        # the README table: 3 seeds x 4 learning rates x 5 methods

Methods, each at the parameter count of a rank ``--rank`` LoRA on every linear of the blocks (the
classification head trains fully in all of them, as in ``finetune.py``):

- ``lora``: peft's LoRA;
- ``entries``: SPEFT, gradient salience on calibration batches, global top-k of single entries;
- ``blocks16`` / ``blocks64``: the same salience summed over 16x16 / 64x64 blocks, global top
  blocks (``SpftConfig(block_size=...)``): the block count closest to LoRA's budget;
- ``rows``: SPruFT, whole rows by their l2 norm (per layer the row count closest to LoRA's).

Protocol (the test split never chooses anything): the training split is cut once into 80% train
and 20% validation (``--split-seed``); every (method, learning rate, seed) trains on the 80% for
``--epochs`` epochs; per method, the learning rate with the best mean validation accuracy over
the seeds wins (ties: the lower mean validation loss); the table reports that learning rate's
test accuracy and loss, mean and standard deviation over the seeds. The seed drives the batch
order and LoRA's initialisation; the masks come from the same calibration batches in every run.

The base model is ``finetune.py``'s tiny Llama classifier, here 128 wide with an MLP of 256
(``--hidden``, ``--intermediate``), pretrained on polarity-only sentences, so that 64x64 blocks
are a quarter of an attention matrix rather than all of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import finetune  # noqa: E402  (the example's data, model and training helpers)

import spft_kernels as spft  # noqa: E402

METHODS = ("lora", "entries", "blocks16", "blocks64", "rows")
SPFT_METHODS = {
    "entries": dict(method="speft"),
    "blocks16": dict(method="speft", block_size=(16, 16)),
    "blocks64": dict(method="speft", block_size=(64, 64)),
    "rows": dict(method="spruft"),
}


def prepare(method: str, model, rank: int, calibration, seed: int):
    if method == "lora":
        return finetune.prepare("lora", model, rank, calibration, seed)
    head = finetune.head_name(model)
    config = spft.SpftConfig(match_lora_rank=rank, modules_to_save=[head], seed=seed, **SPFT_METHODS[method])
    return spft.get_spft_model(model, config, calibration, lambda m, b: m(**b).loss)


def run(method, lr, seed, base_path, tokenize, train_rows, val_rows, test_rows, args, device) -> dict:
    torch.manual_seed(seed)
    model = finetune.load_classifier(base_path, device, torch.float32, tokenize.pad_token_id)
    calibration = [finetune.to_device(b, device) for b in finetune.batches(train_rows, tokenize, args.batch_size)[: args.calibration]]
    model = prepare(method, model, args.rank, calibration, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        for batch in finetune.batches(train_rows, tokenize, args.batch_size, generator):
            model(**finetune.to_device(batch, device)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    val_loss, val_accuracy = finetune.evaluate(model, finetune.batches(val_rows, tokenize, 64), device)
    test_loss, test_accuracy = finetune.evaluate(model, finetune.batches(test_rows, tokenize, 64), device)
    head = sum(p.numel() for p in model.get_submodule(_head_path(model)).parameters() if p.requires_grad)
    return dict(method=method, lr=lr, seed=seed, trainable=sum(p.numel() for p in trainable) - head,
                val_loss=val_loss, val_accuracy=val_accuracy, test_loss=test_loss, test_accuracy=test_accuracy)


def _head_path(model) -> str:
    """The trained classification head (peft wraps it in ModulesToSaveWrapper; its copy trains)."""
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in finetune.HEADS]
    return names[0]


def choose(records: list) -> dict:
    """Per method: the learning rate with the best mean validation accuracy (then loss), and the
    test results of its seeds."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in records):
        by_lr = {}
        for r in records:
            if r["method"] == method:
                by_lr.setdefault(r["lr"], []).append(r)
        best = max(by_lr, key=lambda lr: (statistics.mean(r["val_accuracy"] for r in by_lr[lr]),
                                          -statistics.mean(r["val_loss"] for r in by_lr[lr])))
        runs = by_lr[best]
        accuracies = [100 * r["test_accuracy"] for r in runs]
        summary[method] = dict(
            lr=best, trainable=runs[0]["trainable"], seeds=len(runs),
            val_accuracy=100 * statistics.mean(r["val_accuracy"] for r in runs),
            test_accuracy=statistics.mean(accuracies),
            test_std=statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
            test_loss=statistics.mean(r["test_loss"] for r in runs),
        )
    return summary


def format_table(summary: dict) -> str:
    lines = ["| method | trainable (w/o head) | lr (by val) | val acc | test acc (mean ± std) | test loss |",
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['trainable']:,d} | {s['lr']:g} | {s['val_accuracy']:.1f}% | "
                     f"{s['test_accuracy']:.1f}% ± {s['test_std']:.1f} | {s['test_loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; every method matches its parameter count")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2", help="AdamW learning rates to choose from (validation)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=8, help="SPEFT's calibration batches")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    lrs = [float(v) for v in args.lrs.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    train_all, test_rows = finetune.load_data()
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(args.split_seed)).tolist()
    cut = round(len(train_all) * args.val_fraction)
    val_rows = [train_all[i] for i in order[:cut]]
    train_rows = [train_all[i] for i in order[cut:]]
    tokenize = finetune.WordTokenizer([r["text"] for r in train_all + test_rows])
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="spft_blocks_") as work:
        corpus = finetune.pretraining_corpus(2000, {r["text"] for r in train_all + test_rows}, 1)
        base = finetune.pretrain_tiny_llama(tokenize, corpus, args.pretrain_steps, device, 0, work,
                                            hidden=args.hidden, intermediate=args.intermediate)
        model = finetune.load_classifier(base, device, torch.float32, tokenize.pad_token_id)
        base_loss, base_accuracy = finetune.evaluate(model, finetune.batches(test_rows, tokenize, 64), device)
        del model
        print(f"base model (before fine-tuning): test accuracy {100 * base_accuracy:.1f}%, loss {base_loss:.4f}")
        print(f"task: {len(train_rows)} train / {len(val_rows)} validation / {len(test_rows)} test; LoRA rank {args.rank}, "
              f"{args.epochs} epochs, learning rates {lrs}, {args.seeds} seeds", flush=True)
        for method in methods:
            for lr in lrs:
                for seed in range(args.seeds):
                    records.append(run(method, lr, seed, base, tokenize, train_rows, val_rows, test_rows, args, device))
                r = records[-args.seeds:]
                print(f"  {method:<9} lr {lr:<6g} val acc {100 * statistics.mean(x['val_accuracy'] for x in r):5.1f}%  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(format_table(choose(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
