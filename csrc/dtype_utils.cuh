// Scalar conversions shared by the kernels (torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "spft_kernels.h"

namespace spft {

template <typename T>
struct ScalarTraits;

template <>
struct ScalarTraits<float> {
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <>
struct ScalarTraits<double> {
  __device__ static double to_float(double v) { return v; }
  __device__ static double from_float(double v) { return v; }
};
template <>
struct ScalarTraits<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct ScalarTraits<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Explicitly rounded arithmetic (never contracted into an FMA), matching torch's CPU reference
// operation by operation so that every backend writes bitwise the same values.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Grid size for grid-stride loops: enough blocks to fill any current GPU several times over,
// capped so that huge inputs loop instead of overflowing gridDim.
inline unsigned int grid_for(int64_t work_items, int threads_per_block) {
  const int64_t blocks = (work_items + threads_per_block - 1) / threads_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536)));
}

}  // namespace spft

namespace spft {

namespace detail {
template <typename F, typename... Tags>
cudaError_t invoke(F& f, Tags*... tags) {
  if constexpr (std::is_void_v<decltype(f(tags...))>) {
    f(tags...);
    return cudaSuccess;
  } else {
    return f(tags...);
  }
}
}  // namespace detail

// Calls f with a null pointer of the C++ type that matches `dtype`; returns f's status (f may
// return void or a cudaError_t), or cudaErrorInvalidValue for an unknown dtype.
template <typename F>
cudaError_t dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return detail::invoke(f, static_cast<float*>(nullptr));
    case DType::kFloat64: return detail::invoke(f, static_cast<double*>(nullptr));
    case DType::kFloat16: return detail::invoke(f, static_cast<__half*>(nullptr));
    case DType::kBFloat16: return detail::invoke(f, static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// Calls f with null pointers of the index type and the pointer type. Pointers (row_ptr, col_ptr,
// csc_perm, tile_ptr) are int64 only when nnz >= 2^31, which implies int64 flat positions, so
// three of the four combinations occur; the fourth is refused.
template <typename F>
cudaError_t dispatch_index_and_pointers(bool index_is_int64, bool pointers_are_int64, F&& f) {
  if (pointers_are_int64) {
    return index_is_int64 ? detail::invoke(f, static_cast<int64_t*>(nullptr), static_cast<int64_t*>(nullptr))
                          : cudaErrorInvalidValue;
  }
  return index_is_int64 ? detail::invoke(f, static_cast<int64_t*>(nullptr), static_cast<int32_t*>(nullptr))
                        : detail::invoke(f, static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr));
}

// A launcher's result: the dispatch's error, else the launch's.
inline cudaError_t launch_status(cudaError_t dispatch_error) {
  return dispatch_error != cudaSuccess ? dispatch_error : cudaGetLastError();
}

}  // namespace spft
