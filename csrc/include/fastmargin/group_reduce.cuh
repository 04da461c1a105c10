// Generic group reductions and launch configuration for row-per-group CUDA kernels.
//
// A "group" is the set of threads that cooperates on one row: a warp (GROUP == 32, several
// groups per block) or the whole block. Any value type T with a member `void merge(const T&)`
// (associative and commutative) and a free `T shfl_xor(const T&, int mask)` can be reduced.
#pragma once

#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastmargin/cuda_utils.cuh"

namespace fastmargin {

// Rows of at most this many classes get a warp each; longer rows get a whole block.
constexpr int64_t kRowWarpMaxClasses = 2048;
constexpr int kRowBlockThreads = 512;

constexpr int row_block_threads(int group_threads) {
  return group_threads > 256 ? group_threads : 256;
}

inline int64_t row_grid(int64_t rows, int group_threads) {
  const int64_t groups_per_block = row_block_threads(group_threads) / group_threads;
  return (rows + groups_per_block - 1) / groups_per_block;
}

// Merge across the group; every thread of the group gets the result. For block-sized groups
// `smem` holds one T per warp; the trailing barrier lets the caller reuse it at once.
template <int GROUP, typename T>
__device__ __forceinline__ T group_reduce(T s, T* smem, const T& identity) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) s.merge(shfl_xor(s, mask));
  if constexpr (GROUP > kWarp) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    constexpr int kWarps = GROUP / kWarp;
    if (lane == 0) smem[warp] = s;
    __syncthreads();
    s = lane < kWarps ? smem[lane] : identity;
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) s.merge(shfl_xor(s, mask));
    __syncthreads();
  }
  return s;
}

// Picks the vector width (16 bytes when every row start is aligned) and the group size (a warp
// per row for short rows, a block per row for long ones), then calls
// Launcher<scalar_t, acc_t, VEC, GROUP>::run(args...).
template <typename scalar_t, template <typename, typename, int, int> class Launcher, typename... A>
void launch_row_kernel(bool aligned, int64_t C, A&&... args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = max_vec<scalar_t>();
  const bool small = C <= kRowWarpMaxClasses;
  if (aligned && small) {
    Launcher<scalar_t, acc_t, kVec, kWarp>::run(args...);
  } else if (aligned) {
    Launcher<scalar_t, acc_t, kVec, kRowBlockThreads>::run(args...);
  } else if (small) {
    Launcher<scalar_t, acc_t, 1, kWarp>::run(args...);
  } else {
    Launcher<scalar_t, acc_t, 1, kRowBlockThreads>::run(args...);
  }
}

}  // namespace fastmargin
