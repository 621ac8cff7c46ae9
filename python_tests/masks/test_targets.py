import pytest
import torch.nn as nn

from spft_kernels.masks.targets import find_target_linears


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(4, 4)
        self.self_attn.v_proj = nn.Linear(4, 4)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(4, 8)
        self.mlp.down_proj = nn.Linear(8, 4)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(4, 10)
        self.score = nn.Linear(4, 2)


def test_default_targets_the_linears_inside_blocks_only():
    names = list(find_target_linears(TinyLM()))
    assert names == [
        f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    ]


def test_name_list_matches_suffixes_and_regex_matches_whole_names():
    assert list(find_target_linears(TinyLM(), ["q_proj", "lm_head"])) == [
        "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "lm_head",
    ]
    assert list(find_target_linears(TinyLM(), r"layers\.1\..*proj")) == [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj",
    ]


def test_exclude_attention_keeps_only_the_mlp():
    names = list(find_target_linears(TinyLM(), exclude_attention=True))
    assert names == ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]


def test_nothing_matching_is_an_error():
    with pytest.raises(ValueError, match="no linear layer matches target_modules=\\['qproj'\\]"):
        find_target_linears(TinyLM(), ["qproj"])
    with pytest.raises(ValueError, match="no linear layer matches"):
        find_target_linears(TinyLM(), "proj")  # a regex must match the whole name
