"""Fine-tune one small model on a task that ships with the repository, five ways, and compare.

    python examples/finetune.py                      # a tiny Llama classifier, pretrained here in seconds
    python examples/finetune.py --model PATH         # any local transformers checkpoint

Methods, at the same number of trainable parameters as LoRA rank ``--rank`` (except full):

- ``full``: every parameter trains;
- ``lora``: peft's LoRA of rank r on every linear layer of the blocks;
- ``speft``: SPEFT, gradient salience on calibration batches, global top-k, static mask;
- ``sparta``: SpaRTA, uniformly random entries;
- ``spruft``: SPruFT, whole rows chosen by their ℓ2 norm.

All of them train the classification head fully (SpaRTA's recipe, peft's ``modules_to_save``).
The task is ``examples/data/sentiment.jsonl`` (``make_sentiment.py``): short synthetic reviews
whose label depends on negation and on the clause after "but".

Without ``--model`` the base model is a tiny Llama sequence classifier built from a config and
pretrained on a simpler task generated from the same grammar: sentences without negation or
contrast, labelled by their adjective's polarity (none of them in the dataset). Fine-tuning then
has to teach it negation and contrast, as adapting a pretrained model to a new task would; an
untrained base gives parameter-efficient methods nothing to adapt (they stay near chance), and an
LM pretrained on the 480 training sentences memorises them. The base's own test accuracy is the
first row of the table.

The table reports the trainable parameters, the final training loss (mean of the last epoch),
test loss and accuracy, the peak memory of one training step (CUDA: the allocator's peak; CPU:
tensors tracked by ``spft_kernels.bench.memory.TensorMemoryTracker``) and the time (mask selection +
training). The learning rates are the best of {1e-3, 3e-3, 1e-2, 3e-2} per method on this task
(10 epochs, test accuracy): a demonstration, not a benchmark. On the CPU the sparse methods run
the reference kernels (pure PyTorch), so their times say nothing about the GPU kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.bench.memory import TensorMemoryTracker
from spft_kernels.masks.targets import find_target_linears

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATA = os.path.join(DATA_DIR, "sentiment.jsonl")
METHODS = ("full", "lora", "speft", "sparta", "spruft")
# AdamW learning rates: the best of {1e-3, 3e-3, 1e-2, 3e-2} per method on this task (module docstring).
LEARNING_RATES = {"full": 3e-3, "lora": 3e-3, "speft": 3e-3, "sparta": 1e-2, "spruft": 3e-2}
HEADS = ("score", "classifier")  # the classification head of decoder / encoder models


# --- data --------------------------------------------------------------------------------------


class WordTokenizer:
    """A word-level tokenizer over the dataset's words: 0 = padding, 1 = unknown."""

    def __init__(self, texts):
        words = sorted({word for text in texts for word in text.split()})
        self.vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(words)}}
        self.pad_token_id = 0

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts):
        ids = [[self.vocab.get(word, 1) for word in text.split()] for text in texts]
        length = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [0] * (length - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def load_data():
    rows = [json.loads(line) for line in open(DATA)]
    split = {name: [r for r in rows if r["split"] == name] for name in ("train", "test")}
    return split["train"], split["test"]


def batches(rows, tokenize, batch_size: int, generator: Optional[torch.Generator] = None):
    order = torch.randperm(len(rows), generator=generator).tolist() if generator is not None else range(len(rows))
    rows = [rows[i] for i in order]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = tokenize([r["text"] for r in chunk])
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        out.append(batch)
    return out


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# --- models ------------------------------------------------------------------------------------


def pretraining_corpus(size: int, exclude: set, seed: int) -> list:
    """Sentences without negation or contrast, labelled by polarity, none of them in the dataset."""
    if DATA_DIR not in sys.path:
        sys.path.insert(0, DATA_DIR)
    from make_sentiment import simple_sentence

    rng, rows = random.Random(seed), []
    while len(rows) < size:
        text, label = simple_sentence(rng)
        if text not in exclude:
            rows.append({"text": text, "label": label})
    return rows


def pretrain_tiny_llama(tokenizer, corpus, steps: int, device, seed: int, directory: str, hidden: int = 64,
                        intermediate: int = 128) -> str:
    """A tiny Llama sequence classifier (``hidden`` / ``intermediate`` sizes, 2 blocks, 4 heads)
    trained on ``corpus`` for ``steps`` batches of 32 (one pass over 2,000 sentences by default),
    saved in ``directory``, which is returned."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, num_labels=2,
    )
    model = LlamaForSequenceClassification(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    data = []
    while len(data) < steps:
        data += batches(corpus, tokenizer, 32, generator)
    for batch in data[:steps]:
        loss = model(**to_device(batch, device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"pretrained the tiny Llama classifier on {len(corpus)} polarity-only sentences ({steps} steps): "
          f"final loss {loss.item():.4f}")
    model.save_pretrained(directory)
    return directory


def load_classifier(path: str, device, dtype, pad_token_id: int):
    """The checkpoint with a 2-class head (new if it has none), padding as the tokenizer pads (the
    decoder classifiers read the last token that is not padding)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    return model.to(device)


def head_name(model) -> str:
    for name in HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEADS}")


def prepare(method: str, model, rank: int, calibration, seed: int):
    """Convert ``model`` for ``method``; returns it."""
    head = head_name(model)
    if method == "full":
        return model
    if method == "lora":
        import peft

        targets = list(find_target_linears(model))  # full names: a suffix like "dense" also hits BERT's pooler
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                 modules_to_save=[head])
        return peft.get_peft_model(model, config)
    config = spft.SpftConfig(method=method, match_lora_rank=rank, modules_to_save=[head], seed=seed)
    return spft.get_spft_model(model, config, calibration, lambda m, b: m(**b).loss)


# --- training and evaluation ---------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, data, device) -> tuple[float, float]:
    model.eval()
    total_loss = correct = count = 0
    for batch in data:
        batch = to_device(batch, device)
        output = model(**batch)
        size = batch["labels"].numel()
        total_loss += output.loss.item() * size
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        count += size
    model.train()
    return total_loss / count, correct / count


def peak_step_memory(model, optimizer, batch, device) -> int:
    """Peak bytes of one training step (model, optimizer state, activations, gradients)."""
    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with TensorMemoryTracker(baseline=list(model.parameters()) + list(model.buffers()) + state) as tracker:
        step()
    return tracker.peak_bytes


def run(method, base_path, tokenize, train_rows, test_rows, args, device, dtype) -> dict:
    torch.manual_seed(args.seed)
    model = load_classifier(base_path, device, dtype, tokenize.pad_token_id)
    test = batches(test_rows, tokenize, 64)
    calibration = [to_device(b, device) for b in batches(train_rows, tokenize, args.batch_size)[: args.calibration]]
    start = time.perf_counter()
    model = prepare(method, model, args.rank, calibration, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATES[method], weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    epoch_losses = []
    for _ in range(args.epochs):
        losses = []
        for batch in batches(train_rows, tokenize, args.batch_size, generator):
            loss = model(**to_device(batch, device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    test_loss, accuracy = evaluate(model, test, device)
    # One more step, measured on a copy, so that the numbers above are those of the training run.
    probe = copy.deepcopy(model)
    probe_optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    probe_optimizer.load_state_dict(optimizer.state_dict())
    peak = peak_step_memory(probe, probe_optimizer, to_device(calibration[0], device), device)
    return {
        "method": method, "trainable": sum(p.numel() for p in trainable), "train_loss": epoch_losses[-1],
        "test_loss": test_loss, "accuracy": accuracy, "peak_mib": peak / 2**20, "seconds": elapsed,
    }


def format_table(records) -> str:
    header = f"{'method':<8}{'trainable':>11}{'train loss':>12}{'test loss':>11}{'test acc':>10}{'peak MiB':>10}{'time s':>9}"
    lines = [header, "-" * len(header)]
    for r in records:
        if r["method"] == "base":  # the pretrained model before fine-tuning
            train_loss, peak, seconds = f"{'-':>12}", f"{'-':>10}", f"{'-':>9}"
        else:
            train_loss, peak, seconds = f"{r['train_loss']:>12.4f}", f"{r['peak_mib']:>10.3f}", f"{r['seconds']:>9.1f}"
        lines.append(
            f"{r['method']:<8}{r['trainable']:>11,d}{train_loss}{r['test_loss']:>11.4f}"
            f"{100 * r['accuracy']:>9.1f}%{peak}{seconds}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local transformers checkpoint (default: a tiny Llama pretrained here)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank; the sparse methods match its parameter count")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=8, help="SPEFT's calibration batches")
    parser.add_argument("--pretrain-steps", type=int, default=60, help="the built-in base model's pretraining")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the built-in tiny model, which gains nothing from more)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecations peft still calls
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    threads = args.threads if args.threads is not None else (1 if args.model is None else None)
    if threads:
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="spft_finetune_") as work:
        records = compare(methods, args, device, dtype, work)
    print()
    print(format_table(records))
    return 0


def compare(methods, args, device, dtype, work: str) -> list:
    """Every method's record, after the base model's own (``work``: where the built-in base goes)."""
    import transformers

    train_rows, test_rows = load_data()
    if args.model is None:
        tokenizer = WordTokenizer([r["text"] for r in train_rows + test_rows])
        tokenize = tokenizer
        corpus = pretraining_corpus(2000, {r["text"] for r in train_rows + test_rows}, args.seed + 1)
        base_path = pretrain_tiny_llama(tokenizer, corpus, args.pretrain_steps, device, args.seed, work)
    else:
        base_path = args.model
        auto = transformers.AutoTokenizer.from_pretrained(base_path)
        if auto.pad_token is None:
            auto.pad_token = auto.eos_token or auto.unk_token

        def tokenize(texts):
            return dict(auto(texts, padding=True, return_tensors="pt"))

        tokenize.pad_token_id = auto.pad_token_id

    print(f"task: {len(train_rows)} train / {len(test_rows)} test examples from {os.path.relpath(DATA)}; "
          f"device {device}, {args.dtype}, LoRA rank {args.rank}, {args.epochs} epochs")
    base = load_classifier(base_path, device, dtype, tokenize.pad_token_id)
    base_loss, base_accuracy = evaluate(base, batches(test_rows, tokenize, 64), device)
    records = [{"method": "base", "trainable": 0, "test_loss": base_loss, "accuracy": base_accuracy}]
    del base
    for method in methods:
        records.append(run(method, base_path, tokenize, train_rows, test_rows, args, device, dtype))
        print(f"  {method}: done in {records[-1]['seconds']:.1f}s")
    return records


if __name__ == "__main__":
    raise SystemExit(main())
