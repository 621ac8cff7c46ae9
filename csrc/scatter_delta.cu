// W.flat[idx] = (W0[idx] or W.flat[idx]) + alpha * delta: merge, unmerge and the merged-mode re-sync.
#include <type_traits>

#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

template <typename WeightT, typename DeltaT, typename IndexT>
__global__ void scatter_delta_kernel(WeightT* __restrict__ weight, const IndexT* __restrict__ index,
                                     int64_t nnz, const WeightT* __restrict__ base,
                                     const DeltaT* __restrict__ delta, double alpha) {
  // fp64 only when an operand is fp64: fp32 keeps bf16/fp16 results identical to the reference.
  using Acc = std::conditional_t<std::is_same_v<WeightT, double> || std::is_same_v<DeltaT, double>,
                                 double, float>;
  const Acc alpha_acc = static_cast<Acc>(alpha);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += stride) {
    const int64_t position = static_cast<int64_t>(index[k]);
    Acc value = static_cast<Acc>(
        ScalarTraits<WeightT>::to_float(base != nullptr ? base[k] : weight[position]));
    if (delta != nullptr) {
      // Separate multiply and add (no FMA contraction), as torch's CPU reference rounds them,
      // so every backend writes bitwise the same weight.
      value = add_rn(value, mul_rn(alpha_acc, static_cast<Acc>(ScalarTraits<DeltaT>::to_float(delta[k]))));
    }
    weight[position] = ScalarTraits<WeightT>::from_float(value);
  }
}

}  // namespace

cudaError_t scatter_delta(void* weight, DType weight_dtype, const void* index, bool index_is_int64,
                          int64_t nnz, const void* base, const void* delta, DType delta_dtype,
                          double alpha, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned int grid = grid_for(nnz, kThreads);
  return launch_status(dispatch_float(weight_dtype, [&](auto* weight_tag) {
    using WeightT = std::remove_pointer_t<decltype(weight_tag)>;
    return dispatch_float(delta_dtype, [&](auto* delta_tag) {
      using DeltaT = std::remove_pointer_t<decltype(delta_tag)>;
      if (index_is_int64) {
        scatter_delta_kernel<WeightT, DeltaT, int64_t><<<grid, kThreads, 0, stream>>>(
            static_cast<WeightT*>(weight), static_cast<const int64_t*>(index), nnz,
            static_cast<const WeightT*>(base), static_cast<const DeltaT*>(delta), alpha);
      } else {
        scatter_delta_kernel<WeightT, DeltaT, int32_t><<<grid, kThreads, 0, stream>>>(
            static_cast<WeightT*>(weight), static_cast<const int32_t*>(index), nnz,
            static_cast<const WeightT*>(base), static_cast<const DeltaT*>(delta), alpha);
      }
    });
  }));
}

}  // namespace spft
