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


def test_compare_blocks_example_prints_its_table(examples_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import compare_blocks

    args = ["--methods", "lora,blocks64,rows", "--seeds", "2", "--lrs", "1e-2", "--epochs", "1", "--pretrain-steps", "5",
            "--hidden", "64", "--intermediate", "96", "--rank", "16"]
    assert compare_blocks.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in lines[1:]}
    assert list(rows) == ["lora", "blocks64", "rows"]
    trainable = {name: int(row[0].replace(",", "")) for name, row in rows.items()}
    # LoRA r=16 on 2 blocks of 4 x 64x64 attention and 3 MLP (96x64) linears: 16 * (4 * 128 + 3 * 160) * 2
    # = 31,744 values; the closest count of 64x64 blocks is 8 (32,768).
    assert trainable["lora"] == 31744 and trainable["blocks64"] == 8 * 4096
    for row in rows.values():  # lr chosen from the grid, test accuracy "mean% ± std" of the 2 seeds
        assert row[1] == "0.01" and "±" in row[3] and 0.0 <= float(row[3].split("%")[0]) <= 100.0
    sys.modules.pop("compare_blocks", None)
    sys.modules.pop("finetune", None)
