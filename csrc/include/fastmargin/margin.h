// Host-side contract of the multiclass-margin ops, shared by the CPU and CUDA files: argument
// checks (the last line of defence for direct torch.ops calls; fastmargin.multiclass_margin
// validates first with friendlier messages) and output allocation.
//
// Layout: logits is (N, C) with the class dim contiguous and the row stride arbitrary.
// The margin is returned in the statistics dtype (float32; float64 for float64 logits).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "fastmargin/checks.h"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {

inline void check_margin_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D (N, C) tensor, got ", logits.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits: expected a floating dtype, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 2,
              "logits: the margin needs at least 2 classes, got C = ", logits.size(1));
  TORCH_CHECK(logits.stride(1) == 1, "logits: the class dim must be contiguous (stride 1)");
  check_index_target(target, logits);
}

inline std::tuple<at::Tensor, at::Tensor> allocate_margin_outputs(const at::Tensor& logits) {
  const int64_t N = logits.size(0);
  return {at::empty({N}, logits.options().dtype(stats_dtype(logits))),
          at::empty({N}, logits.options().dtype(at::kLong))};
}

inline void check_margin_backward(const at::Tensor& grad_margin, const at::Tensor& target,
                                  const at::Tensor& runner_up, int64_t num_classes,
                                  at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "dtype: expected a floating dtype, got ", dtype);
  TORCH_CHECK(num_classes >= 2, "num_classes: expected >= 2, got ", num_classes);
  const at::ScalarType f = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_margin.dim() == 1 && grad_margin.scalar_type() == f,
              "grad_margin: expected a 1-D tensor of dtype ", f);
  const int64_t N = grad_margin.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong,
              "target: expected int64 of shape (", N, ",)");
  TORCH_CHECK(
      runner_up.dim() == 1 && runner_up.size(0) == N && runner_up.scalar_type() == at::kLong,
      "runner_up: expected int64 of shape (", N, ",)");
  TORCH_CHECK(target.device() == grad_margin.device() && runner_up.device() == grad_margin.device(),
              "target, runner_up: expected device ", grad_margin.device());
}

}  // namespace fastmargin
