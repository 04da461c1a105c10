// CPU kernels of the worst-of-k cross-entropy family (at::parallel_for over samples / rows).
// Same math as the CUDA kernels (fastmargin/ce_math.h); see csrc/cuda/worst_of_k_ce.cu for the
// byte model.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "fastmargin/ce_math.h"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {
namespace {

// Statistics of one robust row z~ (r = 0: the plain row).
template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* row, int64_t C, int64_t y, acc_t r, bool want_sum) {
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  for (int64_t c = 0; c < C; ++c) {
    st.add(robust_logit(static_cast<acc_t>(row[c]), c == y, r), want_sum);
  }
  return st;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& logits, const at::Tensor& target,
                  const c10::optional<at::Tensor>& radius, double temperature,
                  double label_smoothing, int64_t ignore_index, WorstOfKForward& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const int64_t sb = logits.stride(0), sk = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const acc_t* rad = radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
  acc_t* lse = out.lse.mutable_data_ptr<acc_t>();
  acc_t* weight = out.weight.mutable_data_ptr<acc_t>();
  int64_t* index = out.index.mutable_data_ptr<int64_t>();
  acc_t* dradius = rad ? out.dradius.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t tau = static_cast<acc_t>(temperature);
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const bool want_sum = eps != acc_t(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = tgt[b];
      const TargetKind kind = classify_target(y, ignore_index, C);
      acc_t* lse_b = lse + b * k;
      acc_t* w_b = weight + b * k;
      index[b] = 0;
      if (kind != TargetKind::kClass) {
        // Ignored: contributes 0 with zero gradient. Invalid: NaN row, never read.
        const acc_t fill = kind == TargetKind::kIgnored ? acc_t(0) : quiet_nan<acc_t>();
        loss[b] = fill;
        std::fill(lse_b, lse_b + k, fill);
        std::fill(w_b, w_b + k, fill);
        if (dradius) dradius[b] = fill;
        continue;
      }
      const acc_t r = rad ? rad[b] : acc_t(0);
      CopyReducer<acc_t> red = CopyReducer<acc_t>::start();
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* row = base + b * sb + j * sk;
        const RowStats<acc_t> st = row_stats<scalar_t, acc_t>(row, C, y, r, want_sum);
        lse_b[j] = st.lse();
        w_b[j] = ce_from_stats(lse_b[j], robust_logit(acc_t(row[y]), true, r), st.sumz, eps, C);
        red.add(j, w_b[j], tau);
      }
      loss[b] = red.loss(k, tau);
      index[b] = red.best_index;
      acc_t dr = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        w_b[j] = red.weight(j, w_b[j], tau);
        if (dradius && w_b[j] != acc_t(0)) {
          const acc_t zy = robust_logit(acc_t(base[b * sb + j * sk + y]), true, r);
          dr += w_b[j] * dce_dradius(lse_b[j], zy, eps, C);
        }
      }
      if (dradius) dradius[b] = dr;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> worst_of_k_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index) {
  check_worst_of_k_inputs(logits, target, radius);
  WorstOfKForward out = WorstOfKForward::allocate(logits, radius.has_value());
  const at::Tensor tgt = target.contiguous();
  const c10::optional<at::Tensor> rad =
      radius.has_value() ? c10::optional<at::Tensor>(radius->contiguous()) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "worst_of_k_ce_fwd_cpu", [&] {
        forward_impl<scalar_t>(logits, tgt, rad, temperature, label_smoothing, ignore_index, out);
      });
  return out.as_tuple();
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                   const at::Tensor& weight, double label_smoothing, int64_t ignore_index,
                   at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const int64_t sb = logits.stride(0), sk = logits.stride(1);
  const int64_t gb = grad.stride(0), gk = grad.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* gbase = grad.mutable_data_ptr<scalar_t>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const acc_t* rad = radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t eps_over_c = C > 0 ? eps / acc_t(C) : acc_t(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C));

  at::parallel_for(0, B * k, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row_id = begin; row_id < end; ++row_id) {
      const int64_t b = row_id / k, j = row_id % k;
      scalar_t* out = gbase + b * gb + j * gk;
      const acc_t w = w_p[row_id];
      if (w == acc_t(0)) {  // unselected copy or ignored sample: zeros, logits not read
        std::fill(out, out + C, scalar_t(0));
        continue;
      }
      const scalar_t* row = base + b * sb + j * sk;
      const int64_t y = tgt[b];  // may be invalid (weight NaN): then c == y never holds
      const acc_t r = rad ? rad[b] : acc_t(0);
      const acc_t scale = w * g[b], row_lse = lse_p[row_id];
      for (int64_t c = 0; c < C; ++c) {
        const bool is_y = c == y;
        out[c] = static_cast<scalar_t>(
            ce_grad(robust_logit(acc_t(row[c]), is_y, r), is_y, row_lse, eps, eps_over_c, scale));
      }
    }
  });
  (void)ignore_index;  // ignored samples arrive with weight 0
}

at::Tensor worst_of_k_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                                 const at::Tensor& lse, const at::Tensor& weight,
                                 double label_smoothing, int64_t ignore_index) {
  check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight);
  at::Tensor grad = at::empty_like(logits);
  const at::Tensor g = grad_loss.contiguous(), tgt = target.contiguous();
  const c10::optional<at::Tensor> rad =
      radius.has_value() ? c10::optional<at::Tensor>(radius->contiguous()) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "worst_of_k_ce_bwd_cpu", [&] {
                                    backward_impl<scalar_t>(g, logits, tgt, rad, lse, weight,
                                                            label_smoothing, ignore_index, grad);
                                  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_cpu);
  m.impl("worst_of_k_ce_bwd", &worst_of_k_ce_bwd_cpu);
}

}  // namespace fastmargin
