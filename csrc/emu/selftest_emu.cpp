// Seeded defects for the emulation's self-test: each kernel breaks one rule of the CUDA model
// that the harness must report (tests/emu/test_emu_selftest.py). "clean" follows every rule
// with the same collectives, so the harness is seen to pass correct code too.
#include "cuda_emu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "fastmargin/cuda_utils.cuh"

namespace fastmargin_selftest {
namespace {

using fastmargin::kWarp;
using fastmargin::Vec;

constexpr int kThreads = 64;  // two warps

// Correct use: a warp sum by shuffles, then a block barrier before reading the other warp's sum.
__global__ void clean_kernel(const float* in, float* out) {
  __shared__ float warp_sum[kThreads / kWarp];
  float v = in[threadIdx.x];
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  if (threadIdx.x % kWarp == 0) warp_sum[threadIdx.x / kWarp] = v;
  __syncthreads();
  out[threadIdx.x] = warp_sum[0] + warp_sum[1];
}

// Only the first half of warp 0 reaches the barrier; the others exit.
__global__ void divergent_syncthreads_kernel(const float* in, float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = in[threadIdx.x];
}

// Two halves of the block wait at two different barriers.
__global__ void split_syncthreads_kernel(const float* in, float* out) {
  if (threadIdx.x < kWarp) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = in[threadIdx.x];
}

// Lane 31 leaves before the shuffle that reads it.
__global__ void lane_exit_before_shuffle_kernel(const float* in, float* out) {
  if (threadIdx.x % kWarp == kWarp - 1) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], 1);
}

// A shuffle with a half-warp mask (the kernels always shuffle whole warps).
__global__ void partial_mask_kernel(const float* in, float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, in[threadIdx.x], 1);
}

// A 16-byte vector load one float past an aligned address (a fault on a GPU).
__global__ void misaligned_vector_load_kernel(const float* in, float* out) {
  const auto* v = reinterpret_cast<const Vec<float, 4>*>(in + 1);
  const Vec<float, 4> x = v[threadIdx.x % 4];
  out[threadIdx.x] = x.v[0];
}

// Reads one element past the end of its input.
__global__ void out_of_bounds_read_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];
}

__global__ void no_op_kernel(int64_t /*unused*/) {}

at::Tensor run_defect(const std::string& defect) {
  const at::Tensor in = at::arange(kThreads, at::TensorOptions().dtype(at::kFloat));
  at::Tensor out = at::empty({kThreads}, in.options());
  const float* x = in.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  void (*kernel)(const float*, float*) = nullptr;
  if (defect == "clean") kernel = clean_kernel;
  if (defect == "divergent_syncthreads") kernel = divergent_syncthreads_kernel;
  if (defect == "split_syncthreads") kernel = split_syncthreads_kernel;
  if (defect == "lane_exit_before_shuffle") kernel = lane_exit_before_shuffle_kernel;
  if (defect == "partial_mask") kernel = partial_mask_kernel;
  if (defect == "misaligned_vector_load") kernel = misaligned_vector_load_kernel;
  if (defect == "out_of_bounds_read") kernel = out_of_bounds_read_kernel;
  TORCH_CHECK(kernel != nullptr, "defect: unknown name ", defect);
  FM_KERNEL_LAUNCH(kernel, 1, kThreads, nullptr, x, y);
  return out;
}

// launch_groups for `items` warp-sized groups of a kernel that does nothing: its grid check.
void launch_rows(int64_t items) {
  fastmargin::launch_groups<kWarp>(no_op_kernel, items, int64_t(0));
}

}  // namespace

TORCH_LIBRARY(fastmargin_emu_selftest, m) {
  m.def("run_defect(str defect) -> Tensor", &run_defect);
  m.def("launch_rows(int items) -> ()", &launch_rows);
}

}  // namespace fastmargin_selftest
