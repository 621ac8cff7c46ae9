"""``model.save_pretrained(d)`` on a converted model keeps the training: it writes the adapter
folder (peft's convention), which ``spft.load_adapter`` puts back bitwise, and
``AutoModelForCausalLM.from_pretrained(d)`` fails on it instead of silently returning the base
model; ``save_pretrained_merged`` is the explicit way to ordinary weights that ``from_pretrained``
reloads as the trained model. The same holds for a plain transformers ``Trainer``'s final save."""

from __future__ import annotations

import os

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers

from tiny_models import one_thread, tiny_batches, tiny_model, train  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama saved as a pretrained model, so that adapters record where their base is."""
    path = tmp_path / "base"
    tiny_model("llama", dtype=torch.float32).save_pretrained(path)
    return str(path)


def _base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _trained(base_dir, steps: int = 3, **config):
    model = spft.get_spft_model(_base(base_dir), spft.SpftConfig(**{"method": "sparta", "density": 0.1, **config}))
    train(model, tiny_batches("llama", count=steps), steps=steps)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("config", [dict(mode="merged"), dict(mode="split"), dict(method="spruft", density=0.1)])
def test_save_pretrained_keeps_the_training(base_dir, tmp_path, config):
    model = _trained(base_dir, **config)
    batch = tiny_batches("llama", seed=5)[0]
    trained, base = _logits(model, batch), _logits(_base(base_dir), batch)
    assert not torch.equal(trained, base)
    folder = tmp_path / "saved"
    assert model.save_pretrained(folder) == str(folder)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "spft_adapter.safetensors"]
    loaded = spft.load_adapter(_base(base_dir), folder)  # the documented way back
    assert torch.equal(_logits(loaded, batch), trained)
    # transformers hands the folder's adapter_config.json to peft, which refuses it: an error, not the base.
    with pytest.raises((TypeError, ValueError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_save_pretrained_merged_reloads_as_the_trained_model(base_dir, tmp_path):
    model = _trained(base_dir, mode="merged")
    batch = tiny_batches("llama", seed=5)[0]
    trained = _logits(model, batch)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    model.save_pretrained_merged(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(model)
    assert torch.equal(_logits(reloaded, batch), trained)  # merged mode: the same W0 + delta, rounded once
    # The converted model is unchanged: the same layers, state and outputs.
    assert spft_layers(model) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, batch), trained)


def test_save_pretrained_merged_of_a_split_model_is_within_rounding(base_dir, tmp_path):
    model = _trained(base_dir, mode="split")
    batch = tiny_batches("llama", seed=5)[0]
    model.save_pretrained_merged(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


def test_plain_trainer_final_save_keeps_the_training(base_dir, tmp_path):
    model = spft.get_spft_model(_base(base_dir), spft.SpftConfig(method="sparta", density=0.1))
    rows = [{"input_ids": ids, "labels": ids} for batch in tiny_batches("llama", count=4) for ids in batch["input_ids"]]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model()
    model.eval()
    batch = tiny_batches("llama", seed=5)[0]
    loaded = spft.load_adapter(_base(base_dir), tmp_path / "run")
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert not torch.equal(_logits(loaded, batch), _logits(_base(base_dir), batch))
    with pytest.raises((TypeError, ValueError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run")


def test_save_pretrained_refuses_what_it_cannot_write(base_dir, tmp_path):
    model = _trained(base_dir, steps=1)
    with pytest.raises(TypeError, match="save_pretrained_merged"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    assert not os.path.exists(tmp_path / "x")
    model.save_pretrained(tmp_path / "y", is_main_process=False)  # another rank's call writes nothing
    assert not os.path.exists(tmp_path / "y")


def test_save_pretrained_merged_refuses_a_tied_head():
    model = spft.get_spft_model(
        tiny_model("llama", dtype=torch.float32, tie_word_embeddings=True),
        spft.SpftConfig(method="sparta", density=0.1, target_modules=["lm_head", "q_proj"]),
    )
    with pytest.raises(ValueError, match="tied"):
        model.save_pretrained_merged("unused")
