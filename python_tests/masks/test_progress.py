"""Long work says so (masks/progress.py): calibration, row importance, selection and conversion
show a tqdm bar where someone watches (``SPFT_PROGRESS=1`` here, as a terminal or a notebook
would), never in logs unless asked; a selection that comes out empty warns; a model that was not
converted is named as such."""

import warnings

import pytest
import torch

import spft_kernels as spft
from spft_kernels.masks import progress

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shown(monkeypatch):
    """Bars wanted (as on a terminal) and shown at once (the 2 s delay is for real runs)."""
    monkeypatch.setenv("SPFT_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY_S", 0.0)


def test_calibration_shows_a_bar_when_wanted(shown, capsys):
    model, batches = tiny_model("llama"), tiny_batches("llama", count=3)
    spft.salience_scores(model, batches, hf_loss, metric="gradient")
    err = capsys.readouterr().err
    assert "salience (gradient)" in err and "3/3" in err


@pytest.mark.parametrize("metric", ["taylor", "zo_taylor"])
def test_row_importance_shows_a_bar_when_wanted(shown, capsys, metric):
    model, batches = tiny_model("llama"), tiny_batches("llama", count=2)
    spft.row_importance(model, batches, hf_loss, metric=metric, num_perturbations=1) if metric == "zo_taylor" \
        else spft.row_importance(model, batches, hf_loss, metric=metric)
    err = capsys.readouterr().err
    assert f"row_importance ({metric})" in err and "2/2" in err


def test_selection_shows_a_bar_when_wanted(shown, capsys):
    scores = {"a": torch.rand(8, 8), "b": torch.rand(4, 8)}
    spft.select_topk(scores, density=0.25)
    # fp32: two radix passes and one gathering pass over the two modules
    assert "select_topk" in (err := capsys.readouterr().err) and "6/6" in err
    spft.select_blocks(scores, (4, 4), num_blocks=2)
    assert "select_blocks" in capsys.readouterr().err


def test_conversion_shows_a_bar_when_wanted(shown, capsys):
    model = tiny_model("llama")
    spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.05))
    assert "get_spft_model: building layers" in capsys.readouterr().err


def test_no_bar_in_logs_unless_asked(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.delenv("SPFT_PROGRESS", raising=False)  # pytest's stderr is no terminal
    model, batches = tiny_model("llama"), tiny_batches("llama", count=2)
    spft.salience_scores(model, batches, hf_loss)
    spft.select_topk({"a": torch.rand(8, 8)}, density=0.5)
    monkeypatch.setenv("SPFT_PROGRESS", "0")
    spft.salience_scores(model, batches, hf_loss, progress=None)
    assert capsys.readouterr().err == ""
    assert progress.wanted(True) and not progress.wanted(False)


def test_an_empty_selection_warns():
    model = tiny_model("llama")  # hidden 32: each target is one 64 x 64 block (clipped)
    with pytest.warns(spft.EmptySelectionWarning, match=r"random_blocks: .*density=0\.02.*selects no blocks of the 14"):
        chosen = spft.random_blocks(model, (64, 64), density=0.02)
    assert sum(ids.numel() for ids in chosen.values()) == 0
    with pytest.warns(spft.EmptySelectionWarning, match="select_blocks"):
        spft.select_blocks({"a": torch.rand(8, 8)}, (4, 4), density=0.1)
    with pytest.warns(spft.EmptySelectionWarning, match="select_topk: density=0.001"):
        spft.select_topk({"a": torch.rand(8, 8)}, density=0.001)
    with pytest.warns(spft.EmptySelectionWarning, match="random_indices"):
        spft.random_indices({"a": torch.zeros(8, 8)}, density=0.001)
    with pytest.warns(spft.EmptySelectionWarning, match="select_rows: lora_rank=0"):
        spft.select_rows({"model.layers.0.mlp.up_proj": torch.rand(64)}, lora_rank=0, model=model)


def test_a_selection_with_positions_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", spft.EmptySelectionWarning)
        spft.random_blocks(tiny_model("llama"), (16, 16), density=0.1)
        spft.select_topk({"a": torch.rand(8, 8), "b": torch.rand(8, 8)}, num_params=1)  # one module empty: fine


def test_dynamic_mask_on_an_unconverted_model_says_convert_it_first():
    model = tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"DynamicMask: LlamaForCausalLM has no SparseDeltaLinear layer \(it has 15 "
                                         r"plain nn.Linear\); convert it first"):
        spft.DynamicMask(model, optimizer, tiny_batches("llama"), hf_loss, density=0.01, interval=10)
