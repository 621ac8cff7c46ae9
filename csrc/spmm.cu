// SpMM with the sparse delta: base + x Δᵀ (CSR, by output row) and base + dy Δ (CSC, by input
// column): the split mode's forward and the dx term of the split and fused modes.
#include <type_traits>

#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

// Tokens per thread: each entry (position, value) is loaded once for this many tokens.
constexpr int kTokensPerThread = 4;
constexpr int kThreads = 256;

template <typename T, typename Acc, typename IndexT, typename PtrT, bool kTransposed>
__global__ void __launch_bounds__(kThreads)
    spmm_add_kernel(const T* __restrict__ base, int64_t base_row_stride, const T* __restrict__ src,
                    int64_t src_row_stride, const Acc* __restrict__ delta, const IndexT* __restrict__ index,
                    const PtrT* __restrict__ pointers, const PtrT* __restrict__ perm, int64_t in_features,
                    int64_t num_tokens, int64_t num_outputs, T* __restrict__ out) {
  // Thread = (output o, kTokensPerThread tokens). Consecutive threads take consecutive outputs of
  // the same tokens, so the loads of base and stores of out coalesce and the gathers of src stay
  // within a few rows. Each output's entries are summed in index order: reproducible bits.
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= num_outputs) return;
  const int64_t start = static_cast<int64_t>(pointers[o]);
  const int64_t end = static_cast<int64_t>(pointers[o + 1]);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTokensPerThread; t0 < num_tokens;
       t0 += static_cast<int64_t>(gridDim.y) * kTokensPerThread) {
    const int valid = static_cast<int>(num_tokens - t0 < kTokensPerThread ? num_tokens - t0 : kTokensPerThread);
    Acc acc[kTokensPerThread];
#pragma unroll
    for (int i = 0; i < kTokensPerThread; ++i) acc[i] = Acc(0);
    for (int64_t j = start; j < end; ++j) {
      const int64_t k = kTransposed ? static_cast<int64_t>(perm[j]) : j;
      const int64_t position = static_cast<int64_t>(index[k]);
      const int64_t row = position / in_features;
      const int64_t gathered = kTransposed ? row : position - row * in_features;
      const Acc value = delta[k];
      const T* column = src + t0 * src_row_stride + gathered;
#pragma unroll
      for (int i = 0; i < kTokensPerThread; ++i) {
        if (i < valid) acc[i] += value * static_cast<Acc>(ScalarTraits<T>::to_float(column[i * src_row_stride]));
      }
    }
#pragma unroll
    for (int i = 0; i < kTokensPerThread; ++i) {
      if (i < valid) {
        const int64_t t = t0 + i;
        const Acc sum = static_cast<Acc>(ScalarTraits<T>::to_float(base[t * base_row_stride + o])) + acc[i];
        using Store = std::conditional_t<std::is_same_v<T, double>, double, float>;
        out[t * num_outputs + o] = ScalarTraits<T>::from_float(static_cast<Store>(sum));
      }
    }
  }
}

}  // namespace

cudaError_t spmm_add(const void* base, int64_t base_row_stride, const void* src, int64_t src_row_stride,
                     DType dtype, const void* delta, bool accumulate_fp64, const void* index, bool index_is_int64,
                     const void* pointers, const void* perm, bool pointers_are_int64, int64_t in_features,
                     int64_t num_tokens, int64_t num_outputs, bool transposed, void* out, cudaStream_t stream) {
  if (num_tokens == 0 || num_outputs == 0) return cudaSuccess;
  if (transposed && perm == nullptr) return cudaErrorInvalidValue;
  const int64_t output_blocks = (num_outputs + kThreads - 1) / kThreads;
  if (output_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t token_groups = (num_tokens + kTokensPerThread - 1) / kTokensPerThread;
  const dim3 grid(static_cast<unsigned int>(output_blocks),
                  static_cast<unsigned int>(token_groups < 65535 ? token_groups : 65535));
  auto launch = [&](auto* type_tag, auto* acc_tag, auto* index_tag, auto* pointer_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    using Acc = std::remove_pointer_t<decltype(acc_tag)>;
    using IndexT = std::remove_pointer_t<decltype(index_tag)>;
    using PtrT = std::remove_pointer_t<decltype(pointer_tag)>;
    auto kernel = transposed ? spmm_add_kernel<T, Acc, IndexT, PtrT, true> : spmm_add_kernel<T, Acc, IndexT, PtrT, false>;
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(base), base_row_stride, static_cast<const T*>(src),
                                         src_row_stride, static_cast<const Acc*>(delta),
                                         static_cast<const IndexT*>(index), static_cast<const PtrT*>(pointers),
                                         static_cast<const PtrT*>(perm), in_features, num_tokens, num_outputs,
                                         static_cast<T*>(out));
  };
  return launch_status(dispatch_float(dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    return dispatch_index_and_pointers(index_is_int64, pointers_are_int64, [&](auto* index_tag, auto* pointer_tag) {
      if constexpr (std::is_same_v<T, double>) {
        launch(type_tag, static_cast<double*>(nullptr), index_tag, pointer_tag);
      } else if (accumulate_fp64) {
        launch(type_tag, static_cast<double*>(nullptr), index_tag, pointer_tag);
      } else {
        launch(type_tag, static_cast<float*>(nullptr), index_tag, pointer_tag);
      }
    });
  }));
}

}  // namespace spft
