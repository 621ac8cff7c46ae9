"""A fifth position kind in this one file, registered through the public protocol
(``spft.register_kind``, ``docs/architecture.md``): whole input *columns* of a weight train
(``y = x W0ᵀ + x[..., cols] Δᵀ + b``, Δ: [out, C]). It converts, trains, saves, loads, merges
(alone and with other adapters) and crosses to peft's SHiRA format through the package's own
calls, with no edit to ``spft_kernels/``: the test that a new kind is one file."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers
from spft_kernels.nn.stored import AdapterPayload, expect_tensor, take_tensors, VALUE_DTYPES
from spft_kernels.ops.index import canonical_rows

from tiny_models import one_thread, tiny_batches, tiny_model, train  # noqa: F401  (fixture)


class _ColumnDeltaLinear(torch.autograd.Function):
    """``x W0ᵀ + b`` (+ ``x[..., cols] Δᵀ`` unless the weight already holds W0 + Δ); only x is saved."""

    @staticmethod
    def forward(ctx, x, weight, delta, columns, bias, merged):
        ctx.save_for_backward(x, weight, delta, columns)
        ctx.merged = merged
        y = F.linear(x, weight, bias)
        return y if merged else y + x[..., columns] @ delta.to(x.dtype).T

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, columns = ctx.saved_tensors
        dx = dy @ weight
        if not ctx.merged:
            dx = dx.index_add(-1, columns, dy @ delta.to(dy.dtype))
        d_delta = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])[:, columns]
        return dx, None, d_delta.to(delta.dtype), None, None, None


class ColumnSparseLinear(spft.DeltaLayer):
    kind = "columns"
    positions_key = "columns"
    unit = "columns"
    shira_kind = "columns"

    @classmethod
    def _validate(cls, columns, out_features, in_features, device, name, layer=None):
        return canonical_rows(columns, in_features, device=device, name=name)  # unique ids in [0, in)

    def _adopt(self, columns):
        self.register_buffer("columns", columns, persistent=False)

    @staticmethod
    def _positions_tensor(columns):
        return columns

    def _delta_shape(self, columns):
        return (self.out_features, columns.numel())

    def _gather_w0(self):
        return self.weight[:, self.columns]

    @torch.no_grad()
    def _write(self, weight, base, delta):
        current = weight[:, self.columns] if base is None else base
        if delta is not None:
            current = (current.to(torch.float64) + delta.to(torch.float64)).to(weight.dtype)
        weight[:, self.columns] = current
        return weight

    def _functional(self, x):
        merged = self._computes_merged()
        return _ColumnDeltaLinear.apply(x, self.weight, self.delta, self.columns, self.bias, merged)

    def _describe(self):
        return f"columns={self.columns.numel()}"

    def _kept_entries(self):
        return _column_entries(self.columns, self.out_features, self.in_features), self._w0_at_index.reshape(-1)

    # the protocol

    @classmethod
    def select_positions(cls, selection):
        """The columns with the largest summed scores, the budget's density of each layer's columns."""
        density = selection.budget["density"]
        chosen = {}
        for name, score in selection.scores().items():
            count = max(1, round(density * score.shape[1]))
            chosen[name] = torch.topk(score.sum(0), count).indices.sort().values
        return chosen

    @classmethod
    def flat_positions(cls, positions, shape, options):
        return _column_entries(positions, *shape)

    @classmethod
    def entries_of(cls, positions, values, shape, options):
        return _column_entries(positions, *shape), values["delta"].reshape(-1)

    @classmethod
    def entries_per_position(cls, shape, options):
        return shape[0]

    @classmethod
    def from_entries(cls, where, count, shape, flat, values):
        grid = flat.view(shape[0], count)
        columns = grid[0]
        if not torch.equal(grid, torch.arange(shape[0])[:, None] * shape[1] + columns):
            raise ValueError(f"{where}: not whole columns")
        return columns, {"delta": values.view(shape[0], count)}

    def adapter_payload(self):
        return AdapterPayload({"delta": self.delta.detach()}, {"columns": self.columns.to(torch.int32)},
                              {"count": self.columns.numel(), "index": None}, self.columns)

    @classmethod
    def read_adapter_payload(cls, where, name, entry, tensors, shape):
        parts = take_tensors(where, name, tensors, ("columns", "delta"))
        expect_tensor(f"{name}.delta", parts["delta"], VALUE_DTYPES, (shape[0], entry["count"]))
        expect_tensor(f"{name}.columns", parts["columns"], (torch.int32, torch.int64), (entry["count"],))
        return parts["columns"], {"delta": parts["delta"]}, {}, {f"{name}.columns", f"{name}.delta"}


def _column_entries(columns, out_features, in_features):
    rows = torch.arange(out_features, device=columns.device)[:, None]
    return (rows * in_features + columns.long()[None, :]).reshape(-1)  # sorted for sorted columns


@pytest.fixture
def columns_kind():
    spft.register_kind(ColumnSparseLinear)
    yield ColumnSparseLinear
    spft.unregister_kind(ColumnSparseLinear)


def _converted(seed=0, density=0.25):
    """The same base model; ``seed`` draws the columns."""
    model = tiny_model("llama")
    config = spft.SpftConfig(method="sparta", density=density, kind="columns", seed=seed)
    return spft.get_spft_model(model, config)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_a_kind_of_ones_own_converts_trains_saves_loads_and_merges(columns_kind, one_thread, tmp_path):
    assert "columns" in spft.registered_kinds()
    batches = tiny_batches("llama")
    plain = _logits(tiny_model("llama"), batches[0])
    model = _converted()
    layers = spft_layers(model)
    assert layers and all(type(layer) is ColumnSparseLinear for layer in layers.values())
    assert all(layer.merged for layer in layers.values())  # auto merged: the base allows it
    assert torch.equal(_logits(model, batches[0]), plain)  # delta = 0: exactly the base model
    losses = train(model, batches, steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    trained = _logits(model, batches[0])
    assert not torch.allclose(trained, plain)

    # save -> load into a fresh base: the same model
    path = spft.save_adapter(model, tmp_path / "columns")
    loaded = spft.load_adapter(tiny_model("llama"), path)
    assert all(type(layer) is ColumnSparseLinear for layer in spft_layers(loaded).values())
    torch.testing.assert_close(_logits(loaded, batches[0]), trained, rtol=0, atol=1e-12)
    # the base fingerprint guards it: another base is refused
    with pytest.raises(ValueError, match="fingerprint"):
        spft.load_adapter(tiny_model("llama", seed=5), path)

    # peft's SHiRA format and back: columns again, the same values
    shira = spft.save_adapter(model, tmp_path / "shira", format="peft")
    again = spft.load_adapter(tiny_model("llama"), shira)
    assert all(type(layer) is ColumnSparseLinear for layer in spft_layers(again).values())
    torch.testing.assert_close(_logits(again, batches[0]), trained, rtol=0, atol=1e-12)

    # a state dict loads into a fresh converted model
    fresh = _converted()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(fresh, batches[0]), trained, rtol=0, atol=1e-12)

    # merge_and_unload: plain linears holding W0 + Δ, the same outputs
    merged = spft.merge_and_unload(copy.deepcopy(model))
    assert not spft_layers(merged)
    torch.testing.assert_close(_logits(merged, batches[0]), trained, rtol=0, atol=1e-12)


def test_adapters_of_a_new_kind_sum_as_entries(columns_kind, one_thread, tmp_path):
    """merge_adapters: the kind has no sum of its own (``sum_stored`` is None), so two adapters
    become scattered entries holding Δa + Δb."""
    batches = tiny_batches("llama")
    paths, deltas = [], []
    for seed in (1, 2):
        model = _converted(seed=seed)
        train(model, batches, steps=2, lr=1e-2)
        paths.append(spft.save_adapter(model, tmp_path / f"a{seed}.safetensors"))
        base = tiny_model("llama")
        deltas.append({name: layer.merged_weight() - base.get_submodule(name).weight.detach()
                       for name, layer in spft_layers(model).items()})
    base = tiny_model("llama")
    weights = {name: base.get_submodule(name).weight.detach().clone() for name in deltas[0]}
    model = spft.merge_adapters(base, paths)
    layers = spft_layers(model)
    assert {layer.kind for layer in layers.values()} == {"entries"}
    for name, layer in layers.items():
        expected = weights[name] + deltas[0][name] + deltas[1][name]
        torch.testing.assert_close(layer.merged_weight(), expected, rtol=0, atol=1e-12)


def test_registering_checks_the_class_and_the_name(columns_kind):
    with pytest.raises(TypeError, match="SpftLayer"):
        spft.register_kind(torch.nn.Linear)
    taken = type("Taken", (ColumnSparseLinear,), {})
    with pytest.raises(ValueError, match="taken"):
        spft.register_kind(taken)
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        spft.SpftConfig(method="sparta", density=0.1, kind="nope")
