"""The split flat index (ops/compact_index.py, the adapter file's ``split16`` form): exact round
trip on awkward positions, the canonical dtype back, static shapes (it runs on fake tensors, so no
host sync and no data-dependent size) and a fixed number of ops whatever nnz. (Layers store the
CSR form instead: test_csr_index.py.)"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import spft_kernels as spft
from spft_kernels.ops.compact_index import BLOCK, block_count, compact_index, expand_index
from spft_kernels.ops.index import index_dtype_for


def _round_trip(flat, out_features, in_features):
    low_bytes, block_ends = compact_index(flat, out_features, in_features)
    assert low_bytes.dtype == torch.uint8 and low_bytes.shape == (2 * flat.numel(),)
    assert block_ends.shape == (block_count(out_features, in_features),)
    back = expand_index(low_bytes, block_ends, index_dtype_for(out_features, in_features))
    assert back.dtype == index_dtype_for(out_features, in_features)
    assert torch.equal(back.long(), flat.long())
    return low_bytes, block_ends


@pytest.mark.parametrize(
    "positions",
    [
        [],
        [0],
        [BLOCK - 1],  # the largest low half: its int16 is negative and must be masked back
        [BLOCK - 1, BLOCK],  # both sides of a block boundary
        [2**15 - 1, 2**15, 2**15 + 1],  # both sides of int16's sign bit
        [5, 3 * BLOCK + 7, 3 * BLOCK + BLOCK - 1, 9 * BLOCK],  # empty blocks between entries
    ],
)
def test_round_trip_on_awkward_positions(positions):
    out_features, in_features = 1000, 700  # 700,000 entries: 11 blocks, the last one partial
    _round_trip(torch.tensor(positions, dtype=torch.int32), out_features, in_features)


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 1.0])
def test_round_trip_on_random_indices(density):
    for out_features, in_features in ((257, 263), (1, 70_001), (300, 1)):
        flat = spft.random_index(out_features, in_features, density, torch.Generator().manual_seed(3))
        _round_trip(flat, out_features, in_features)


def test_int64_positions_past_two_to_the_31():
    out_features, in_features = 50_000, 50_000  # 2.5e9 entries: the canonical index is int64
    flat = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + BLOCK + 3, out_features * in_features - 1])
    _round_trip(flat, out_features, in_features)


def test_no_data_dependent_shape_and_a_fixed_op_count():
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for density in (0.001, 0.1):
        flat = spft.random_index(512, 512, density, torch.Generator().manual_seed(0))
        low_bytes, block_ends = compact_index(flat, 512, 512)
        with Count() as count:
            expand_index(low_bytes, block_ends, torch.int32)
        counts.append(count.calls)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # shapes only: no value is read
            fake = expand_index(mode.from_tensor(low_bytes), mode.from_tensor(block_ends), torch.int32)
        assert fake.shape == flat.shape
    assert counts[0] == counts[1] <= 8
