// y[t, rows[r]] += z[t, r]: the SPruFT scatter that adds x Wfᵀ into the frozen layer's output.
#include <type_traits>

#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

template <typename YT, typename ZT, typename IndexT>
__global__ void row_scatter_add_kernel(YT* __restrict__ y, int64_t y_row_stride, const ZT* __restrict__ z,
                                       int64_t z_row_stride, const IndexT* __restrict__ rows,
                                       int64_t num_tokens, int64_t num_rows) {
  // fp64 only when an operand is fp64: fp32 keeps bf16/fp16 results identical to the reference.
  using Acc = std::conditional_t<std::is_same_v<YT, double> || std::is_same_v<ZT, double>, double, float>;
  using Store = std::conditional_t<std::is_same_v<YT, double>, double, float>;  // from_float's argument
  // One thread per (token, row), consecutive threads on consecutive r: the loads of z coalesce
  // and a token's stores stay within one row of y. Rows are unique (validated once in Python),
  // so no two threads write the same element.
  const int64_t total = num_tokens * num_rows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / num_rows;
    const int64_t r = i - t * num_rows;
    YT* target = y + t * y_row_stride + static_cast<int64_t>(rows[r]);
    const Acc sum = add_rn(static_cast<Acc>(ScalarTraits<YT>::to_float(*target)),
                           static_cast<Acc>(ScalarTraits<ZT>::to_float(z[t * z_row_stride + r])));
    // An fp64 sum goes double -> float -> half/bf16, as torch's own casts do, so the rounding
    // matches the reference.
    *target = ScalarTraits<YT>::from_float(static_cast<Store>(sum));
  }
}

}  // namespace

cudaError_t row_scatter_add(void* y, int64_t y_row_stride, DType y_dtype, const void* z, int64_t z_row_stride,
                            DType z_dtype, const void* rows, bool rows_is_int64, int64_t num_tokens,
                            int64_t num_rows, cudaStream_t stream) {
  const int64_t total = num_tokens * num_rows;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned int grid = grid_for(total, kThreads);
  return launch_status(dispatch_float(y_dtype, [&](auto* y_tag) {
    using YT = std::remove_pointer_t<decltype(y_tag)>;
    return dispatch_float(z_dtype, [&](auto* z_tag) {
      using ZT = std::remove_pointer_t<decltype(z_tag)>;
      if (rows_is_int64) {
        row_scatter_add_kernel<YT, ZT, int64_t><<<grid, kThreads, 0, stream>>>(
            static_cast<YT*>(y), y_row_stride, static_cast<const ZT*>(z), z_row_stride,
            static_cast<const int64_t*>(rows), num_tokens, num_rows);
      } else {
        row_scatter_add_kernel<YT, ZT, int32_t><<<grid, kThreads, 0, stream>>>(
            static_cast<YT*>(y), y_row_stride, static_cast<const ZT*>(z), z_row_stride,
            static_cast<const int32_t*>(rows), num_tokens, num_rows);
      }
    });
  }));
}

}  // namespace spft
