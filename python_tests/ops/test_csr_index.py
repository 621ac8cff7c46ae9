"""The index as layers store it and the step reads it (ops/csr_index.py): CSR with 16-bit columns.
Exact round trip on awkward positions (int16's sign bit, 2^16 columns, int64 positions), 2 bytes
an entry, static shapes (it runs on fake tensors: no host sync, no data-dependent size), a fixed
and small number of ops whatever nnz, and the SparseIndex built on it."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import spft_kernels as spft
from spft_kernels.bench.op_count import OpCounter
from spft_kernels.ops.csr_index import CsrIndex, stored_bytes
from spft_kernels.ops.index import index_dtype_for


def _round_trip(flat, out_features, in_features):
    csr = CsrIndex.from_flat(flat, out_features, in_features)
    width = 2 if in_features <= 2**16 else 4
    assert csr.col_bytes.dtype == torch.uint8 and csr.col_bytes.shape == (width * flat.numel(),)
    assert csr.crow.shape == (out_features + 1,) and csr.nnz == flat.numel()
    back = csr.flat(index_dtype_for(out_features, in_features))
    assert back.dtype == index_dtype_for(out_features, in_features)
    assert torch.equal(back.long(), flat.long())
    wide = flat.long()
    assert torch.equal(csr.columns().long(), wide % in_features) and csr.columns().dtype == torch.int32
    assert torch.equal(csr.rows(), wide // in_features)
    return csr


@pytest.mark.parametrize(
    "in_features, columns",
    [
        (700, []),
        (700, [0, 699]),
        (40_000, [2**15 - 1, 2**15, 2**15 + 1, 39_999]),  # both sides of int16's sign bit: masked back
        (2**16, [0, 2**16 - 1]),  # the largest 16-bit column
        (70_001, [0, 2**16, 70_000]),  # past 16 bits: 4 bytes an entry
    ],
)
def test_round_trip_on_awkward_columns(in_features, columns):
    rows = [0, 3, 3, 7][: len(columns)] if columns else []
    flat = torch.tensor(sorted(r * in_features + c for r, c in zip(sorted(rows), columns)), dtype=torch.int64)
    _round_trip(flat.to(index_dtype_for(9, in_features)), 9, in_features)


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 1.0])
def test_round_trip_on_random_indices(density):
    for out_features, in_features in ((257, 263), (1, 70_001), (300, 1), (3, 40_000)):
        flat = spft.random_index(out_features, in_features, density, torch.Generator().manual_seed(3))
        _round_trip(flat, out_features, in_features)


def test_int64_positions_past_two_to_the_31():
    out_features, in_features = 50_000, 50_000  # 2.5e9 entries: the canonical index is int64
    flat = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + 65_539, out_features * in_features - 1])
    _round_trip(flat, out_features, in_features)


def test_two_bytes_an_entry():
    assert stored_bytes(1000, 4096, 11008) == 2 * 1000 + 4 * 4097
    assert stored_bytes(1000, 8, 70_000) == 4 * 1000 + 4 * 9


def test_no_data_dependent_shape_and_a_fixed_small_op_count():
    counts = []
    for density in (0.001, 0.1):
        flat = spft.random_index(512, 512, density, torch.Generator().manual_seed(0))
        csr = CsrIndex.from_flat(flat, 512, 512)
        with OpCounter() as columns_ops:
            csr.columns()
        with OpCounter() as flat_ops:
            csr.flat(torch.int32)
        counts.append((columns_ops.count, flat_ops.count))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # shapes only: no value is read
            fake = CsrIndex(mode.from_tensor(csr.crow), mode.from_tensor(csr.col_bytes), 512, 512)
            assert fake.flat(torch.int32).shape == flat.shape and fake.columns().shape == flat.shape
    # One cast gives the columns the library's CSR ops read; four ops the flat index.
    assert counts[0] == counts[1] == (1, 4)


def test_sparse_index_on_the_csr_form():
    flat = spft.random_index(40, 3000, 0.02, torch.Generator().manual_seed(5))
    csr = CsrIndex.from_flat(flat, 40, 3000)
    sparse_index = spft.SparseIndex(None, 40, 3000, csr=csr)
    assert sparse_index.nnz == flat.numel() and sparse_index.csr() is csr
    assert torch.equal(sparse_index.flat, flat)
    assert sparse_index.row_ptr is csr.crow  # the stored crow: no second copy
    assert torch.equal(sparse_index.row_ptr, spft.SparseIndex(flat, 40, 3000).row_ptr)
    assert torch.equal(spft.SparseIndex(flat, 40, 3000).csr().col_bytes, csr.col_bytes)
    with pytest.raises(TypeError, match="exactly one"):
        spft.SparseIndex(flat, 40, 3000, csr=csr)
    with pytest.raises(TypeError, match="exactly one"):
        spft.SparseIndex(None, 40, 3000)
