// CUDA building blocks shared by every kernel: 16-byte vector I/O, group reductions and the
// launch configuration of group-per-row kernels.
//
// A "group" is the set of threads that cooperates on one work item (a row, a sample, an
// example or a chunk of one): a single thread (GROUP == 1, short rows), a warp (GROUP == 32,
// several groups per block) or the whole block. Any value type T with a member `void merge(const
// T&)` (associative and commutative) and a free `T shfl_xor(const T&, int mask)` can be reduced
// over a group.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "fastmargin/ce_math.h"
#include "fastmargin/op_namespace.h"

// Every kernel launch goes through this macro: the real launch under nvcc, the host emulation's
// checked launch in the emulated build (csrc/emu/cuda_emu.h defines it first).
#ifndef FM_KERNEL_LAUNCH
#define FM_KERNEL_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace fastmargin {

constexpr int kWarp = 32;

// ---- Vector I/O ------------------------------------------------------------------------------

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

// ---- Launch configuration --------------------------------------------------------------------

// Rows of at most this many classes get a warp each; longer rows get a whole block.
constexpr int64_t kRowWarpMaxClasses = 2048;
constexpr int kRowBlockThreads = 512;
// In the kernels that opt in (launch_row_kernel's kThreadRows), rows of at most this many
// classes get one thread each: a warp per row would leave most lanes idle on such rows (one
// element or none per lane) and make a launch of many short rows latency-bound, e.g. the 4M
// rows of 21 classes of a 16x21x512x512 segmentation batch.
constexpr int64_t kRowThreadMaxClasses = 32;

// Threads per block for groups of `group_threads`: several warp-groups share a 256-thread block.
constexpr int row_block_threads(int group_threads) {
  return group_threads > 256 ? group_threads : 256;
}

// Blocks needed for `items` groups.
inline int64_t row_grid(int64_t items, int group_threads) {
  const int64_t groups_per_block = row_block_threads(group_threads) / group_threads;
  return (items + groups_per_block - 1) / groups_per_block;
}

// grid.x is 32 bits and at most 2^31 - 1 blocks: the block count is checked, never narrowed.
constexpr int64_t kMaxGridBlocks = 2147483647;

inline unsigned int checked_row_grid(int64_t items, int group_threads) {
  const int64_t blocks = row_grid(items, group_threads);
  TORCH_CHECK(blocks <= kMaxGridBlocks, "too many rows for one launch: ", items,
              " work items need ", blocks, " blocks of ", row_block_threads(group_threads),
              " threads, more than the 2^31 - 1 a grid can hold");
  return static_cast<unsigned int>(blocks);
}

// Index of this thread's group (its work item) and its rank within the group. A group never
// straddles a block, so `item >= items` is uniform per group (block-sized groups: one per block).
template <int GROUP>
__device__ __forceinline__ int64_t group_item() {
  constexpr int kGroups = row_block_threads(GROUP) / GROUP;
  return static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / GROUP;
}

template <int GROUP>
__device__ __forceinline__ int group_rank() {
  return threadIdx.x % GROUP;
}

// Launches `kernel` with one group of GROUP threads per item on the current stream.
template <int GROUP, typename... KernelArgs, typename... Args>
void launch_groups(void (*kernel)(KernelArgs...), int64_t items, Args&&... args) {
  const unsigned int grid = checked_row_grid(items, GROUP);
  FM_KERNEL_LAUNCH(kernel, grid, row_block_threads(GROUP), c10::cuda::getCurrentCUDAStream(),
                   std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the vector width (16 bytes when every row start is aligned) and the group size (a warp
// per row for short rows, a block per row for long ones; with kThreadRows, a thread per row for
// rows of at most kRowThreadMaxClasses, for kernels whose group code holds for GROUP == 1), then
// calls Launcher<scalar_t, acc_t, VEC, GROUP>::run(args...).
template <typename scalar_t, template <typename, typename, int, int> class Launcher,
          bool kThreadRows = false, typename... A>
void launch_row_kernel(bool aligned, int64_t C, A&&... args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = max_vec<scalar_t>();
  if constexpr (kThreadRows) {
    if (C <= kRowThreadMaxClasses) {
      if (aligned) {
        Launcher<scalar_t, acc_t, kVec, 1>::run(args...);
      } else {
        Launcher<scalar_t, acc_t, 1, 1>::run(args...);
      }
      return;
    }
  }
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

// ---- Group reductions ------------------------------------------------------------------------

// Merge across the group; every thread of the group gets the result (`identity`: the identity
// of T::merge). For block-sized groups `smem` holds one T per warp; the trailing barrier lets the
// caller reuse it at once.
template <int GROUP, typename T>
__device__ __forceinline__ T group_reduce(T s, T* smem, const T& identity) {
  if constexpr (GROUP == 1) {  // a thread per item: nothing to merge
    return s;
  } else {
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
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.max, mask), __shfl_xor_sync(0xffffffffu, s.sumexp, mask),
          __shfl_xor_sync(0xffffffffu, s.sumz, mask)};
}

// Merge of the online softmax statistics across the group (group_reduce for RowStats).
template <int GROUP_THREADS, typename acc_t>
__device__ __forceinline__ RowStats<acc_t> group_merge(RowStats<acc_t> s, RowStats<acc_t>* smem) {
  return group_reduce<GROUP_THREADS>(s, smem, RowStats<acc_t>::empty());
}

// A plain sum as a mergeable statistic.
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

// Sum over the group; every thread of the group gets it (group_reduce for SumStat).
template <int GROUP, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, SumStat<acc_t>* smem) {
  return group_reduce<GROUP>(SumStat<acc_t>{v}, smem, SumStat<acc_t>::empty()).v;
}

}  // namespace fastmargin
