"""A training step of every method in about as many ops as LoRA, on every path a GPU would take:

- the ops one layer step launches (forward + backward, the default mode) stay within the budget
  of each method, the same for any number of tokens and any weight size;
- no host sync in a step (a dispatch mode fails on ``aten::_local_scalar_dense``: ``.item()``,
  ``.tolist()``, data-dependent shapes), also on the branches CUDA takes;
- ``torch.compile(fullgraph=True)`` traces a layer's forward and backward in every mode and
  kind, and layers of different sizes do not recompile once shapes are dynamic;
- ``weight=None`` (the base term computed elsewhere, e.g. a quantized base's matmul) gives the
  delta's term alone and its gradients, checked against fp64;
- the library's SDDMM is the masked ``dyᵀx`` and bitwise repeatable.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import spft_kernels as spft
from helpers import dense_weight
from spft_kernels.bench.op_count import OpCounter
from spft_kernels.ops import library_sparse, naive
from spft_kernels.ops.block_index import BlockIndex, block_entries
from spft_kernels.ops.csr_index import CsrIndex

# Ops per layer training step (forward + backward) in the default mode (README "Backends";
# LoRA: 12, full fine-tuning: 4). A regression past these fails here.
BUDGET = {
    "entries merged": 16,
    "entries split": 24,
    "rows merged": 10,
    "rows split": 10,
    "blocks merged": 16,
    "pst": 40,
}


def make_layer(kind, out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    if kind.startswith("entries"):
        index = spft.random_index(out_features, in_features, 0.01, generator=generator)
        layer = spft.SparseDeltaLinear.from_linear(linear, index, mode=kind.split()[1])
    elif kind.startswith("rows"):
        rows = torch.randperm(out_features, generator=generator)[: max(1, out_features // 50)]
        layer = spft.RowSparseLinear.from_linear(linear, rows, mode=kind.split()[1])
    elif kind.startswith("blocks"):
        grid = (out_features // 16) * (in_features // 16)
        blocks = torch.randperm(grid, generator=generator)[: max(2, grid // 20)]
        layer = spft.BlockSparseLinear.from_linear(linear, blocks, block_size=(16, 16), mode=kind.split()[1])
    else:
        layer = spft.PSTLinear.from_linear(linear, 0.5, r1=2, r2=2, generator=generator)
    with torch.no_grad():  # a trained-looking delta: the merged modes re-sync real values
        for name, parameter in layer.named_parameters():
            if parameter.requires_grad and name == "delta":
                parameter.normal_(0.0, 1e-3)
    return layer


def step(layer, x, dy):
    layer(x).backward(dy)


def ops_per_step(layer, tokens):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, layer.in_features, generator=generator, requires_grad=True)
    dy = torch.randn(tokens, layer.out_features, generator=generator)
    step(layer, x, dy)  # warm: merges, builds the threshold
    for parameter in [x, *layer.parameters()]:  # as a training loop does (zero_grad): no accumulation
        parameter.grad = None
    with OpCounter() as counter:
        step(layer, x, dy)  # the steady state: a merged layer re-syncs after each backward
    return counter.count, counter.by_op


@pytest.mark.parametrize("kind", sorted(BUDGET))
def test_ops_per_step_within_budget_for_any_tokens_and_size(kind):
    # A large weight (640x512: 2^18 entries and more) takes the same ops at any tokens; small
    # weights and small steps may take shorter paths (entries: ops/library_sparse.py, the kept
    # flat positions of ops/index.py), never longer ones.
    counts = {}
    for shape in ((64, 64), (256, 192), (640, 512)):
        for tokens in (16, 300):
            counts[shape, tokens], by_op = ops_per_step(make_layer(kind, *shape), tokens)
            assert counts[shape, tokens] <= BUDGET[kind], (kind, shape, tokens, dict(by_op))
    large = {counts[(640, 512), tokens] for tokens in (16, 300)}
    assert len(large) == 1, counts
    assert max(counts.values()) <= large.pop(), counts


@pytest.mark.parametrize("chunks", [1, 3, 6])
def test_pst_reference_ops_grow_only_with_its_chunks(monkeypatch, chunks):
    """PST's reference step works on row chunks of ``CHUNK_ENTRIES`` entries (its memory bound):
    its ops are ``ONE_CHUNK_STEP_OPS`` for one chunk, else ``STEP_OPS_FIXED + STEP_OPS_PER_CHUNK *
    chunks`` (4096x4096 is 3 chunks, 11008x4096 6), for any tokens. The chunk size is made small
    here so that a 44x40 weight has the chunk counts of those large weights."""
    from spft_kernels.nn import pst_linear as pst_layer
    from spft_kernels.ops import pst_reference

    n, k = 44, 40
    monkeypatch.setattr(pst_layer, "KEEP_MASK_ENTRIES", 0)  # the mask made in the step, as a large layer does
    monkeypatch.setattr(pst_reference, "CHUNK_ENTRIES", -(-n // chunks) * k)
    assert len(pst_reference.row_blocks(n, k)) == chunks
    bound = pst_reference.step_ops_bound(n, k)
    counts = {}
    for tokens in (3, 70):
        count, by_op = ops_per_step(make_layer("pst", n, k), tokens)
        # conftest.py fills every torch.empty with NaN (one op each, not run outside the tests).
        counts[tokens] = count - by_op["aten::fill_"]
    assert set(counts.values()) == {bound}, (counts, bound)


def test_pst_reference_chunks_at_model_sizes():
    from spft_kernels.ops import pst_reference

    assert pst_reference.step_ops_bound(2048, 2048) <= BUDGET["pst"]
    assert [len(pst_reference.row_blocks(*shape)) for shape in ((2048, 2048), (4096, 4096), (11008, 4096))] == [1, 3, 6]


def test_a_small_pst_layer_skips_the_mask_in_its_step():
    # nn/pst_linear.py KEEP_MASK_ENTRIES: the mask kept from the threshold, so the step makes no
    # score, keys or tie cut: 3 ops forward, 14 backward (38 when the step makes the mask).
    count, by_op = ops_per_step(make_layer("pst", 64, 64), 16)
    assert count - by_op["aten::fill_"] <= 17, dict(by_op)
    assert "aten::bitwise_xor_" not in by_op and "aten::lt" not in by_op, dict(by_op)


# --- no host sync ---------------------------------------------------------------------------------


class FailOnHostSync(TorchDispatchMode):
    """Raises where a step would wait for the device: reading a value on the host, or an op whose
    output shape depends on the data."""

    SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
             "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            raise AssertionError(f"host sync in a training step: {func._schema.name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cuda_branches(monkeypatch):
    """The branches the package takes off the CPU, taken on CPU tensors: the row blocks select
    their entries by mask instead of reading bounds on the host."""
    original = naive._RowBlocks.of.__func__

    def sync_free_of(cls, flat, out_features, in_features, sync_free, fraction=naive.WEIGHT_FRACTION):
        return original(cls, flat, out_features, in_features, True, fraction)

    monkeypatch.setattr(naive._RowBlocks, "of", classmethod(sync_free_of))


@pytest.mark.parametrize("kind", sorted(BUDGET) + ["blocks split", "entries fused"])
def test_a_training_step_never_syncs_with_the_device(kind, cuda_branches):
    layer = make_layer(kind if kind != "entries fused" else "entries split", 64, 48)
    if kind == "entries fused":
        layer.mode = "fused"
    x = torch.randn(7, 48, requires_grad=True)
    dy = torch.randn(7, 64)
    step(layer, x, dy)  # builds the state once per index change / threshold outside the step
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3, fused=True)
    optimizer.step()
    optimizer.zero_grad()
    if kind == "pst":
        layer.threshold()  # once per optimizer step, cached: not part of the micro-step
    with FailOnHostSync():
        step(layer, x, dy)


def test_the_dense_fallback_never_syncs_either(cuda_branches):
    # Above the library's density the row blocks run (ops/library_sparse.py).
    index = spft.random_index(32, 24, 0.5, torch.Generator().manual_seed(0))
    layer = spft.SparseDeltaLinear.from_linear(torch.nn.Linear(24, 32), index, mode="split")
    x, dy = torch.randn(5, 24, requires_grad=True), torch.randn(5, 32)
    with FailOnHostSync():
        step(layer, x, dy)
    y_ref = F.linear(x.detach().double(), dense_weight(layer.weight, layer.delta, index), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-5)


# --- torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUDGET) + ["blocks split", "entries fused"])
def test_compile_fullgraph_forward_and_backward(kind):
    torch._dynamo.reset()
    eager = make_layer(kind if kind != "entries fused" else "entries split", 48, 32)
    if kind == "entries fused":
        eager.mode = "fused"
    compiled_layer = make_layer(kind if kind != "entries fused" else "entries split", 48, 32)
    if kind == "entries fused":
        compiled_layer.mode = "fused"
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 32)
    dy = torch.randn(5, 48)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(yc, ye)
        torch.testing.assert_close(xc.grad, xe.grad)
        for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
            if pe.requires_grad:
                torch.testing.assert_close(pc.grad, pe.grad, msg=name)
                pe.grad = pc.grad = None


def test_layers_of_different_sizes_recompile_no_more_than_plain_linears():
    """torch.compile keeps parameters' and buffers' shapes static by default, so a plain
    nn.Linear recompiles for each new weight shape too; a sparse layer must not add to that
    (before: the flat index expansion and host-side bounds added specialisations of their own)."""

    def graphs_for(make):
        torch._dynamo.reset()
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        @torch.compile(backend=counting_backend, fullgraph=True)
        def forward(layer, x):
            return layer(x)

        for out_features, in_features in ((48, 32), (64, 40), (48, 32), (80, 56), (64, 40)):
            forward(make(out_features, in_features), torch.randn(3, in_features)).sum().backward()
        return len(graphs)

    plain = graphs_for(lambda out_features, in_features: torch.nn.Linear(in_features, out_features))
    for kind in ("entries split", "entries merged", "rows merged", "blocks merged", "pst"):
        assert graphs_for(lambda o, i: make_layer(kind, o, i)) <= plain, kind


# --- weight=None: the delta's term alone ----------------------------------------------------------


def _check_delta_term(y, x, delta_dense, bias, dy, dx, ddelta_dense_grad):
    x64 = x.detach().double().requires_grad_(True)
    d64 = delta_dense.detach().double().requires_grad_(True)
    y64 = F.linear(x64, d64, None if bias is None else bias.double())
    gx, gd = torch.autograd.grad(y64, [x64, d64], dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx.double(), gx, rtol=1e-12, atol=1e-12)
    return gd


def test_entries_without_the_weight_give_the_delta_term_alone():
    generator = torch.Generator().manual_seed(3)
    index = spft.random_index(30, 20, 0.1, generator=generator)
    sparse_index, _ = spft.SparseIndex.build(index, 30, 20)
    x = torch.randn(4, 3, 20, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(index.numel(), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64)
    dy = torch.randn(4, 3, 30, dtype=torch.float64)
    y = spft.sparse_delta_linear(x, None, delta, sparse_index, bias)
    y.backward(dy)
    dense = dense_weight(torch.zeros(30, 20), delta, index)
    gd = _check_delta_term(y, x, dense, bias, dy, x.grad, None)
    torch.testing.assert_close(delta.grad, gd.view(-1)[index.long()], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="merged=True needs the weight"):
        spft.sparse_delta_linear(x, None, delta, sparse_index, merged=True)
    with pytest.raises(ValueError, match="SparseIndex"):
        spft.sparse_delta_linear(x, None, delta, index)


def test_rows_without_the_weight_give_the_delta_term_alone():
    rows = torch.tensor([2, 7, 11])
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 20, dtype=torch.float64)
    y = spft.row_delta_linear(x, None, delta, rows, out_features=20)
    y.backward(dy)
    dense = torch.zeros(20, 16, dtype=torch.float64).index_copy(0, rows, delta.detach())
    gd = _check_delta_term(y, x, dense, None, dy, x.grad, None)
    torch.testing.assert_close(delta.grad, gd[rows], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="out_features"):
        spft.row_delta_linear(x, None, delta, rows)


def test_blocks_without_the_weight_give_the_delta_term_alone():
    block_index, _ = BlockIndex.build(torch.tensor([0, 4, 5]), 24, 18, (8, 6))
    x = torch.randn(5, 18, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64)
    dy = torch.randn(5, 24, dtype=torch.float64)
    y = spft.block_delta_linear(x, None, delta, block_index, None, bias)
    y.backward(dy)
    flat, where = block_entries(block_index.blocks, (24, 18), (8, 6))
    dense = torch.zeros(24 * 18, dtype=torch.float64).index_copy(0, flat, delta.detach().reshape(-1)[where]).view(24, 18)
    gd = _check_delta_term(y, x, dense, bias, dy, x.grad, None)
    torch.testing.assert_close(delta.grad.reshape(-1)[where], gd.reshape(-1)[flat], rtol=1e-12, atol=1e-12)


# --- the library's sparse products ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_library_products_match_the_dense_definition_and_repeat_bitwise(dtype):
    generator = torch.Generator().manual_seed(7)
    out_features, in_features, tokens = 70, 50, 33
    index = spft.random_index(out_features, in_features, 0.05, generator=generator)
    csr = CsrIndex.from_flat(index, out_features, in_features)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    dy = torch.randn(tokens, out_features, generator=generator).to(dtype)
    delta = torch.randn(index.numel(), generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    dense = dense_weight(torch.zeros(out_features, in_features), delta, index)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    grad = library_sparse.sddmm(x, dy, csr)
    torch.testing.assert_close(grad.double(), (dy.double().t() @ x.double()).view(-1)[index.long()], **tolerance)
    torch.testing.assert_close(library_sparse.x_delta_t(x, delta, csr).double(), x.double() @ dense.t(), **tolerance)
    torch.testing.assert_close(library_sparse.dy_delta(dy, delta, csr).double(), dy.double() @ dense, **tolerance)
    assert torch.equal(grad, library_sparse.sddmm(x, dy, csr))
    assert grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("kind", sorted(BUDGET) + ["blocks split"])
def test_activation_checkpointing_unpacks_saved_tensors_once(kind):
    # torch.utils.checkpoint (non-reentrant) refuses a second read of ctx.saved_tensors.
    layer = make_layer(kind, 32, 32)
    x = torch.randn(4, 32, requires_grad=True)
    dy = torch.randn(4, 32)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).backward(dy)
    expected = x.grad.clone()
    x.grad = None
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, expected)
