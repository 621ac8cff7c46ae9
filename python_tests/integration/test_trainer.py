"""SpftTrainer (integration/trainer.py): the Trainer's checkpoints hold the adapter, not W0, and
training resumes from them exactly."""

from __future__ import annotations

import os

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def _converted():
    model = tiny_model("llama", dtype=torch.float32)
    return spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1), None, hf_loss)


def _trainer(model, tmp_path, max_steps):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    data = [{"input_ids": ids, "labels": ids} for ids in tiny_batches("llama", count=1, batch=8)[0]["input_ids"]]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="steps", save_steps=3,
        disable_tqdm=True, data_seed=0, seed=0,
    )
    return spft.SpftTrainer(model=model, args=args, train_dataset=data)


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    straight = _converted()
    _trainer(straight, tmp_path / "straight", 6).train()

    first = _converted()
    _trainer(first, tmp_path / "resumed", 3).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert "spft_adapter.safetensors" in files and not {"model.safetensors", "pytorch_model.bin"} & files
    weights = sum(p.numel() * p.element_size() for p in first.parameters())
    # 10% of the target entries; the plain Trainer writes all weights (the header: ~570 B a layer)
    assert os.path.getsize(checkpoint / "spft_adapter.safetensors") < weights / 4

    resumed = _converted()  # the same positions (seeded); fresh zero deltas
    _trainer(resumed, tmp_path / "resumed", 6).train(resume_from_checkpoint=str(checkpoint))
    for name, layer in spft_layers(resumed).items():
        torch.testing.assert_close(layer.delta, spft_layers(straight)[name].delta, rtol=1e-5, atol=1e-6)
