// CPU kernels of the multiclass margin (at::parallel_for over rows). Same math as the CUDA
// kernels (fastmargin/margin_math.h); see csrc/cuda/margin.cu for the byte model.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "fastmargin/margin.h"
#include "fastmargin/margin_math.h"

namespace fastmargin {
namespace {

template <typename scalar_t>
void margin_forward_impl(const at::Tensor& logits, const at::Tensor& target, at::Tensor& margin,
                         at::Tensor& runner_up) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1), stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  acc_t* m = margin.mutable_data_ptr<acc_t>();
  int64_t* ru = runner_up.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / C);

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = tgt[n];
      if (!valid_class(y, C)) {  // NaN margin, no runner-up, logits never read
        m[n] = quiet_nan<acc_t>();
        ru[n] = -1;
        continue;
      }
      const scalar_t* row = base + n * stride;
      RunnerUp<acc_t> best = RunnerUp<acc_t>::empty();
      for (int64_t c = 0; c < y; ++c) best.add(static_cast<acc_t>(row[c]), c);
      for (int64_t c = y + 1; c < C; ++c) best.add(static_cast<acc_t>(row[c]), c);
      m[n] = static_cast<acc_t>(row[y]) - best.value;
      ru[n] = best.index;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multiclass_margin_fwd_cpu(const at::Tensor& logits,
                                                             const at::Tensor& target) {
  check_margin_inputs(logits, target);
  // std::tie, not a structured binding: the lambda below captures both, which C++17
  // (torch 2.11 builds) does not allow for structured bindings.
  at::Tensor margin, runner_up;
  std::tie(margin, runner_up) = allocate_margin_outputs(logits);
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "multiclass_margin_fwd_cpu",
      [&] { margin_forward_impl<scalar_t>(logits, tgt, margin, runner_up); });
  return {margin, runner_up};
}

template <typename scalar_t>
void margin_backward_impl(const at::Tensor& grad_margin, const at::Tensor& target,
                          const at::Tensor& runner_up, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad.size(0), C = grad.size(1);
  const acc_t* g = grad_margin.const_data_ptr<acc_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const int64_t* ru = runner_up.const_data_ptr<int64_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / C);

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* row = out + n * C;
      const int64_t y = tgt[n], r = ru[n];
      if (!valid_class(y, C)) {  // the forward gave NaN: so does its gradient
        std::fill(row, row + C, static_cast<scalar_t>(quiet_nan<acc_t>()));
        continue;
      }
      std::fill(row, row + C, scalar_t(0));
      // Only in-range indices are written, whatever runner_up holds.
      row[y] = static_cast<scalar_t>(margin_grad<acc_t>(y, y, r, g[n]));
      if (valid_class(r, C)) row[r] = static_cast<scalar_t>(margin_grad<acc_t>(r, y, r, g[n]));
    }
  });
}

at::Tensor multiclass_margin_bwd_cpu(const at::Tensor& grad_margin, const at::Tensor& target,
                                     const at::Tensor& runner_up, int64_t num_classes,
                                     at::ScalarType dtype) {
  check_margin_backward(grad_margin, target, runner_up, num_classes, dtype);
  at::Tensor grad =
      at::empty({grad_margin.size(0), num_classes}, grad_margin.options().dtype(dtype));
  const at::Tensor g = grad_margin.contiguous(), tgt = target.contiguous(),
                   ru = runner_up.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multiclass_margin_bwd_cpu",
                                  [&] { margin_backward_impl<scalar_t>(g, tgt, ru, grad); });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("multiclass_margin_fwd", &multiclass_margin_fwd_cpu);
  m.impl("multiclass_margin_bwd", &multiclass_margin_bwd_cpu);
}

}  // namespace fastmargin
