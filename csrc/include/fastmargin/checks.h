// Host-side argument checks shared by the ops' contracts (worst_of_k_ce.h, weight_noise_ce.h,
// margin.h): the last line of defence for direct torch.ops calls, so every message names the
// argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastmargin {

// Per-row statistics (and the vectors the ops read in that precision) are float32, float64 for
// float64 logits.
inline at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Class-index target: (N,) int64 on the logits' device, N = logits.size(0).
inline void check_index_target(const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target: expected shape (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target: expected int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "target: expected device ", logits.device(),
              ", got ", target.device());
}

// A (len,) vector `name` in the statistics dtype on the logits' device (radius, scale, class
// weights).
inline void check_stats_vector(const at::Tensor& t, const char* name, int64_t len,
                               const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, ": expected shape (", len, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == stats_dtype(logits), name, ": expected dtype ",
              stats_dtype(logits), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(), ", got ",
              t.device());
}

}  // namespace fastmargin
