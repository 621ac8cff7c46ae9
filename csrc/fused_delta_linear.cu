// The fused mode's forward y = x (W0 + Δ)ᵀ + bias: a tiled GEMM whose W0 tile gets the delta
// entries that fall in it added in shared memory before the matrix instructions. W0 is never
// written and no out x in tensor exists besides it.
//
// Each output row's entries are sorted by column (canonical order), so the block's thread for
// row n keeps a cursor into its run row_ptr[n] .. row_ptr[n + 1] and advances it along the K
// loop: one compare per row and K step plus the entries themselves, and no per-tile metadata.
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "async_copy.cuh"
#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

constexpr int64_t kNoEntry = INT64_MAX;

// The cursor over one output row's entries (columns ascending).
template <typename IndexT, typename PtrT>
struct RowCursor {
  int64_t entry;
  int64_t end;
  int64_t next_col;  // column of `entry`, or kNoEntry when the run is exhausted
  int64_t row_origin;

  __device__ void init(const PtrT* row_ptr, const IndexT* index, int64_t row, int64_t num_rows, int64_t in_features) {
    entry = end = 0;
    row_origin = row * in_features;
    if (row < num_rows) {
      entry = static_cast<int64_t>(row_ptr[row]);
      end = static_cast<int64_t>(row_ptr[row + 1]);
    }
    next_col = entry < end ? static_cast<int64_t>(index[entry]) - row_origin : kNoEntry;
  }

  // Adds the entries with column < k_end into `row_tile` (element c at row_tile[(c - k_begin) *
  // col_step]): the sum in the delta's precision (Acc: fp32, or fp64 for an fp64 delta or weight)
  // rounded once, exactly as scatter_delta.cu's re-sync of the merged mode writes W0 + delta.
  template <typename T, typename Acc>
  __device__ void add_until(T* row_tile, int col_step, int64_t k_begin, int64_t k_end, const Acc* delta,
                            const IndexT* index) {
    using Store = std::conditional_t<std::is_same_v<T, double>, double, float>;
    while (next_col < k_end) {
      T& w = row_tile[(next_col - k_begin) * col_step];
      w = ScalarTraits<T>::from_float(
          static_cast<Store>(add_rn(static_cast<Acc>(ScalarTraits<T>::to_float(w)), delta[entry])));
      ++entry;
      next_col = entry < end ? static_cast<int64_t>(index[entry]) - row_origin : kNoEntry;
    }
  }
};

// The delta arrives in fp64 when the weight or the trainable master is fp64 (scatter_delta.cu
// sums in fp64 then), else in fp32; the branch is uniform across the block.
template <typename T, typename IndexT, typename PtrT>
__device__ void add_delta_until(RowCursor<IndexT, PtrT>& cursor, T* row_tile, int col_step, int64_t k_begin,
                                int64_t k_end, const void* delta, bool delta_fp64, const IndexT* index) {
  if (delta_fp64) {
    cursor.add_until(row_tile, col_step, k_begin, k_end, static_cast<const double*>(delta), index);
  } else {
    cursor.add_until(row_tile, col_step, k_begin, k_end, static_cast<const float*>(delta), index);
  }
}

// --- fp16 / bf16 on tensor cores ----------------------------------------------------------

constexpr int kBlockM = 128;  // tokens per block
constexpr int kBlockN = 128;  // output features per block
constexpr int kBlockK = 32;
constexpr int kPitch = kBlockK + 8;  // 80-byte shared rows: a multiple of 16 bytes, fewer bank conflicts
constexpr int kThreads = 256;        // 8 warps as 2 (M) x 4 (N), each 64 x 32

template <typename T>
struct GemmStorage {
  union {
    struct {
      T x[2][kBlockM][kPitch];  // [token][k]
      T w[2][kBlockN][kPitch];  // [output feature][k]: Wᵀ read column-major
    } stages;
    float scratch[kThreads / 32][16][16];  // per-warp epilogue staging
  };
};

template <typename T, typename IndexT, typename PtrT, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    fused_delta_linear_tc_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ weight,
                                 const T* __restrict__ bias, const void* __restrict__ delta,
                                 bool delta_fp64, const IndexT* __restrict__ index, const PtrT* __restrict__ row_ptr,
                                 int64_t num_tokens, int64_t out_features, int64_t in_features, T* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the binding refuses devices before sm_80
#else
  using namespace nvcuda;
  __shared__ __align__(128) GemmStorage<T> storage;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t first_out = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int warp = threadIdx.x / 32;
  const int warp_m = (warp / 4) * 64;
  const int warp_n = (warp % 4) * 32;

  RowCursor<IndexT, PtrT> cursor;
  if (threadIdx.x < kBlockN) cursor.init(row_ptr, index, first_out + threadIdx.x, out_features, in_features);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  auto load_stage = [&](int stage, int64_t k0) {
    load_tile<T, kBlockM, kBlockK, kPitch, kThreads, kAligned>(&storage.stages.x[stage][0][0], x, x_row_stride,
                                                                num_tokens, in_features, first_token, k0);
    load_tile<T, kBlockN, kBlockK, kPitch, kThreads, kAligned>(&storage.stages.w[stage][0][0], weight, in_features,
                                                                out_features, in_features, first_out, k0);
    cp_async_commit();
  };
  const int64_t num_steps = (in_features + kBlockK - 1) / kBlockK;
  if (num_steps > 0) load_stage(0, 0);
  for (int64_t step = 0; step < num_steps; ++step) {
    const int stage = static_cast<int>(step & 1);
    const int64_t k0 = step * kBlockK;
    cp_async_wait_all();
    __syncthreads();  // stage landed everywhere; nobody still reads the other stage
    if (step + 1 < num_steps) load_stage(stage ^ 1, k0 + kBlockK);
    if (threadIdx.x < kBlockN) {
      add_delta_until(cursor, &storage.stages.w[stage][threadIdx.x][0], 1, k0, k0 + kBlockK, delta, delta_fp64,
                      index);
    }
    __syncthreads();  // the W0 + Δ tile is complete
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(a[i], &storage.stages.x[stage][warp_m + i * 16][kk], kPitch);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &storage.stages.w[stage][warp_n + j * 16][kk], kPitch);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait_all();  // no copy may still be in flight (none is, unless the loop ran no step)
  __syncthreads();  // the scratch overlays the stages

  // Epilogue: fp32 accumulator + bias, rounded once, through a per-warp 16 x 16 staging tile.
  const int lane = threadIdx.x % 32;
  float* scratch = &storage.scratch[warp][0][0];
  const int r = lane / 2;
  const int c0 = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t token = first_token + warp_m + i * 16 + r;
      const int64_t first_n = first_out + warp_n + j * 16 + c0;
      if (token < num_tokens) {
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int64_t n = first_n + c;
          if (n < out_features) {
            float value = scratch[r * 16 + c0 + c];
            if (bias != nullptr) value += ScalarTraits<T>::to_float(bias[n]);
            y[token * out_features + n] = ScalarTraits<T>::from_float(value);
          }
        }
      }
      __syncwarp();
    }
  }
#endif
}

// --- fp32 / fp64 on CUDA cores --------------------------------------------------------------

constexpr int kSimtBlock = 64;  // tokens and output features per block
constexpr int kSimtK = 16;
constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

template <typename T, typename IndexT, typename PtrT>
__global__ void __launch_bounds__(kSimtThreads)
    fused_delta_linear_simt_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ weight,
                                   const T* __restrict__ bias, const void* __restrict__ delta,
                                   bool delta_fp64, const IndexT* __restrict__ index, const PtrT* __restrict__ row_ptr,
                                   int64_t num_tokens, int64_t out_features, int64_t in_features,
                                   T* __restrict__ y) {
  // fp32 stays IEEE fp32 (no TF32), as F.linear computes it by default.
  __shared__ T x_tile[kSimtK][kSimtBlock + 1];  // [k][token]
  __shared__ T w_tile[kSimtK][kSimtBlock + 1];  // [k][output feature]
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kSimtBlock;
  const int64_t first_out = static_cast<int64_t>(blockIdx.y) * kSimtBlock;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  RowCursor<IndexT, PtrT> cursor;
  if (threadIdx.x < kSimtBlock) cursor.init(row_ptr, index, first_out + threadIdx.x, out_features, in_features);
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int64_t k0 = 0; k0 < in_features; k0 += kSimtK) {
    for (int e = threadIdx.x; e < kSimtBlock * kSimtK; e += kSimtThreads) {
      const int row = e / kSimtK;  // consecutive threads along k: contiguous loads
      const int kk = e % kSimtK;
      const int64_t k = k0 + kk;
      const int64_t token = first_token + row;
      const int64_t out = first_out + row;
      x_tile[kk][row] = (token < num_tokens && k < in_features) ? x[token * x_row_stride + k] : T(0);
      w_tile[kk][row] = (out < out_features && k < in_features) ? weight[out * in_features + k] : T(0);
    }
    __syncthreads();
    if (threadIdx.x < kSimtBlock) {
      add_delta_until(cursor, &w_tile[0][threadIdx.x], kSimtBlock + 1, k0, k0 + kSimtK, delta, delta_fp64, index);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = x_tile[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = w_tile[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t token = first_token + ty * 4 + i;
    if (token >= num_tokens) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = first_out + tx * 4 + j;
      if (n < out_features) y[token * out_features + n] = acc[i][j] + (bias != nullptr ? bias[n] : T(0));
    }
  }
}

}  // namespace

cudaError_t fused_delta_linear(const void* x, int64_t x_row_stride, const void* weight, const void* bias, DType dtype,
                               const void* delta, bool delta_fp64, const void* index, bool index_is_int64,
                               const void* row_ptr,
                               bool row_ptr_is_int64, int64_t num_tokens, int64_t out_features,
                               int64_t in_features, void* y, cudaStream_t stream) {
  if (num_tokens == 0 || out_features == 0) return cudaSuccess;
  const bool tensor_cores = dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  const int64_t block_m = tensor_cores ? kBlockM : kSimtBlock;
  const int64_t block_n = tensor_cores ? kBlockN : kSimtBlock;
  const int64_t token_blocks = (num_tokens + block_m - 1) / block_m;
  const int64_t out_blocks = (out_features + block_n - 1) / block_n;
  if (token_blocks > 0x7fffffff || out_blocks > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(token_blocks), static_cast<unsigned int>(out_blocks));
  const bool aligned = in_features % 8 == 0 && x_row_stride % 8 == 0 && aligned_16(x) && aligned_16(weight);
  auto launch = [&](auto* type_tag, auto* index_tag, auto* pointer_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    using IndexT = std::remove_pointer_t<decltype(index_tag)>;
    using PtrT = std::remove_pointer_t<decltype(pointer_tag)>;
    if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
      auto kernel = aligned ? fused_delta_linear_tc_kernel<T, IndexT, PtrT, true>
                            : fused_delta_linear_tc_kernel<T, IndexT, PtrT, false>;
      kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), x_row_stride, static_cast<const T*>(weight),
                                            static_cast<const T*>(bias), delta, delta_fp64,
                                            static_cast<const IndexT*>(index), static_cast<const PtrT*>(row_ptr),
                                            num_tokens, out_features, in_features, static_cast<T*>(y));
    } else {
      fused_delta_linear_simt_kernel<T, IndexT, PtrT><<<grid, kSimtThreads, 0, stream>>>(
          static_cast<const T*>(x), x_row_stride, static_cast<const T*>(weight), static_cast<const T*>(bias),
          delta, delta_fp64, static_cast<const IndexT*>(index), static_cast<const PtrT*>(row_ptr),
          num_tokens, out_features, in_features, static_cast<T*>(y));
    }
  };
  return launch_status(dispatch_float(dtype, [&](auto* type_tag) {
    return dispatch_index_and_pointers(index_is_int64, row_ptr_is_int64, [&](auto* index_tag, auto* pointer_tag) {
      launch(type_tag, index_tag, pointer_tag);
    });
  }));
}

}  // namespace spft
