// out[t, r] = src[t, rows[r]]: the SPruFT gather dy[..., rows] that feeds dWf = gᵀx.
#include <type_traits>

#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

template <typename T, typename IndexT>
__global__ void row_gather_kernel(const T* __restrict__ src, int64_t src_row_stride,
                                  const IndexT* __restrict__ rows, int64_t num_tokens,
                                  int64_t num_rows, T* __restrict__ out) {
  // One thread per output element, consecutive threads on consecutive r: stores coalesce and
  // the loads of a token stay within one row of src.
  const int64_t total = num_tokens * num_rows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / num_rows;
    const int64_t r = i - t * num_rows;
    out[i] = src[t * src_row_stride + static_cast<int64_t>(rows[r])];
  }
}

}  // namespace

cudaError_t row_gather(const void* src, int64_t src_row_stride, DType dtype, const void* rows,
                       bool rows_is_int64, int64_t num_tokens, int64_t num_rows, void* out,
                       cudaStream_t stream) {
  const int64_t total = num_tokens * num_rows;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned int grid = grid_for(total, kThreads);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (rows_is_int64) {
      row_gather_kernel<T, int64_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(src), src_row_stride, static_cast<const int64_t*>(rows), num_tokens,
          num_rows, static_cast<T*>(out));
    } else {
      row_gather_kernel<T, int32_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(src), src_row_stride, static_cast<const int32_t*>(rows), num_tokens,
          num_rows, static_cast<T*>(out));
    }
  };
  return launch_status(dispatch_float(dtype, launch));
}

}  // namespace spft
