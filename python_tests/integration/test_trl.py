"""TRL's SFTTrainer trains a model converted by get_spft_model as it is (no peft config): only
the deltas are optimised and change, W0 and everything else stay bitwise as they were, and the
adapter saved afterwards reproduces the trained model."""

from __future__ import annotations

import os

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_batches, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_trainer_trains_only_the_deltas(tmp_path):
    model = spft.get_spft_model(tiny_model("llama", dtype=torch.float32), spft.SpftConfig(method="sparta", density=0.1))
    before = {key: value.clone() for key, value in model.state_dict().items()}  # W0 whatever the mode
    generator = torch.Generator().manual_seed(0)
    # Short "sentences" over 8 words: a next-word distribution the model can learn in a few steps.
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 8, (6,), generator=generator)) for _ in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        disable_tqdm=True, max_length=16,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer())
    trainer.train()
    assert model.model.gradient_checkpointing  # TRL's default, with frozen embeddings: works too
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(layer.delta) for layer in spft_layers(model).values()}
    # Copies: a live state dict of a merged layer holds its weight's W0 (nn/w0_loan.py), and the
    # layer computes the split form (equal up to rounding) until it is freed.
    after = {key: value.clone() for key, value in model.state_dict().items()}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {f"{name}.delta" for name in spft_layers(model)}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
    batch = tiny_batches("llama")[0]
    loaded = spft.load_adapter(tiny_model("llama", dtype=torch.float32), spft.save_adapter(model, tmp_path / "adapter"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
