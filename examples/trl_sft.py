"""Supervised fine-tuning with TRL's ``SFTTrainer`` on a model converted by ``get_spft_model``:
no peft config, the trainer optimises the sparse deltas because they are the only trainable
parameters.

    python examples/trl_sft.py                        # a tiny Llama built here, on the shipped reviews
    python examples/trl_sft.py --model PATH           # a local causal-LM checkpoint and its tokenizer
    python examples/trl_sft.py --peft-folder OUT      # also write the adapter as a peft SHiRA folder

The text is ``examples/data/sentiment.jsonl`` (short synthetic reviews), trained as plain
language modelling. Without ``--model`` the base is an untrained 2-block Llama with a word-level
tokenizer over the dataset's words, so that the example runs offline in seconds; only the loss
going down is meaningful there.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import spft_kernels as spft

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sentiment.jsonl")


def tiny_llama_and_tokenizer(texts):
    """An untrained 2-block Llama and a word-level tokenizer over ``texts`` (offline)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]"] + sorted({word for text in texts for word in text.split()})
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), tokenizer


def train(model_path=None, max_steps=30, rank=8, output_dir=None, peft_folder=None):
    """Convert, train with SFTTrainer, save the adapter; returns ``(model, trainer)``."""
    import datasets
    import transformers
    import trl

    with open(DATA) as handle:
        texts = [json.loads(line)["text"] for line in handle]
    if model_path is None:
        model, tokenizer = tiny_llama_and_tokenizer(texts)
        # A tiny model gains nothing from intra-op threads; on a busy 2-core machine OpenMP's
        # spin-waiting made its steps ~7x slower (2.2 s instead of 0.3 s).
        torch.set_num_threads(1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    # SpaRTA (random entries) at the parameter count of a rank-8 LoRA on every block linear:
    # data-free. For SPEFT's gradient salience pass batches= and loss_fn= (see README).
    model = spft.get_spft_model(model, spft.SpftConfig(method="sparta", match_lora_rank=rank))
    spft.print_trainable_parameters(model)
    output_dir = output_dir or tempfile.mkdtemp(prefix="spft_trl_")
    args = trl.SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=16, learning_rate=1e-2,
        logging_steps=max(1, max_steps // 10), save_strategy="no", report_to=[], max_length=32,
        use_cpu=not torch.cuda.is_available(), bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    print("adapter:", spft.save_adapter(model, os.path.join(output_dir, "adapter")))  # a peft-style folder
    if peft_folder is not None:  # loadable by peft.PeftModel.from_pretrained(base, peft_folder)
        print("peft SHiRA folder:", spft.save_adapter(model, peft_folder, format="peft"))
    return model, trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local causal-LM checkpoint (default: a tiny Llama)")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8, help="match this LoRA rank's parameter count")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--peft-folder", default=None, help="also save the adapter as a peft SHiRA folder here")
    args = parser.parse_args(argv)
    _, trainer = train(args.model, args.max_steps, args.rank, args.output_dir, args.peft_folder)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
