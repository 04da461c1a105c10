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
#include "fastmargin/ce_weighted_math.h"
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

// Ignored sample: contributes 0 with zero gradient. Invalid target: NaN row, logits never read.
template <typename acc_t>
void fill_skipped_sample(TargetKind kind, int64_t k, acc_t* loss, acc_t* lse, acc_t* weight,
                         acc_t* dradius) {
  const acc_t fill = kind == TargetKind::kIgnored ? acc_t(0) : quiet_nan<acc_t>();
  *loss = fill;
  std::fill(lse, lse + k, fill);
  std::fill(weight, weight + k, fill);
  if (dradius) *dradius = fill;
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
        fill_skipped_sample(kind, k, loss + b, lse_b, w_b, dradius ? dradius + b : nullptr);
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

// Target side of the weighted path (class weights and/or soft targets): row (b, j) has the
// target distribution p = soft[b * stride_b + j * stride_k + c] (stride_k == 0 when the k
// copies share a (B, C) row), or the one-hot e_y of the index target y = index[b].
template <typename target_t>
struct TargetRows {
  const target_t* soft;  // nullptr: index targets
  int64_t stride_b, stride_k;
  const int64_t* index;

  static TargetRows make(const at::Tensor& target) {
    if (!is_soft_target(target)) return {nullptr, 0, 0, target.const_data_ptr<int64_t>()};
    const auto st = soft_target_strides(target);
    return {target.const_data_ptr<target_t>(), st.first, st.second, nullptr};
  }
};

template <typename acc_t>
ClassCoef<acc_t> make_coef(const c10::optional<at::Tensor>& class_weight, double eps, int64_t C) {
  return {class_weight.has_value() ? class_weight->const_data_ptr<acc_t>() : nullptr,
          acc_t(1) - static_cast<acc_t>(eps),
          C > 0 ? static_cast<acc_t>(eps) / acc_t(C) : acc_t(0)};
}

template <typename scalar_t, typename target_t>
void forward_weighted_impl(const at::Tensor& logits, const at::Tensor& target,
                           const c10::optional<at::Tensor>& radius,
                           const c10::optional<at::Tensor>& class_weight, double temperature,
                           double label_smoothing, int64_t ignore_index, WorstOfKForward& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const int64_t sb = logits.stride(0), sk = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const TargetRows<target_t> tgt = TargetRows<target_t>::make(target);
  const ClassCoef<acc_t> coef = make_coef<acc_t>(class_weight, label_smoothing, C);
  const acc_t* rad = radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
  acc_t* lse = out.lse.mutable_data_ptr<acc_t>();
  acc_t* weight = out.weight.mutable_data_ptr<acc_t>();
  int64_t* index = out.index.mutable_data_ptr<int64_t>();
  acc_t* dradius = rad ? out.dradius.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t tau = static_cast<acc_t>(temperature);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* lse_b = lse + b * k;
      acc_t* w_b = weight + b * k;
      index[b] = 0;
      int64_t y = -1;
      if (!tgt.soft) {
        y = tgt.index[b];
        const TargetKind kind = classify_target(y, ignore_index, C);
        if (kind != TargetKind::kClass) {
          fill_skipped_sample(kind, k, loss + b, lse_b, w_b, dradius ? dradius + b : nullptr);
          continue;
        }
      }
      const acc_t r = rad ? rad[b] : acc_t(0);
      CopyReducer<acc_t> red = CopyReducer<acc_t>::start();
      acc_t asum = acc_t(0);  // A of index-target rows (the same for every copy)
      for (int64_t j = 0; j < k; ++j) {
        const target_t* p = tgt.soft ? tgt.soft + b * tgt.stride_b + j * tgt.stride_k : nullptr;
        const WeightedRow<scalar_t, target_t, acc_t> row{base + b * sb + j * sk, p, y, r, coef};
        const WeightedRowStats<acc_t> st = row.stats(C);
        lse_b[j] = st.lse();
        w_b[j] = st.loss();  // the per-copy loss waits here until all k copies are known
        asum = st.asum;
        red.add(j, w_b[j], tau);
      }
      loss[b] = red.loss(k, tau);
      index[b] = red.best_index;
      acc_t dr = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        w_b[j] = red.weight(j, w_b[j], tau);
        if (dradius && w_b[j] != acc_t(0)) {
          const acc_t zy = robust_logit(acc_t(base[b * sb + j * sk + y]), true, r);
          dr += w_b[j] * weighted_dce_dradius(lse_b[j], zy, coef(acc_t(1), y), asum);
        }
      }
      if (dradius) dradius[b] = dr;
    }
  });
}

template <typename scalar_t, typename target_t>
void backward_weighted_impl(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                            const at::Tensor& lse, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& class_weight, double label_smoothing,
                            at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const int64_t sb = logits.stride(0), sk = logits.stride(1);
  const int64_t gb = grad.stride(0), gk = grad.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* gbase = grad.mutable_data_ptr<scalar_t>();
  const TargetRows<target_t> tgt = TargetRows<target_t>::make(target);
  const ClassCoef<acc_t> coef = make_coef<acc_t>(class_weight, label_smoothing, C);
  const acc_t* rad = radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const bool need_asum = tgt.soft || label_smoothing != 0.0;
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
      const int64_t y = tgt.soft ? -1 : tgt.index[b];
      if (!tgt.soft && (y < 0 || y >= C)) {  // invalid index target: NaN row (weight is NaN)
        std::fill(out, out + C, static_cast<scalar_t>(quiet_nan<acc_t>()));
        continue;
      }
      const target_t* p = tgt.soft ? tgt.soft + b * tgt.stride_b + j * tgt.stride_k : nullptr;
      const WeightedRow<scalar_t, target_t, acc_t> row{base + b * sb + j * sk, p, y,
                                                       rad ? rad[b] : acc_t(0), coef};
      // A = sum_c a_c: a pre-pass over the target row (and class weights) only; with an index
      // target and no smoothing it is a_y.
      const acc_t asum = need_asum ? row.asum(C) : coef(acc_t(1), y);
      const acc_t scale = w * g[b], row_lse = lse_p[row_id];
      for (int64_t c = 0; c < C; ++c) {
        out[c] =
            static_cast<scalar_t>(weighted_ce_grad(row.logit(c), row.a(c), row_lse, asum, scale));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> worst_of_k_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight) {
  const bool weighted = check_worst_of_k_args(logits, target, radius, class_weight);
  WorstOfKForward out = WorstOfKForward::allocate(logits, radius.has_value());
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad =
      radius.has_value() ? c10::optional<at::Tensor>(radius->contiguous()) : c10::nullopt;
  if (weighted) {
    const c10::optional<at::Tensor> cw = class_weight.has_value()
                                             ? c10::optional<at::Tensor>(class_weight->contiguous())
                                             : c10::nullopt;
    dispatch_weighted(logits, tgt, [&](auto s, auto t) {
      forward_weighted_impl<decltype(s), decltype(t)>(logits, tgt, rad, cw, temperature,
                                                      label_smoothing, ignore_index, out);
    });
    return out.as_tuple();
  }
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
                                 double label_smoothing, int64_t ignore_index,
                                 const c10::optional<at::Tensor>& class_weight) {
  const bool weighted =
      check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight, class_weight);
  at::Tensor grad = at::empty_like(logits);
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad =
      radius.has_value() ? c10::optional<at::Tensor>(radius->contiguous()) : c10::nullopt;
  if (weighted) {
    const c10::optional<at::Tensor> cw = class_weight.has_value()
                                             ? c10::optional<at::Tensor>(class_weight->contiguous())
                                             : c10::nullopt;
    dispatch_weighted(logits, tgt, [&](auto s, auto t) {
      backward_weighted_impl<decltype(s), decltype(t)>(g, logits, tgt, rad, lse, weight, cw,
                                                       label_smoothing, grad);
    });
    return grad;
  }
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
