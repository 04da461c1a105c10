// fastmargin::_class_last on CUDA: spatial logits (N, C, d1, ...) as class-major rows when the
// cross-entropy kernels read them with a thread per row (C <= kRowThreadMaxClasses): consecutive
// threads then take consecutive positions, so every logit load and gradient store of a warp is
// coalesced, where rows with a contiguous class dim of 21 bfloat16 (42 bytes) gave each warp
// store 32 partial sectors. The copy itself is a block copy (runs of d1 * ... positions, both
// sides contiguous). More classes: contiguous rows, which the warp- and block-per-row kernels
// read with 16-byte vectors. See csrc/cpu/class_last.cpp for the op's contract.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastmargin/class_last.h"
#include "fastmargin/cuda_utils.cuh"

namespace fastmargin {
namespace {

at::Tensor class_last_cuda(const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  const SpatialShape sh = spatial_shape(x);
  return sh.C <= kRowThreadMaxClasses ? class_major_rows(x) : contiguous_rows(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTMARGIN_OPS_NS, FASTMARGIN_CUDA_KEY, m) {
  m.impl("_class_last", &class_last_cuda);
}

}  // namespace fastmargin
