// SDDMM, the delta gradient grad[k] = sum_t dy[t, row_k] * x[t, col_k], without atomics: a
// gather-dot variant on CUDA cores (low density, work ∝ nnz · T) with a two-pass token split,
// and a tensor-core variant (high density) that computes each 64 x 64 tile of dyᵀx that holds
// entries and writes only those entries.
#include <mma.h>

#include <type_traits>

#include "async_copy.cuh"
#include "dtype_utils.cuh"
#include "spft_kernels.h"

namespace spft {
namespace {

constexpr int kGatherThreads = 256;

template <typename T, typename Acc, typename IndexT>
__global__ void __launch_bounds__(kGatherThreads)
    sddmm_gather_dot_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ dy,
                            int64_t dy_row_stride, const IndexT* __restrict__ index, int64_t nnz,
                            int64_t in_features, int64_t num_tokens, int64_t tokens_per_split,
                            Acc* __restrict__ partials) {
  // Thread per entry, block y per token split. Entries are sorted by row, so a warp's dy loads
  // mostly hit one address and its x loads stay within one row of x per token.
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kGatherThreads + threadIdx.x;
  if (k >= nnz) return;
  const int64_t position = static_cast<int64_t>(index[k]);
  const int64_t row = position / in_features;
  const int64_t col = position - row * in_features;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t last = first + tokens_per_split < num_tokens ? first + tokens_per_split : num_tokens;
  const T* dy_column = dy + row;
  const T* x_column = x + col;
  // Four independent partial sums keep four loads in flight; they are combined in a fixed order.
  Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  int64_t t = first;
  for (; t + 4 <= last; t += 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc[i] += static_cast<Acc>(ScalarTraits<T>::to_float(dy_column[(t + i) * dy_row_stride])) *
                static_cast<Acc>(ScalarTraits<T>::to_float(x_column[(t + i) * x_row_stride]));
    }
  }
  for (; t < last; ++t) {
    acc[0] += static_cast<Acc>(ScalarTraits<T>::to_float(dy_column[t * dy_row_stride])) *
              static_cast<Acc>(ScalarTraits<T>::to_float(x_column[t * x_row_stride]));
  }
  partials[static_cast<int64_t>(blockIdx.y) * nnz + k] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename Acc>
__global__ void sum_splits_kernel(const Acc* __restrict__ partials, int64_t nnz, int64_t num_splits,
                                  Acc* __restrict__ grad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += stride) {
    Acc sum = partials[k];
    for (int64_t s = 1; s < num_splits; ++s) sum += partials[s * nnz + k];
    grad[k] = sum;
  }
}

// --- tensor-core tiles ---------------------------------------------------------------------

constexpr int kTileRows = 64;    // output features per block (rows of dyᵀx)
constexpr int kTileCols = 64;    // input features per block: TILE_K of tile_ptr (index.py)
constexpr int kTileTokens = 32;  // tokens per pipeline stage
constexpr int kTilePitch = 64 + 8;  // padded shared rows: 144 bytes, a multiple of 16 as WMMA needs
constexpr int kTileThreads = 128;   // 4 warps as 2 x 2, each a 32 x 32 quarter of the tile
constexpr int kResultPitch = 64 + 4;

template <typename T>
struct TileStorage {
  union {
    struct {
      T dy[2][kTileTokens][kTilePitch];  // [token][output feature]: dyᵀ read column-major
      T x[2][kTileTokens][kTilePitch];   // [token][input feature]
    } stages;
    float result[kTileRows][kResultPitch];
  };
};

template <typename T, typename IndexT, typename TilePtrT, bool kAligned>
__global__ void __launch_bounds__(kTileThreads)
    sddmm_tile_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ dy,
                      int64_t dy_row_stride, const IndexT* __restrict__ index, const TilePtrT* __restrict__ tile_ptr,
                      int64_t out_features, int64_t in_features, int64_t num_tokens, float* __restrict__ grad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // fp16/bf16 WMMA with fp32 accumulate: the binding refuses devices before sm_80
#else
  using namespace nvcuda;
  __shared__ __align__(128) TileStorage<T> storage;
  const int64_t tile_ptr_stride = (in_features + kTileCols - 1) / kTileCols + 1;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t first_col = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t column_tile = blockIdx.x;
  // Skip tiles without entries (at moderate density most tiles have some, but not all).
  bool has_entries = false;
  if (threadIdx.x < kTileRows && first_row + threadIdx.x < out_features) {
    const TilePtrT* row_pointers = tile_ptr + (first_row + threadIdx.x) * tile_ptr_stride + column_tile;
    has_entries = row_pointers[0] < row_pointers[1];
  }
  if (!__syncthreads_or(has_entries)) return;

  const int warp = threadIdx.x / 32;
  const int warp_row = (warp / 2) * 32;
  const int warp_col = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  auto load_stage = [&](int stage, int64_t first_token) {
    load_tile<T, kTileTokens, kTileRows, kTilePitch, kTileThreads, kAligned>(
        &storage.stages.dy[stage][0][0], dy, dy_row_stride, num_tokens, out_features, first_token, first_row);
    load_tile<T, kTileTokens, kTileCols, kTilePitch, kTileThreads, kAligned>(
        &storage.stages.x[stage][0][0], x, x_row_stride, num_tokens, in_features, first_token, first_col);
    cp_async_commit();
  };
  // Tokens in order, one block per tile: the sum's order is fixed, no second pass needed.
  const int64_t num_steps = (num_tokens + kTileTokens - 1) / kTileTokens;
  if (num_steps > 0) load_stage(0, 0);
  for (int64_t step = 0; step < num_steps; ++step) {
    const int stage = static_cast<int>(step & 1);
    cp_async_wait_all();
    __syncthreads();  // this stage landed for all threads; the other stage's readers are done
    if (step + 1 < num_steps) load_stage(stage ^ 1, (step + 1) * kTileTokens);
#pragma unroll
    for (int kk = 0; kk < kTileTokens; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], &storage.stages.dy[stage][kk][warp_row + i * 16], kTilePitch);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], &storage.stages.x[stage][kk][warp_col + j * 16], kTilePitch);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait_all();  // no copy may still be in flight (none is, unless the loop ran no step)
  __syncthreads();  // the result overlays the stages
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&storage.result[warp_row + i * 16][warp_col + j * 16], acc[i][j], kResultPitch,
                              wmma::mem_row_major);
  __syncthreads();
  // Masked epilogue: row r's entries in this tile are the run tile_ptr[r, c] .. tile_ptr[r, c + 1].
  const int lane = threadIdx.x % 32;
  for (int r = warp; r < kTileRows; r += kTileThreads / 32) {
    const int64_t row = first_row + r;
    if (row >= out_features) break;
    const TilePtrT* row_pointers = tile_ptr + row * tile_ptr_stride + column_tile;
    const int64_t run_end = static_cast<int64_t>(row_pointers[1]);
    const int64_t row_origin = row * in_features + first_col;
    for (int64_t e = static_cast<int64_t>(row_pointers[0]) + lane; e < run_end; e += 32) {
      grad[e] = storage.result[r][static_cast<int64_t>(index[e]) - row_origin];
    }
  }
#endif
}

}  // namespace

cudaError_t sddmm_gather_dot(const void* x, int64_t x_row_stride, const void* dy, int64_t dy_row_stride,
                             DType dtype, const void* index, bool index_is_int64, int64_t nnz,
                             int64_t in_features, int64_t num_tokens, int64_t num_splits, void* partials,
                             void* grad, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  if (num_splits < 1 || num_splits > 65535 || num_tokens == 0) return cudaErrorInvalidValue;
  const int64_t entry_blocks = (nnz + kGatherThreads - 1) / kGatherThreads;
  if (entry_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t tokens_per_split = (num_tokens + num_splits - 1) / num_splits;
  const dim3 grid(static_cast<unsigned int>(entry_blocks), static_cast<unsigned int>(num_splits));
  auto launch = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    Acc* target = num_splits == 1 ? static_cast<Acc*>(grad) : static_cast<Acc*>(partials);
    if (index_is_int64) {
      sddmm_gather_dot_kernel<T, Acc, int64_t><<<grid, kGatherThreads, 0, stream>>>(
          static_cast<const T*>(x), x_row_stride, static_cast<const T*>(dy), dy_row_stride,
          static_cast<const int64_t*>(index), nnz, in_features, num_tokens, tokens_per_split, target);
    } else {
      sddmm_gather_dot_kernel<T, Acc, int32_t><<<grid, kGatherThreads, 0, stream>>>(
          static_cast<const T*>(x), x_row_stride, static_cast<const T*>(dy), dy_row_stride,
          static_cast<const int32_t*>(index), nnz, in_features, num_tokens, tokens_per_split, target);
    }
    if (num_splits > 1) {
      sum_splits_kernel<Acc><<<grid_for(nnz, 256), 256, 0, stream>>>(static_cast<const Acc*>(partials), nnz,
                                                                      num_splits, static_cast<Acc*>(grad));
    }
  };
  return launch_status(dispatch_float(dtype, launch));
}

cudaError_t sddmm_tiles(const void* x, int64_t x_row_stride, const void* dy, int64_t dy_row_stride, DType dtype,
                        const void* index, bool index_is_int64, const void* tile_ptr, bool tile_ptr_is_int64,
                        int64_t out_features, int64_t in_features, int64_t num_tokens, float* grad,
                        cudaStream_t stream) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (out_features == 0 || in_features == 0) return cudaSuccess;
  const int64_t row_tiles = (out_features + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (in_features + kTileCols - 1) / kTileCols;
  if (row_tiles > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_tiles));
  // 16-byte loads need 8-element chunks that are wholly in or out of each row and aligned.
  const bool aligned = in_features % 8 == 0 && out_features % 8 == 0 && x_row_stride % 8 == 0 &&
                       dy_row_stride % 8 == 0 && aligned_16(x) && aligned_16(dy);
  auto launch = [&](auto* type_tag, auto* index_tag, auto* pointer_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    using IndexT = std::remove_pointer_t<decltype(index_tag)>;
    using TilePtrT = std::remove_pointer_t<decltype(pointer_tag)>;
    auto kernel = aligned ? sddmm_tile_kernel<T, IndexT, TilePtrT, true> : sddmm_tile_kernel<T, IndexT, TilePtrT, false>;
    kernel<<<grid, kTileThreads, 0, stream>>>(static_cast<const T*>(x), x_row_stride, static_cast<const T*>(dy),
                                              dy_row_stride, static_cast<const IndexT*>(index),
                                              static_cast<const TilePtrT*>(tile_ptr), out_features, in_features,
                                              num_tokens, grad);
  };
  auto with_type = [&](auto* type_tag) {
    return dispatch_index_and_pointers(index_is_int64, tile_ptr_is_int64, [&](auto* index_tag, auto* pointer_tag) {
      launch(type_tag, index_tag, pointer_tag);
    });
  };
  return launch_status(dtype == DType::kFloat16 ? with_type(static_cast<__half*>(nullptr))
                                                : with_type(static_cast<__nv_bfloat16*>(nullptr)));
}

}  // namespace spft
