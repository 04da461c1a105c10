// CUDA group reduction support for the weighted cross-entropy path (class weights / soft
// targets): the warp shuffle of its statistics, so group_reduce (cuda_utils.cuh) can merge them.
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

}  // namespace fastmargin
