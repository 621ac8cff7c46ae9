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

}  // namespace spft
