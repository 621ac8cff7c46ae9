import pytest
import torch

import spft_kernels as spft
from spft_kernels.ops.index import index_dtype_for


def build(index, out_features=6, in_features=5, **kwargs):
    return spft.SparseIndex.build(index, out_features, in_features, name="layers.7.up_proj", **kwargs)


class TestValidation:
    def test_out_of_range(self):
        with pytest.raises(ValueError, match=r"layers.7.up_proj: index out of range: position 30"):
            build(torch.tensor([0, 30]))

    def test_negative(self):
        with pytest.raises(ValueError, match="position -1"):
            build(torch.tensor([-1, 3]))

    def test_duplicates_name_row_and_col(self):
        with pytest.raises(ValueError, match=r"duplicate positions, e.g. 7 \(row 1, col 2\)"):
            build(torch.tensor([9, 7, 7]))

    @pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
    def test_dtype(self, bad):
        with pytest.raises(ValueError, match="integer dtype"):
            build(bad)

    def test_rank(self):
        with pytest.raises(ValueError, match=r"must be 1-D flat positions \(row \* in_features \+ col\)"):
            build(torch.tensor([[0, 1], [1, 2]]))

    def test_device(self):
        with pytest.raises(ValueError, match="index is on meta but the weight is on cpu"):
            build(torch.tensor([1, 2], device="meta"), device=torch.device("cpu"))

    def test_not_a_tensor(self):
        with pytest.raises(ValueError, match="must be a torch.Tensor"):
            build([1, 2, 3])


def test_unsorted_input_is_sorted_and_the_order_returned():
    index = torch.tensor([17, 2, 29, 5])
    sparse_index, order = build(index)
    assert sparse_index.flat.tolist() == [2, 5, 17, 29]
    assert torch.equal(index[order], sparse_index.flat.long())
    _, order = build(sparse_index.flat)
    assert order is None


def test_canonical_dtype_follows_the_weight_size():
    assert build(torch.tensor([3], dtype=torch.int64))[0].flat.dtype == torch.int32
    assert index_dtype_for(46341, 46341) == torch.int64  # 46341**2 > 2**31
    big, _ = spft.SparseIndex.build(torch.tensor([2**31 + 5]), 65536, 65536)
    assert big.flat.dtype == torch.int64 and big.flat.item() == 2**31 + 5
    assert big.row_ptr[-1].item() == 1 and big.row_ptr[32768].item() == 0 and big.row_ptr[32769].item() == 1


@pytest.mark.parametrize("shape, density", [((6, 5), 0.5), ((1, 1), 1.0), ((13, 7), 0.0), ((40, 33), 0.07)])
def test_csr_and_csc_metadata_match_a_dense_mask(shape, density):
    out_features, in_features = shape
    sparse_index, _ = spft.SparseIndex.build(
        spft.random_index(out_features, in_features, density), out_features, in_features
    )
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[sparse_index.flat.long()] = True
    mask = mask.view(out_features, in_features)
    assert sparse_index.row_ptr.dtype == torch.int32
    assert torch.equal(sparse_index.row_ptr.diff(), mask.sum(1).int())
    assert torch.equal(sparse_index.col_ptr.diff(), mask.sum(0).int())
    rows, cols = sparse_index.rows_and_cols()
    assert torch.equal(rows.long() * in_features + cols.long(), sparse_index.flat.long())
    # csc_perm lists entries column by column, rows ascending inside a column
    perm = sparse_index.csc_perm.long()
    assert sorted(perm.tolist()) == list(range(sparse_index.nnz))
    csc_keys = cols[perm].long() * out_features + rows[perm].long()
    assert bool((csc_keys.diff() > 0).all()) if sparse_index.nnz > 1 else True


class TestRandomIndex:
    @pytest.mark.parametrize("density", [0.0, 0.013, 0.5, 0.77, 1.0])
    def test_exact_count_sorted_unique_in_range(self, density):
        index = spft.random_index(37, 29, density)
        total = 37 * 29
        assert index.numel() == round(density * total)
        assert index.dtype == torch.int32
        if index.numel():
            assert bool((index.diff() > 0).all()) and index.min() >= 0 and index.max() < total

    def test_generator_makes_it_reproducible(self):
        first = spft.random_index(50, 40, 0.1, generator=torch.Generator().manual_seed(3))
        second = spft.random_index(50, 40, 0.1, generator=torch.Generator().manual_seed(3))
        third = spft.random_index(50, 40, 0.1, generator=torch.Generator().manual_seed(4))
        assert torch.equal(first, second) and not torch.equal(first, third)

    @pytest.mark.parametrize("density", [0.1, 0.8])
    def test_positions_are_uniform(self, density):
        # 2000 masks of 100 positions: each position's count is Binomial(2000, density); a
        # biased sampler (e.g. one favouring low positions) fails this by many sigmas.
        generator = torch.Generator().manual_seed(0)
        counts = torch.zeros(100)
        draws = 2000
        for _ in range(draws):
            counts[spft.random_index(10, 10, density, generator=generator).long()] += 1
        expected = draws * density
        sigma = (draws * density * (1 - density)) ** 0.5
        assert (counts - expected).abs().max() < 5 * sigma
        assert abs(counts[:50].sum() - counts[50:].sum()) < 5 * sigma * 50**0.5

    @pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
    def test_bad_density(self, density):
        with pytest.raises(ValueError, match="density must be in"):
            spft.random_index(4, 4, density)

    def test_device_argument(self):
        assert spft.random_index(4, 4, 0.5, device="meta").device.type == "meta"


def test_derived_forms_are_built_on_first_access_and_reported():
    built = []
    flat = torch.tensor([1, 5, 6, 13], dtype=torch.int32)
    sparse_index = spft.SparseIndex(flat, 3, 5, on_build=lambda name, tensor: built.append(name))
    assert sparse_index.cached() == {} and sparse_index.tile_metadata  # density 4/15 >= 2%
    assert sparse_index.col_ptr.tolist() == [0, 1, 3, 3, 4, 4] and built == ["col_ptr"]
    assert sparse_index.col_ptr is sparse_index.cached()["col_ptr"] and built == ["col_ptr"]  # once
    moved = sparse_index.to(torch.device("cpu"))
    assert set(moved.cached()) == {"col_ptr"} and moved.tile_ptr.shape == (3, 2)
    assert spft.SparseIndex(flat, 300, 500).tile_ptr is None  # below TILE_SDDMM_MIN_DENSITY
