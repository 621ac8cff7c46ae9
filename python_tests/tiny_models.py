"""Tiny transformers models (built from configs, nothing downloaded), calibration batches and the
conversion of targets to SparseDeltaLinear, shared by the mask-selection tests."""

from __future__ import annotations

import pytest
import torch

import spft_kernels as spft

transformers = pytest.importorskip("transformers")


CONFIGS = {
    "bert": ("BertConfig", "BertForSequenceClassification", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, word_embed_proj_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)),
}


def tiny_model(kind: str, seed: int = 0, dtype=torch.float64, **overrides):
    """A 2-block BERT / Llama / OPT / Qwen2 in eval mode (no dropout); ``overrides`` change the config."""
    config_class, model_class, sizes = CONFIGS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**sizes, **overrides}))
    return model.to(dtype).eval()


def tiny_batches(kind: str, count: int = 3, batch: int = 4, tokens: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    vocab = 100 if kind == "bert" else 64
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
        if kind == "bert":
            labels = torch.randint(0, 2, (batch,), generator=generator)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            batches.append({"input_ids": ids, "labels": ids})
    return batches


def tiny_tokenizer(vocab_size: int = 64):
    """A word-level fast tokenizer over the words ``w0 .. w{vocab_size - 4}`` plus [PAD], [UNK],
    [EOS] (ids 0-2), built offline for trainers that want a ``processing_class`` (TRL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(vocab_size - 3)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def hf_loss(model, batch):
    return model(**batch).loss


def train(model, batches, steps=4, lr=1e-2, before_step=None):
    """AdamW on the trainable parameters over the batches in turn; ``before_step(step)`` runs
    before each step (e.g. a PST sparsity schedule). Returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        loss = hf_loss(model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def convert(model, indices, mode="merged"):
    """Replace each named linear by a SparseDeltaLinear on ``indices[name]``; only the deltas train."""
    for name, index in indices.items():
        parent, _, child = name.rpartition(".")
        layer = spft.SparseDeltaLinear.from_linear(model.get_submodule(name), index, mode=mode, name=name)
        setattr(model.get_submodule(parent), child, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".delta"))
    return model


def deltas(model):
    return [p for name, p in model.named_parameters() if name.endswith(".delta")]


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spin-waiting made the synthetic training run 60x slower (30 s instead of 0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
