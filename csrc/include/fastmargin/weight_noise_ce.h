// Host-side contract of the weight-noise worst-of-k cross-entropy ops, shared by the CPU and
// CUDA files: argument checks (the last line of defence for direct torch.ops calls; the Python
// layer validates first) and output allocation.
//
// logits (N, C), class dim contiguous, row stride arbitrary; target (N,) int64; scale (N,) in the
// statistics dtype (float32, float64 for float64 logits); philox an int64 (2,) tensor
// [seed, offset] on the logits' device. It is a tensor (not two ints) so the draw can come from
// the device generator (torch.randint) without a host synchronisation, which also keeps the op
// capturable in a CUDA graph: the kernels read the draw from device memory when they run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "fastmargin/checks.h"
#include "fastmargin/philox.h"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {

inline void check_philox_state(const at::Tensor& philox, const at::Device& device) {
  TORCH_CHECK(philox.dim() == 1 && philox.size(0) == 2 && philox.scalar_type() == at::kLong,
              "philox: expected an int64 tensor of shape (2,) holding [seed, offset], got ",
              philox.scalar_type(), " of shape ", philox.sizes());
  TORCH_CHECK(philox.device() == device, "philox: expected device ", device, ", got ",
              philox.device());
}

inline void check_weight_noise_inputs(const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& scale, const at::Tensor& philox,
                                      int64_t k) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D (N, C) tensor, got ", logits.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits: expected a floating dtype, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits: the class dim must be contiguous (stride 1)");
  TORCH_CHECK(logits.size(1) < kNoiseMaxClasses, "logits: at most 2^34 classes are supported");
  TORCH_CHECK(k >= 1 && k <= kNoiseMaxCopies, "k: expected 1 <= k <= 2^20, got ", k);
  const int64_t N = logits.size(0);
  check_index_target(target, logits);
  check_stats_vector(scale, "scale", N, logits);
  check_philox_state(philox, logits.device());
}

inline void check_weight_noise_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                        const at::Tensor& target, const at::Tensor& scale,
                                        const at::Tensor& philox, const at::Tensor& lse,
                                        const at::Tensor& weight) {
  TORCH_CHECK(lse.dim() == 2, "lse: expected a 2-D (N, k) tensor");
  const int64_t k = lse.size(1);
  check_weight_noise_inputs(logits, target, scale, philox, k);
  const int64_t N = logits.size(0);
  const auto f = stats_dtype(logits);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N && grad_loss.scalar_type() == f,
              "grad_loss: expected (", N, ",) of dtype ", f);
  TORCH_CHECK(lse.size(0) == N && lse.scalar_type() == f && lse.is_contiguous(),
              "lse: expected contiguous (", N, ", ", k, ") of dtype ", f);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == k &&
                  weight.scalar_type() == f && weight.is_contiguous(),
              "weight: expected contiguous (", N, ", ", k, ") of dtype ", f);
  check_same_device(grad_loss, "grad_loss", logits);
  check_same_device(lse, "lse", logits);
  check_same_device(weight, "weight", logits);
}

inline void check_noise_shape(int64_t n, int64_t k, int64_t c) {
  TORCH_CHECK(n >= 0, "n: expected >= 0, got ", n);
  TORCH_CHECK(k >= 1 && k <= kNoiseMaxCopies, "k: expected 1 <= k <= 2^20, got ", k);
  TORCH_CHECK(c >= 0 && c < kNoiseMaxClasses, "c: expected 0 <= c < 2^34, got ", c);
}

struct WeightNoiseForward {
  at::Tensor loss;    // (N,)   worst-of-k (or smooth-max) loss per sample
  at::Tensor lse;     // (N, k) logsumexp of every noisy copy z + s xi_j
  at::Tensor weight;  // (N, k) dL_n / dl_nj: one-hot worst copy (tau = 0) or softmax (tau > 0)
  at::Tensor index;   // (N,)   int64 worst copy

  static WeightNoiseForward allocate(const at::Tensor& logits, int64_t k) {
    const int64_t N = logits.size(0);
    auto f = logits.options().dtype(stats_dtype(logits));
    return {at::empty({N}, f), at::empty({N, k}, f), at::empty({N, k}, f),
            at::empty({N}, logits.options().dtype(at::kLong))};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {loss, lse, weight, index};
  }
};

}  // namespace fastmargin
