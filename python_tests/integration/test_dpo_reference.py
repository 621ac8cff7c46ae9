"""TRL's DPOTrainer with ``ref_model=None``, as peft users run it: the reference log-probs are the
policy's with its adapter disabled, bitwise the base model's, at every step (while the policy
trains away from it), in merged and split modes, with no second copy of the model."""

from __future__ import annotations

import os

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.reference_model import DisabledAdapterReference
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def _preferences(count: int = 8):
    generator = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 12, (n,), generator=generator))

    rows = [(words(3), words(2), words(2)) for _ in range(count)]
    return datasets.Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))})


class _DPO(spft.SpftTrainerMixin, trl.DPOTrainer):
    pass


# Without activation checkpointing the policy's forward saves the merged weight for its backward,
# which runs after the reference forward: a reference that wrote into that weight (unmerge, then
# merge again) would fail there on the version counter.
@pytest.mark.parametrize("mode, checkpointing", [("merged", False), ("merged", True), ("split", False)])
def test_dpo_reference_is_the_base_model(tmp_path, mode, checkpointing):
    from trl.trainer.utils import add_fused_lm_head

    model = spft.get_spft_model(
        tiny_model("llama", dtype=torch.float32), spft.SpftConfig(method="sparta", density=0.1, mode=mode)
    )
    weights = {name: layer.weight for name, layer in spft_layers(model).items()}
    args = trl.DPOConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        disable_tqdm=True, max_length=16, gradient_checkpointing=checkpointing,
    )
    trainer = _DPO(model=model, ref_model=None, args=args, train_dataset=_preferences(),
                   processing_class=tiny_tokenizer())
    assert isinstance(trainer.ref_model, DisabledAdapterReference)
    assert list(trainer.ref_model.parameters()) == []  # no second copy of anything
    calls = []

    def record(module, args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output.log_probs.clone()))

    trainer.ref_model.register_forward_hook(record, with_kwargs=True)
    trainer.train()

    assert len(calls) == 4
    assert all(bool(layer.delta.any()) for layer in spft_layers(model).values())  # the policy trained
    assert all(layer.weight is weights[name] for name, layer in spft_layers(model).items())  # same W0 tensors
    assert all(layer.merged == (mode == "merged") for layer in spft_layers(model).values())
    base = tiny_model("llama", dtype=torch.float32)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    with torch.no_grad():
        for kwargs, reference in calls:
            assert torch.equal(base(**kwargs).log_probs, reference)
        policy = model(**calls[-1][0]).log_probs
    assert not torch.allclose(policy, calls[-1][1])  # the reference is not the trained policy


def test_an_explicit_reference_model_is_kept(tmp_path):
    model = spft.get_spft_model(tiny_model("llama", dtype=torch.float32), spft.SpftConfig(method="sparta", density=0.1))
    reference = tiny_model("llama", dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no", disable_tqdm=True, max_length=16)
    trainer = _DPO(model=model, ref_model=reference, args=args, train_dataset=_preferences(),
                   processing_class=tiny_tokenizer())
    assert trainer.ref_model is reference


def test_a_head_that_trains_cannot_be_disabled_for_the_fused_head():
    model = spft.get_spft_model(
        tiny_model("llama", dtype=torch.float32),
        spft.SpftConfig(method="sparta", density=0.1, target_modules=["lm_head", "q_proj"]),
    )
    with pytest.raises(ValueError, match="LM head"):
        DisabledAdapterReference(model)


def test_precomputed_reference_log_probs_are_the_base_models(tmp_path):
    """``precompute_ref_log_probs=True`` runs the reference over the data once, before training: the
    disabled-adapter policy gives the values an explicit copy of the base model gives."""
    columns = []
    for reference in (None, tiny_model("llama", dtype=torch.float32)):
        model = spft.get_spft_model(tiny_model("llama", dtype=torch.float32),
                                    spft.SpftConfig(method="sparta", density=0.1))
        with torch.no_grad():  # an adapter that is not zero: the reference must still be the base
            for layer in spft_layers(model).values():
                layer.delta.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
        args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                             save_strategy="no", disable_tqdm=True, max_length=16, precompute_ref_log_probs=True)
        trainer = _DPO(model=model, ref_model=reference, args=args, train_dataset=_preferences(),
                       processing_class=tiny_tokenizer())
        columns.append([torch.tensor(trainer.train_dataset[key]) for key in ("ref_chosen_logps", "ref_rejected_logps")])
    assert all(torch.equal(a, b) for a, b in zip(*columns))
