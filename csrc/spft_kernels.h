// Torch-free launcher declarations. Kernels take raw pointers, sizes and a stream so that
// each .cu file compiles in seconds; only binding.cpp includes torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace spft {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// weight_flat[index[k]] = cast(b_k + alpha * delta[k]) for k < nnz, where b_k is base[k] when
// base is non-null, else weight_flat[index[k]]; delta may be null (then the term is 0).
// Arithmetic in fp32 (fp64 when weight or delta is fp64), rounded once to the weight's dtype.
// base has the weight's dtype. Index entries must be unique and in range (validated once in Python).
cudaError_t scatter_delta(void* weight, DType weight_dtype, const void* index, bool index_is_int64,
                          int64_t nnz, const void* base, const void* delta, DType delta_dtype,
                          double alpha, cudaStream_t stream);

// out[t * num_rows + r] = src[t * src_row_stride + rows[r]]: the SPruFT row gather dy[..., rows].
// rows must be in range (validated once in Python).
cudaError_t row_gather(const void* src, int64_t src_row_stride, DType dtype, const void* rows,
                       bool rows_is_int64, int64_t num_tokens, int64_t num_rows, void* out,
                       cudaStream_t stream);

// y[t * y_row_stride + rows[r]] = cast(y[...] + z[t * z_row_stride + r]) for t < num_tokens,
// r < num_rows: the SPruFT scatter y[..., rows] += x Wfᵀ. The sum is formed in fp32 (fp64 when y
// or z is fp64) and rounded once to y's dtype; z may have another float dtype than y. rows must
// be unique and in range (validated once in Python); y and z must not overlap.
cudaError_t row_scatter_add(void* y, int64_t y_row_stride, DType y_dtype, const void* z, int64_t z_row_stride,
                            DType z_dtype, const void* rows, bool rows_is_int64, int64_t num_tokens,
                            int64_t num_rows, cudaStream_t stream);

// out[t, o] = base[t, o] + sum over the entries k of output o of delta[k] * src[t, g_k], rounded
// once to base's dtype, for t < num_tokens, o < num_outputs. Not transposed (x Δᵀ, CSR):
// outputs are rows of Δ, pointers = row_ptr, entries k run in canonical order, g_k = col_k.
// Transposed (dy Δ, CSC): outputs are columns, pointers = col_ptr, k = perm[j], g_k = row_k.
// base and src share a dtype; the sum is in fp32 (fp64 if an operand is fp64), over each
// output's entries in a fixed order, so results are bitwise reproducible. out is contiguous.
// delta is in the accumulate dtype (fp64 when accumulate_fp64, else fp32; the binding converts).
cudaError_t spmm_add(const void* base, int64_t base_row_stride, const void* src, int64_t src_row_stride,
                     DType dtype, const void* delta, bool accumulate_fp64, const void* index, bool index_is_int64,
                     const void* pointers, const void* perm, bool pointers_are_int64, int64_t in_features,
                     int64_t num_tokens, int64_t num_outputs, bool transposed, void* out, cudaStream_t stream);

// SDDMM, the delta gradient grad[k] = sum_t dy[t, row_k] * x[t, col_k] (fp32; fp64 for fp64
// inputs), x [T, in] and dy [T, out] read in place (row strides, unit feature stride).
// Gather-dot variant: thread per entry over a token split; each split writes its own row of
// `partials` ([num_splits, nnz], the accumulate dtype; unused when num_splits == 1) and a
// second pass adds the splits in order, so the result is bitwise reproducible without atomics.
cudaError_t sddmm_gather_dot(const void* x, int64_t x_row_stride, const void* dy, int64_t dy_row_stride,
                             DType dtype, const void* index, bool index_is_int64, int64_t nnz,
                             int64_t in_features, int64_t num_tokens, int64_t num_splits, void* partials,
                             void* grad, cudaStream_t stream);

// Tensor-core variant (fp16/bf16 only): one block per 64 x 64 tile of dyᵀx over all tokens in
// order, then a masked epilogue writes only the tile's entries, found through tile_ptr
// ([out, ceil(in / 64) + 1], SparseIndex.tile_ptr). grad is fp32.
cudaError_t sddmm_tiles(const void* x, int64_t x_row_stride, const void* dy, int64_t dy_row_stride, DType dtype,
                        const void* index, bool index_is_int64, const void* tile_ptr, bool tile_ptr_is_int64,
                        int64_t out_features, int64_t in_features, int64_t num_tokens, float* grad,
                        cudaStream_t stream);

// The fused forward y = x (W0 + Δ)ᵀ + bias in one GEMM: each W0 tile gets the delta entries
// that fall in it added (fp32 sum rounded once to the weight's dtype, bitwise the merged mode's
// weight) in shared memory before the matrix instructions; W0 is never written. fp16/bf16 on
// tensor cores, fp32/fp64 on CUDA cores; fp32 accumulate (fp64 for fp64). x [M, K] (row
// stride, unit feature stride), weight [N, K] contiguous, bias [N] or null, y [M, N] contiguous.
// Entries are found through row_ptr (CSR): per output row, a cursor walks its sorted entries
// along the K loop, so no further metadata is needed. delta is fp32, or fp64 (delta_fp64) when the
// weight or the master delta is fp64 (the binding converts): W0 + delta is summed in the precision
// scatter_delta sums it in, so the weight is bitwise the merged one for every master dtype.
// fp16/bf16 need compute capability 8.0 or newer.
cudaError_t fused_delta_linear(const void* x, int64_t x_row_stride, const void* weight, const void* bias, DType dtype,
                               const void* delta, bool delta_fp64, const void* index, bool index_is_int64,
                               const void* row_ptr, bool row_ptr_is_int64, int64_t num_tokens,
                               int64_t out_features, int64_t in_features, void* y, cudaStream_t stream);

}  // namespace spft
