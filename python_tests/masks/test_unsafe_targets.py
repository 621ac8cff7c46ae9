"""Finding the targets that are unsafe to convert (``masks/targets.py``): weights another module
holds too (tied embeddings, a module under two names, overlapping views; any module type) and
linears whose parent reads their weight itself; and meta-device models, named before any
scoring instead of torch's ``.item()`` error."""

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.masks.targets import check_materialised, weight_reading_parent, weight_sharers


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = nn.ModuleList([nn.Linear(4, 4)])
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def test_a_tied_head_shares_with_the_embedding():
    model = Tied()
    assert weight_sharers(model, ["lm_head", "block.0"]) == {"lm_head": "embed"}


def test_a_module_registered_under_two_names_shares_with_itself():
    model = nn.Module()
    model.a = nn.Linear(3, 3)
    model.b = model.a
    assert weight_sharers(model, ["a"]) == {"a": "b"}


def test_overlapping_views_share_and_disjoint_views_do_not():
    storage = torch.randn(40)
    model = nn.Module()
    model.a, model.b, model.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    with torch.no_grad():
        model.a.weight = nn.Parameter(storage[:16].view(4, 4))
        model.b.weight = nn.Parameter(storage[16:32].view(4, 4))  # one flat buffer, disjoint (FSDP1-style)
        model.c.weight = nn.Parameter(storage[28:36].view(2, 4))  # overlaps b by 4 values
    assert weight_sharers(model, ["a", "b", "c"]) == {"b": "c", "c": "b"}


def test_a_buffer_or_a_transposed_view_counts():
    model = nn.Module()
    model.a = nn.Linear(3, 5)
    model.norm = nn.Module()
    model.norm.register_buffer("projection", model.a.weight.detach().t())
    assert weight_sharers(model, ["a"]) == {"a": "norm"}


def test_unshared_weights_are_not_shared_and_meta_ties_are_found_by_identity():
    assert weight_sharers(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["0", "1"]) == {}
    model = Tied().to("meta")  # (torch.device("meta") as a context is undone by conftest's poisoned empty)
    model.lm_head.weight = model.embed.weight  # (.to() unties)
    model.other = nn.Linear(4, 10, bias=False, device="meta")  # meta tensors have no memory to overlap
    assert weight_sharers(model, ["lm_head", "other"]) == {"lm_head": "embed"}


def test_containers_that_read_child_weights():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=1)
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    reasons = {n: weight_reading_parent(encoder, n) for n in names}
    assert all(reasons.values()), reasons  # out_proj, linear1, linear2: every linear in it
    assert "nn.MultiheadAttention" in reasons["layers.0.self_attn.out_proj"]
    assert "nn.TransformerEncoderLayer" in reasons["layers.0.linear1"]
    decoder = nn.TransformerDecoderLayer(8, 2, 16)  # calls linear1/linear2 as modules
    assert weight_reading_parent(decoder, "linear1") is None
    assert weight_reading_parent(decoder, "self_attn.out_proj") is not None


def test_dynamic_mask_refuses_a_shared_weight():
    model = Tied()
    model.lm_head = spft.SparseDeltaLinear.from_linear(model.lm_head, torch.tensor([1, 5]), mode="split")
    optimizer = torch.optim.SGD([model.lm_head.delta], lr=0.1)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'embed'"):
        spft.DynamicMask(model, optimizer, None, None, metric="magnitude", density=0.1, interval=1,
                         target_modules=["lm_head"])
    model.lm_head.mark_weight_shared("embed")
    with pytest.raises(ValueError, match="shared with 'embed'"):
        model.lm_head.fold_delta()


def _meta_model():
    return nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 4, device="meta")])})


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: spft.salience_scores(m, metric="magnitude"), id="salience-magnitude"),
        pytest.param(lambda m: spft.salience_scores(m, metric="random"), id="salience-random"),
        pytest.param(lambda m: spft.row_importance(m, metric="l2"), id="row-importance"),
        pytest.param(lambda m: check_materialised("check", {"layers.0": m.layers[0]}), id="helper"),
        pytest.param(
            lambda m: spft.get_spft_model(m, spft.SpftConfig(method="speft", density=0.5, metric="magnitude")),
            id="get_spft_model",
        ),
    ],
)
def test_a_meta_model_is_named(call):
    with pytest.raises(ValueError, match="'layers.0' has its weight on the meta device"):
        call(_meta_model())


def test_meta_scores_are_named():
    with pytest.raises(ValueError, match="meta device"):
        spft.select_topk({"a": torch.randn(4, 4, device="meta")}, density=0.5)
    with pytest.raises(ValueError, match="meta device"):
        spft.select_rows({"a": torch.randn(4, device="meta")}, num_rows=2)


@pytest.mark.parametrize("call", [
    pytest.param(lambda m, b: spft.salience_scores(m, b, _loss, "gradient"), id="salience"),
    pytest.param(lambda m, b: spft.row_importance(m, b, _loss, "taylor"), id="row-importance"),
])
def test_gradient_metrics_under_inference_mode_say_so(call):
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 4)])})
    with torch.inference_mode(), pytest.raises(ValueError, match="needs gradients, which torch.inference_mode disables"):
        call(model, [torch.randn(2, 4)])
    with torch.no_grad():  # gradients are enabled inside
        call(model, [torch.randn(2, 4)])


def _loss(model, batch):
    return model.layers[0](batch).square().mean()
