// Shared-memory tile loads for the tensor-core kernels (torch-free): 16-byte cp.async with
// zero fill where the source is aligned, element loads with bounds checks elsewhere.
#pragma once

#include <cstdint>

#include "dtype_utils.cuh"

namespace spft {

// dst (shared) = 16 bytes at src when valid, else 16 zero bytes (src is then not read).
__device__ inline void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned int dst_shared = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(src_bytes)
               : "memory");
#else
  *static_cast<int4*>(dst) = valid ? *static_cast<const int4*>(src) : make_int4(0, 0, 0, 0);
#endif
}

__device__ inline void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

__device__ inline void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// A [kRows, kCols] tile of a row-major matrix (rows first_row.., columns first_col..) into
// shared memory with row pitch kPitch elements; elements outside [num_rows, num_cols) are zero.
// kAligned: every 8-element (16-byte) chunk is wholly inside or outside the matrix and 16-byte
// aligned in memory (num_cols, row_stride and the base pointer are multiples of 16 bytes).
template <typename T, int kRows, int kCols, int kPitch, int kThreads, bool kAligned>
__device__ inline void load_tile(T* __restrict__ tile, const T* __restrict__ matrix, int64_t row_stride,
                                 int64_t num_rows, int64_t num_cols, int64_t first_row, int64_t first_col) {
  if constexpr (kAligned) {
    constexpr int kVec = 16 / sizeof(T);
    static_assert(kCols % kVec == 0, "tile width must be a whole number of 16-byte chunks");
    constexpr int kChunks = kRows * kCols / kVec;
    for (int chunk = threadIdx.x; chunk < kChunks; chunk += kThreads) {
      const int r = chunk / (kCols / kVec);
      const int c = (chunk % (kCols / kVec)) * kVec;
      const int64_t row = first_row + r;
      const int64_t col = first_col + c;
      const bool valid = row < num_rows && col < num_cols;
      const T* src = valid ? matrix + row * row_stride + col : matrix;
      cp_async_16(tile + r * kPitch + c, src, valid);
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols;
      const int c = e % kCols;
      const int64_t row = first_row + r;
      const int64_t col = first_col + c;
      tile[r * kPitch + c] = (row < num_rows && col < num_cols) ? matrix[row * row_stride + col] : ScalarTraits<T>::from_float(0.0f);
    }
  }
}

inline bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace spft
