"""examples/finetune.py runs end to end (briefly), and its dataset file is what its generator
writes."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tiny_models import one_thread  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    monkeypatch.syspath_prepend(os.path.join(EXAMPLES, "data"))


def test_dataset_file_is_reproducible(examples_path):
    import make_sentiment

    with open(os.path.join(EXAMPLES, "data", "sentiment.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    assert rows == make_sentiment.dataset()
    assert {r["split"] for r in rows} == {"train", "test"} and len({r["text"] for r in rows}) == len(rows)
    assert 0.4 < sum(r["label"] for r in rows) / len(rows) < 0.6


def test_finetune_example_prints_its_table(examples_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import finetune

    assert finetune.main(["--methods", "lora,sparta,spruft", "--epochs", "1", "--pretrain-steps", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2 :] if line.strip()}
    assert list(rows) == ["base", "lora", "sparta", "spruft"]
    trainable = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    assert trainable["sparta"] == trainable["lora"] > 0  # matched to LoRA's count, head included
    assert all(row[4].endswith("%") for row in rows.values())
    sys.modules.pop("finetune", None)


def test_trl_example_trains_and_saves_both_folders(examples_path, tmp_path):
    pytest.importorskip("trl")
    import trl_sft

    assert trl_sft.main(["--max-steps", "2", "--output-dir", str(tmp_path), "--peft-folder", str(tmp_path / "peft")]) == 0
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "spft_adapter.safetensors"]
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
