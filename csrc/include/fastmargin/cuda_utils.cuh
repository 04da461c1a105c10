// CUDA building blocks shared by the kernels: 16-byte vector I/O and group reductions.
//
// A "group" is the set of threads that cooperates on one row (or one sample): either a
// warp (GROUP_THREADS == 32, several groups per block) or the whole block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastmargin/ce_math.h"

namespace fastmargin {

constexpr int kWarp = 32;

// VEC elements of scalar_t moved as one aligned load/store (16 bytes when VEC = 16 / size).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

// Largest vector width (in elements) usable for a row set: every row start must be aligned.
template <typename scalar_t>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

inline bool aligned_for(const void* ptr, int64_t stride_a, int64_t stride_b, int vec,
                        size_t elem_size) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  return p % (vec * elem_size) == 0 && stride_a % vec == 0 && stride_b % vec == 0;
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.max, mask), __shfl_xor_sync(0xffffffffu, s.sumexp, mask),
          __shfl_xor_sync(0xffffffffu, s.sumz, mask)};
}

// Butterfly merge across a full warp: every lane ends with the warp's statistics.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_merge(RowStats<acc_t> s) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) s.merge(shfl_xor(s, mask));
  return s;
}

// Merge across the group; every thread of the group gets the result. For block-sized groups
// `smem` holds one RowStats per warp; the trailing barrier lets the caller reuse it at once.
template <int GROUP_THREADS, typename acc_t>
__device__ __forceinline__ RowStats<acc_t> group_merge(RowStats<acc_t> s, RowStats<acc_t>* smem) {
  s = warp_merge(s);
  if constexpr (GROUP_THREADS > kWarp) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    constexpr int kWarps = GROUP_THREADS / kWarp;
    if (lane == 0) smem[warp] = s;
    __syncthreads();
    s = lane < kWarps ? smem[lane] : RowStats<acc_t>::empty();
    s = warp_merge(s);
    __syncthreads();
  }
  return s;
}

}  // namespace fastmargin
