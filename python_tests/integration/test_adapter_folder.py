"""Adapter folders, peft-style: ``save_adapter`` writes a folder (tensors + ``adapter_config.json``)
for a path without the ``.safetensors`` suffix and the single file otherwise; ``load_adapter``
reads both, and folders written before ``adapter_config.json`` existed."""

from __future__ import annotations

import json
import os

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.adapter.files import ADAPTER_FILE
from spft_kernels.integration.surgery import spft_layers

from test_adapter_io import assert_unchanged, snapshot, trained
from tiny_models import one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.clone()


@pytest.fixture(scope="module")
def model():
    return trained(method="spruft")[0]


def test_a_path_without_the_suffix_becomes_a_peft_style_folder(tmp_path, model):
    folder = tmp_path / "run" / "adapter"  # parents are made too, as peft's save_pretrained does
    path = spft.save_adapter(model, folder)
    assert path == str(folder / ADAPTER_FILE)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", ADAPTER_FILE]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["format"] == "spft_adapter" and config["adapter_file"] == ADAPTER_FILE
    assert config["config"] == model.spft_config.to_dict() and config["config"]["method"] == "spruft"
    batch = tiny_batches("llama")[0]
    for source in (folder, path):
        loaded = spft.load_adapter(tiny_model("llama", dtype=torch.float32), source)
        assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_single_files_stay_single_files(tmp_path, model):
    path = spft.save_adapter(model, tmp_path / "a.safetensors")
    assert path == str(tmp_path / "a.safetensors") and os.listdir(tmp_path) == ["a.safetensors"]
    # A file that already exists is rewritten as a file whatever its name (as before folders).
    (tmp_path / "old-adapter").write_bytes(b"")
    assert spft.save_adapter(model, tmp_path / "old-adapter") == str(tmp_path / "old-adapter")
    assert os.path.isfile(tmp_path / "old-adapter")
    spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path / "old-adapter")


def test_a_folder_without_adapter_config_still_loads(tmp_path, model):
    spft.save_adapter(model, tmp_path)
    os.remove(tmp_path / "adapter_config.json")  # the layout of folders written before it existed
    loaded = spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path)
    assert sorted(spft_layers(loaded)) == sorted(spft_layers(model))


def test_an_adapter_config_that_disagrees_is_refused(tmp_path, model):
    spft.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    original = json.loads(config_path.read_text())
    target = tiny_model("llama", dtype=torch.float32)
    for edit, match in [
        ({"config": {**original["config"], "density": 0.5, "match_lora_rank": None}}, "disagrees"),
        ({"format": "something_else"}, "neither an spft adapter config"),
    ]:
        config_path.write_text(json.dumps({**original, **edit}))
        before = snapshot(target)
        with pytest.raises(ValueError, match=match):
            spft.load_adapter(target, tmp_path)
        assert_unchanged(target, before)
    config_path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not a readable adapter config"):
        spft.load_adapter(target, tmp_path)
    # Deep nesting: beyond the decoder's recursion (100,000), and decodable but deeper than any config.
    for depth in (100_000, 500):
        for nested in ('{"peft_type": "SHIRA", "x": %s}', '{"format": "spft_adapter", "config": %s}'):
            config_path.write_text(nested % ("[" * depth + "]" * depth))
            with pytest.raises(ValueError, match="not a readable adapter config: JSON nested deeper than 64 levels"):
                spft.load_adapter(target, tmp_path)
