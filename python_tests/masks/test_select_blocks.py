"""select_blocks and random_blocks: block scores, exact counts per budget and scope, ties."""

import math

import pytest
import torch
import torch.nn as nn

import spft_kernels as spft
from spft_kernels.masks.select_blocks import block_scores


def test_block_scores_sum_each_block_and_clip_the_edges():
    score = torch.arange(5 * 7, dtype=torch.float32).view(5, 7)
    summed = block_scores(score, (2, 3))
    assert summed.shape == (3, 3) and summed.dtype == torch.float64
    for r in range(3):
        for c in range(3):
            assert summed[r, c] == score[2 * r:2 * r + 2, 3 * c:3 * c + 3].double().sum()


def test_global_top_blocks_by_summed_score():
    scores = {"a": torch.zeros(8, 8), "b": torch.zeros(8, 4)}
    scores["a"][4:, :4] = 1.0  # block 2 of a (grid 2 x 2) sums to 16
    scores["b"][0, 0] = 20.0  # block 0 of b (grid 2 x 1)
    scores["b"][7, 3] = 0.5
    chosen = spft.select_blocks(scores, (4, 4), num_blocks=3)
    assert chosen["b"].tolist() == [0, 1] and chosen["a"].tolist() == [2]
    assert chosen["a"].dtype == torch.int64
    assert spft.select_blocks(scores, (4, 4), num_params=2 * 16)["b"].tolist() == [0]


def test_ties_go_to_the_earlier_module_and_block():
    scores = {"a": torch.ones(8, 8), "b": torch.ones(8, 8)}
    chosen = spft.select_blocks(scores, (4, 4), num_blocks=3)
    assert chosen["a"].tolist() == [0, 1, 2] and chosen["b"].tolist() == []


def test_budgets_and_scopes_give_exact_counts():
    torch.manual_seed(0)
    scores = {"q": torch.rand(64, 64), "mlp": torch.rand(128, 64)}  # 16 x 16 blocks: 16 and 32 of them
    counts = lambda chosen: {n: len(v) for n, v in chosen.items()}  # noqa: E731
    assert sum(counts(spft.select_blocks(scores, 16, density=0.25)).values()) == 12
    assert counts(spft.select_blocks(scores, 16, density=0.25, scope="local")) == {"q": 4, "mlp": 8}
    assert sum(counts(spft.select_blocks(scores, (16, 16), num_params=5 * 256 + 100)).values()) == 5
    assert counts(spft.select_blocks(scores, 16, num_params=6 * 256, scope="local")) == {"q": 2, "mlp": 4}
    assert counts(spft.select_blocks(scores, 16, num_blocks={"q": 1, "mlp": 3})) == {"q": 1, "mlp": 3}
    # LoRA rank 4: q 4 * 128 / 256 = 2 blocks, mlp 4 * 192 / 256 = 3 blocks (2.5 rounds half up);
    # global: round(1280 / 256) = 5 in all.
    assert counts(spft.select_blocks(scores, 16, lora_rank=4, scope="local")) == {"q": 2, "mlp": 3}
    assert sum(counts(spft.select_blocks(scores, 16, lora_rank=4)).values()) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"),
    (dict(density=0.1, num_params=10), "exactly one of"),
    (dict(num_params=10), "half a block"),
    (dict(num_blocks=99), "num_blocks must be an int in"),
    (dict(num_blocks={"zz": 1}), "unknown modules"),
    (dict(density=1.5), "density"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(density=0.5, scope="row"), "unknown scope"),
])
def test_bad_budgets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spft.select_blocks({"q": torch.rand(64, 64)}, (16, 16), **kwargs)


def test_bad_scores_and_block_size():
    with pytest.raises(ValueError, match="select_blocks: q: the scores contain NaN"):
        spft.select_blocks({"q": torch.full((4, 4), math.nan)}, 2, density=0.5)
    with pytest.raises(ValueError, match="block_size"):
        spft.select_blocks({"q": torch.rand(4, 4)}, (2, 0), density=0.5)


def test_random_blocks_exact_counts_seeded_and_on_the_weights_device():
    modules = {"a": nn.Linear(64, 64), "b": nn.Linear(64, 128)}
    first = spft.random_blocks(modules, (16, 16), density=0.5, generator=torch.Generator().manual_seed(3))
    again = spft.random_blocks(modules, (16, 16), density=0.5, generator=torch.Generator().manual_seed(3))
    assert sum(len(v) for v in first.values()) == 24 and all(torch.equal(first[n], again[n]) for n in first)
    for name, ids in first.items():
        assert ids.tolist() == sorted(set(ids.tolist())) and ids.dtype == torch.int64
        assert ids.max() < (16 if name == "a" else 32)
    local = spft.random_blocks(modules, (16, 16), num_blocks=6, scope="local")
    assert {n: len(v) for n, v in local.items()} == {"a": 2, "b": 4}
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 64)))
    assert len(spft.random_blocks(model, 64, num_blocks=1)["0.0"]) == 1


def test_numpy_integers_are_integers_for_the_block_size_and_every_budget():
    np = pytest.importorskip("numpy")
    scores = {"a": torch.rand(64, 64, generator=torch.Generator().manual_seed(0)), "b": torch.rand(32, 64)}
    modules = {"a": nn.Linear(64, 64), "b": nn.Linear(64, 32)}
    budgets = [dict(num_blocks=5), dict(num_blocks={"a": 2, "b": 1}), dict(num_params=3 * 256), dict(lora_rank=4)]
    for budget in budgets:
        as_numpy = {key: ({n: np.int64(v) for n, v in value.items()} if isinstance(value, dict) else np.int32(value))
                    for key, value in budget.items()}
        expected = spft.select_blocks(scores, (16, 16), **budget)
        for block_size in (np.int64(16), (np.int32(16), np.int64(16)), [np.int64(16), 16]):
            chosen = spft.select_blocks(scores, block_size, **as_numpy)
            assert {n: v.tolist() for n, v in chosen.items()} == {n: v.tolist() for n, v in expected.items()}, budget
        drawn = spft.random_blocks(modules, np.int64(16), generator=torch.Generator().manual_seed(5), **as_numpy)
        again = spft.random_blocks(modules, 16, generator=torch.Generator().manual_seed(5), **budget)
        assert {n: v.tolist() for n, v in drawn.items()} == {n: v.tolist() for n, v in again.items()}, budget
    layer = spft.BlockSparseLinear.from_linear(nn.Linear(64, 32), torch.tensor([1]), block_size=(np.int64(8), np.int32(4)))
    assert layer.block_size == (8, 4) and all(type(size) is int for size in layer.block_size)
    config = spft.SpftConfig(method="sparta", density=0.1, block_size=np.int64(8))
    assert config.block_size == (8, 8) and spft.SpftConfig.from_json(config.to_json()).block_size == (8, 8)
    for bad in (np.float64(8.0), (np.int64(0), 4), (True, 4)):
        with pytest.raises(ValueError, match="block_size must be a pair of positive ints"):
            spft.select_blocks(scores, bad, num_blocks=1)
