// CUDA group reductions for the weighted cross-entropy path (class weights / soft targets):
// a group merge for any statistics type, and the two statistics it serves.
#pragma once

#include "fastmargin/ce_weighted_math.h"
#include "fastmargin/cuda_utils.cuh"

namespace fastmargin {

template <typename acc_t>
__device__ __forceinline__ WeightedRowStats<acc_t> shfl_xor(const WeightedRowStats<acc_t>& s,
                                                            int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.max, mask), __shfl_xor_sync(0xffffffffu, s.sumexp, mask),
          __shfl_xor_sync(0xffffffffu, s.asum, mask), __shfl_xor_sync(0xffffffffu, s.adot, mask)};
}

// A plain sum as a mergeable statistic (A = sum_c a_c in the backward).
template <typename acc_t>
struct SumStat {
  acc_t v;
  FM_HD static SumStat empty() { return {acc_t(0)}; }
  FM_HD void merge(const SumStat& o) { v += o.v; }
};

template <typename acc_t>
__device__ __forceinline__ SumStat<acc_t> shfl_xor(const SumStat<acc_t>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.v, mask)};
}

// Merge across the group for any statistic S (S::empty(), S::merge, shfl_xor(S, int)); every
// thread of the group gets the result. Block-sized groups use `smem` (one S per warp); the
// trailing barrier lets the caller reuse it at once. Same structure as group_merge(RowStats).
template <int GROUP_THREADS, typename S>
__device__ __forceinline__ S group_merge_stats(S s, S* smem) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) s.merge(shfl_xor(s, mask));
  if constexpr (GROUP_THREADS > kWarp) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    constexpr int kWarps = GROUP_THREADS / kWarp;
    if (lane == 0) smem[warp] = s;
    __syncthreads();
    s = lane < kWarps ? smem[lane] : S::empty();
#pragma unroll
    for (int mask = kWarp / 2; mask > 0; mask >>= 1) s.merge(shfl_xor(s, mask));
    __syncthreads();
  }
  return s;
}

}  // namespace fastmargin
