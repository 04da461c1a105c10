// fastmargin::_class_last's two layouts of spatial logits (N, C, d1, ...) as the
// (N * d1 * ..., 1, C) rows the cross-entropy ops read, written in ATen ops so that every
// device's kernel of the op (csrc/cpu/class_last.cpp, csrc/cuda/class_last.cu) can use them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace fastmargin {

// (N, S, C): the samples, the positions per sample, the classes.
struct SpatialShape {
  int64_t N, S, C;
};

inline SpatialShape spatial_shape(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "_class_last: expected (N, C, d1, ...) logits, got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  return {N, N * C == 0 ? 0 : x.numel() / (N * C), C};
}

// Class-major rows: memory (C, N * S), per class the N runs of S positions one after the other
// (a block copy, not a transpose), viewed as (N * S, 1, C) rows with class stride N * S.
inline at::Tensor class_major_memory(const SpatialShape& sh, const at::TensorOptions& options) {
  return at::empty({sh.C, sh.N * sh.S}, options);
}

inline at::Tensor class_major_rows_of(const at::Tensor& memory) { return memory.t().unsqueeze(1); }

inline at::Tensor class_major_rows(const at::Tensor& x) {
  const SpatialShape sh = spatial_shape(x);
  at::Tensor memory = class_major_memory(sh, x.options());
  memory.view({sh.C, sh.N, sh.S}).copy_(x.reshape({sh.N, sh.C, sh.S}).transpose(0, 1));
  return class_major_rows_of(memory);
}

// Rows with a contiguous class dim: one transposing copy (a view when the logits already lie
// class-last in memory).
inline at::Tensor contiguous_rows(const at::Tensor& x) {
  const SpatialShape sh = spatial_shape(x);
  return x.movedim(1, -1).reshape({sh.N * sh.S, 1, sh.C}).contiguous();
}

}  // namespace fastmargin
