// CPU kernels of the worst-of-k cross-entropy family (at::parallel_for over samples / rows).
// Same math as the CUDA kernels (fastmargin/ce_math.h, ce_weighted_math.h); see
// csrc/cuda/worst_of_k_ce.cu for the byte model.
//
// One forward and one backward driver serve both losses; the per-row math is a "loss" policy:
// PlainLoss (index targets, uniform label smoothing: ce_math.h) or WeightedLoss (class weights
// and/or probability targets: ce_weighted_math.h). Rows are reduced with the vectorised passes of
// cpu_rows.h (max, sum of exps, sums), and the backward is one vectorisable loop per row with the
// target class rewritten afterwards.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastmargin/ce_math.h"
#include "fastmargin/ce_weighted_math.h"
#include "fastmargin/cpu_rows.h"
#include "fastmargin/worst_of_k_ce.h"

namespace fastmargin {
namespace {

using cpu::Scratch;

// Unweighted CE of the robust row: CE(z~) = lse(z~) - (1 - eps) z~_y - (eps / C) sum_c z~_c.
template <typename scalar_t_>
struct PlainLoss {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;

  const int64_t* target;
  acc_t eps, eps_over_c;
  int64_t C;

  PlainLoss(const at::Tensor& tgt, const c10::optional<at::Tensor>&, double label_smoothing,
            int64_t num_classes)
      : target(tgt.const_data_ptr<int64_t>()),
        eps(static_cast<acc_t>(label_smoothing)),
        eps_over_c(num_classes > 0 ? eps / acc_t(num_classes) : acc_t(0)),
        C(num_classes) {}

  bool soft() const { return false; }
  int64_t index_target(int64_t b) const { return target[b]; }
  static constexpr bool kSmallRowBatches = true;  // forward_small_rows applies

  // Loss of copy j of sample b (row z, valid class y); stores lse (asum is the weighted loss's).
  acc_t row_loss(const scalar_t* z, int64_t, int64_t, int64_t y, acc_t r, Scratch<acc_t>& xs,
                 Scratch<acc_t>&, acc_t& lse, acc_t&) const {
    const acc_t* x = cpu::robust_row(z, C, y, r, xs);
    const RowStats<acc_t> st = cpu::row_stats(x, C, eps != acc_t(0));
    lse = st.lse();
    return ce_from_stats(lse, x[y], st.sumz, eps, C);
  }

  acc_t dradius(acc_t lse, acc_t zy_tilde, int64_t, acc_t) const {
    return dce_dradius(lse, zy_tilde, eps, C);
  }

  // s * dCE/dz of one row (y valid): every class as off-target, then the target rewritten.
  void grad_row(const scalar_t* z, int64_t, int64_t, int64_t y, acc_t r, acc_t lse, acc_t s,
                Scratch<acc_t>&, scalar_t* out) const {
    const acc_t zy = acc_t(z[y]);  // read first: `out` may be `z` (worst_of_k_ce_bwd_inplace)
    cpu::softmax_grad_row(z, C, r, lse, acc_t(1), static_cast<const acc_t*>(nullptr), eps_over_c, s,
                          out);
    out[y] =
        static_cast<scalar_t>(ce_grad(robust_logit(zy, true, r), true, lse, eps, eps_over_c, s));
  }
};

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

// Weighted CE: l = sum_c a_c (lse(z~) - z~_c), a_c = w_c ((1 - eps) p_c + eps / C). "Sparse"
// rows (index target, no smoothing) have a_c = 0 off the target and never build the a_c row.
template <typename scalar_t_, typename target_t>
struct WeightedLoss {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;

  TargetRows<target_t> tgt;
  ClassCoef<acc_t> coef;
  int64_t C;
  bool sparse;

  WeightedLoss(const at::Tensor& target, const c10::optional<at::Tensor>& class_weight, double eps,
               int64_t num_classes)
      : tgt(TargetRows<target_t>::make(target)),
        coef{class_weight.has_value() ? class_weight->const_data_ptr<acc_t>() : nullptr,
             acc_t(1) - static_cast<acc_t>(eps),
             num_classes > 0 ? static_cast<acc_t>(eps) / acc_t(num_classes) : acc_t(0)},
        C(num_classes),
        sparse(!tgt.soft && eps == 0.0) {}

  bool soft() const { return tgt.soft != nullptr; }  // then y == -1 means "no target class"
  static constexpr bool kSmallRowBatches = false;
  int64_t index_target(int64_t b) const { return tgt.soft ? -1 : tgt.index[b]; }
  const target_t* soft_row(int64_t b, int64_t j) const {
    return tgt.soft ? tgt.soft + b * tgt.stride_b + j * tgt.stride_k : nullptr;
  }

  // a_c of a dense row (ClassCoef::operator() for every c, written branch-free so it
  // vectorises: the class weight is loaded always but used only where the target mass is > 0).
  const acc_t* coefs(const target_t* p, int64_t y, Scratch<acc_t>& s) const {
    acc_t* a = s.get(C);
    const acc_t* w = coef.class_weight;
    const acc_t keep = coef.keep, off = coef.eps_over_c;
    if (p && w) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t q = keep * static_cast<acc_t>(p[c]) + off, wc = w[c];
        a[c] = q != acc_t(0) ? wc * q : q;
      }
    } else if (p) {
      for (int64_t c = 0; c < C; ++c) a[c] = keep * static_cast<acc_t>(p[c]) + off;
    } else {  // index target: q = eps / C off the target
      if (w && off != acc_t(0)) {
        for (int64_t c = 0; c < C; ++c) a[c] = w[c] * off;
      } else {
        std::fill(a, a + C, off);
      }
      a[y] = coef(acc_t(1), y);
    }
    return a;
  }

  acc_t row_loss(const scalar_t* z, int64_t b, int64_t j, int64_t y, acc_t r, Scratch<acc_t>& xs,
                 Scratch<acc_t>& as, acc_t& lse, acc_t& asum) const {
    const target_t* p = soft_row(b, j);
    const acc_t* x = cpu::robust_row(z, C, y, r, xs);
    const acc_t m = cpu::row_max(x, C);
    WeightedRowStats<acc_t> st;
    if (!cpu::is_finite(m)) {  // all -inf / +inf / all NaN: the scalar online pass
      st = WeightedRow<scalar_t, target_t, acc_t>{z, p, y, r, coef}.stats(C);
    } else if (sparse) {
      const acc_t a_y = coef(acc_t(1), y);
      st = {m, cpu::row_sum_exp(x, C, m), a_y, a_y != acc_t(0) ? a_y * (x[y] - m) : acc_t(0)};
    } else {
      const acc_t* a = coefs(p, y, as);
      // D = sum_{a_c != 0} a_c (z~_c - max): a masked class with a_c > 0 gives -inf.
      const acc_t adot = cpu::row_coef_dot(a, x, C, m);
      st = {m, cpu::row_sum_exp(x, C, m), cpu::row_sum(a, C), adot};
    }
    lse = st.lse();
    asum = st.asum;
    return st.loss();
  }

  acc_t dradius(acc_t lse, acc_t zy_tilde, int64_t y, acc_t asum) const {
    return weighted_dce_dradius(lse, zy_tilde, coef(acc_t(1), y), asum);
  }

  // s * (A softmax(z~) - a) of one row: A = a_y for sparse rows, else sum_c a_c.
  void grad_row(const scalar_t* z, int64_t b, int64_t j, int64_t y, acc_t r, acc_t lse, acc_t s,
                Scratch<acc_t>& as, scalar_t* out) const {
    const acc_t* a = sparse ? nullptr : coefs(soft_row(b, j), y, as);
    const acc_t A = sparse ? coef(acc_t(1), y) : cpu::row_sum(a, C);
    const acc_t zy = y >= 0 ? acc_t(z[y]) : acc_t(0);  // read first: `out` may be `z`
    cpu::softmax_grad_row(z, C, r, lse, A, a, acc_t(0), s, out);
    if (y >= 0) {
      out[y] = static_cast<scalar_t>(
          weighted_ce_grad(robust_logit(zy, true, r), coef(acc_t(1), y), lse, A, s));
    }
  }
};

// dL/dr of sample b: the copies' dCE/dr weighted by dL/dl_j.
template <typename Loss, typename scalar_t, typename acc_t>
acc_t sample_dradius(const Loss& L, const scalar_t* zb, int64_t sk, int64_t k, int64_t y, acc_t r,
                     const acc_t* lse_b, const acc_t* w_b, acc_t asum) {
  acc_t dr = acc_t(0);
  for (int64_t j = 0; j < k; ++j) {
    if (w_b[j] == acc_t(0)) continue;
    const acc_t zy = robust_logit(acc_t(zb[j * sk + y]), true, r);
    dr += w_b[j] * L.dradius(lse_b[j], zy, y, asum);
  }
  return dr;
}

// The forward's shapes and raw pointers (inputs and the outputs it writes), shared by the
// row-by-row driver and the small-row one.
template <typename scalar_t, typename acc_t>
struct ForwardRows {
  int64_t B, k, C, sb, sk;
  const scalar_t* base;
  const acc_t* rad;  // nullptr without a radius
  acc_t* loss;
  acc_t* lse;
  acc_t* weight;
  int64_t* index;
  acc_t* dradius;  // nullptr without a radius

  ForwardRows(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
              WorstOfKForward& out)
      : B(logits.size(0)),
        k(logits.size(1)),
        C(logits.size(2)),
        sb(logits.stride(0)),
        sk(logits.stride(1)),
        base(logits.const_data_ptr<scalar_t>()),
        rad(radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr),
        loss(out.loss.mutable_data_ptr<acc_t>()),
        lse(out.lse.mutable_data_ptr<acc_t>()),
        weight(out.weight.mutable_data_ptr<acc_t>()),
        index(out.index.mutable_data_ptr<int64_t>()),
        dradius(rad ? out.dradius.mutable_data_ptr<acc_t>() : nullptr) {}
};

// The plain-loss forward for rows of at most cpu::kSmallRow classes: the k robust rows of a block
// of samples are gathered into acc_t scratch and reduced together (cpu::small_rows_stats: one
// vectorised exp over the block instead of a short pass per row), then each sample's copies are
// reduced as in forward_impl.
template <typename Loss>
void forward_small_rows(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
                        double temperature, int64_t ignore_index, const Loss& L,
                        WorstOfKForward& out) {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const ForwardRows<scalar_t, acc_t> p(logits, radius, out);
  const int64_t B = p.B, k = p.k, C = p.C, sb = p.sb, sk = p.sk;
  const acc_t tau = static_cast<acc_t>(temperature);
  const bool want_sum = L.eps != acc_t(0);
  const int64_t block = std::max<int64_t>(1, 1024 / (k * C));  // samples reduced together
  const int64_t grain = std::max<int64_t>(block, 32768 / (k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> xs, es;
    std::vector<RowStats<acc_t>> st;
    for (int64_t b0 = begin; b0 < end; b0 += block) {
      const int64_t b1 = std::min(end, b0 + block), rows = (b1 - b0) * k;
      acc_t* x = xs.get(rows * C);
      st.resize(static_cast<size_t>(rows));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = L.index_target(b);
        const bool valid = y >= 0 && y < C;
        const acc_t r = p.rad ? p.rad[b] : acc_t(0);
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* z = p.base + b * sb + j * sk;
          acc_t* xr = x + ((b - b0) * k + j) * C;
          if (!valid) {  // ignored / invalid sample: a zero row, never used
            std::fill(xr, xr + C, acc_t(0));
            continue;
          }
          for (int64_t c = 0; c < C; ++c) xr[c] = static_cast<acc_t>(z[c]) + r;
          xr[y] = robust_logit(static_cast<acc_t>(z[y]), true, r);
        }
      }
      cpu::small_rows_stats(x, rows, C, want_sum, es.get(rows * C), st.data());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = L.index_target(b);
        acc_t* lse_b = p.lse + b * k;
        acc_t* w_b = p.weight + b * k;
        p.index[b] = 0;
        const TargetKind kind = classify_target(y, ignore_index, C);
        if (kind != TargetKind::kClass) {
          cpu::fill_skipped_sample(kind, k, p.loss + b, lse_b, w_b,
                                   p.dradius ? p.dradius + b : nullptr);
          continue;
        }
        const int64_t row0 = (b - b0) * k;
        cpu::reduce_copies(
            k, tau,
            [&](int64_t j, acc_t& lse_j) {
              const RowStats<acc_t>& sj = st[static_cast<size_t>(row0 + j)];
              lse_j = sj.lse();
              return ce_from_stats(lse_j, x[(row0 + j) * C + y], sj.sumz, L.eps, C);
            },
            lse_b, w_b, p.loss + b, p.index + b);
        if (p.dradius) {
          p.dradius[b] =
              sample_dradius(L, p.base + b * sb, sk, k, y, p.rad[b], lse_b, w_b, acc_t(0));
        }
      }
    }
  });
}

template <typename Loss>
void forward_impl(const at::Tensor& logits, const c10::optional<at::Tensor>& radius,
                  double temperature, int64_t ignore_index, const Loss& L, WorstOfKForward& out) {
  if constexpr (Loss::kSmallRowBatches) {
    const int64_t C = logits.size(2);
    if (C > 0 && C <= cpu::kSmallRow) {
      forward_small_rows(logits, radius, temperature, ignore_index, L, out);
      return;
    }
  }
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const ForwardRows<scalar_t, acc_t> p(logits, radius, out);
  const int64_t B = p.B, k = p.k, C = p.C, sb = p.sb, sk = p.sk;
  const acc_t tau = static_cast<acc_t>(temperature);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * C));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> xs, as;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = L.index_target(b);
      acc_t* lse_b = p.lse + b * k;
      acc_t* w_b = p.weight + b * k;
      p.index[b] = 0;
      const TargetKind kind = L.soft() ? TargetKind::kClass : classify_target(y, ignore_index, C);
      if (kind != TargetKind::kClass) {
        cpu::fill_skipped_sample(kind, k, p.loss + b, lse_b, w_b,
                                 p.dradius ? p.dradius + b : nullptr);
        continue;
      }
      const acc_t r = p.rad ? p.rad[b] : acc_t(0);
      const scalar_t* zb = p.base + b * sb;
      acc_t asum = acc_t(0);  // A of index-target rows (the same for every copy)
      cpu::reduce_copies(
          k, tau,
          [&](int64_t j, acc_t& lse_j) {
            return L.row_loss(zb + j * sk, b, j, y, r, xs, as, lse_j, asum);
          },
          lse_b, w_b, p.loss + b, p.index + b);
      if (p.dradius) p.dradius[b] = sample_dradius(L, zb, sk, k, y, r, lse_b, w_b, asum);
    }
  });
}

template <typename Loss>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits,
                   const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                   const at::Tensor& weight, const Loss& L, at::Tensor& grad) {
  using scalar_t = typename Loss::scalar_t;
  using acc_t = typename Loss::acc_t;
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const int64_t sb = logits.stride(0), sk = logits.stride(1);
  const int64_t gb = grad.stride(0), gk = grad.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* gbase = grad.mutable_data_ptr<scalar_t>();
  const acc_t* rad = radius.has_value() ? radius->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C));

  at::parallel_for(0, B * k, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> as;
    for (int64_t row_id = begin; row_id < end; ++row_id) {
      const int64_t b = row_id / k, j = row_id % k;
      scalar_t* out = gbase + b * gb + j * gk;
      const acc_t w = w_p[row_id];
      if (w == acc_t(0)) {  // unselected copy or ignored sample: zeros, logits not read
        std::fill(out, out + C, scalar_t(0));
        continue;
      }
      const int64_t y = L.index_target(b);
      if (!L.soft() && (y < 0 || y >= C)) {  // invalid index target: NaN row (weight is NaN)
        std::fill(out, out + C, static_cast<scalar_t>(quiet_nan<acc_t>()));
        continue;
      }
      L.grad_row(base + b * sb + j * sk, b, j, y, rad ? rad[b] : acc_t(0), lse_p[row_id], w * g[b],
                 as, out);
    }
  });
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// Builds the loss policy for the logits' dtype (and the soft target's) and runs body(loss).
template <typename Body>
void with_loss(bool weighted, const at::Tensor& logits, const at::Tensor& tgt,
               const c10::optional<at::Tensor>& class_weight, double label_smoothing, Body&& body) {
  const int64_t C = logits.size(2);
  if (weighted) {
    dispatch_weighted(logits, tgt, [&](auto s, auto t) {
      body(WeightedLoss<decltype(s), decltype(t)>(tgt, class_weight, label_smoothing, C));
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "worst_of_k_ce_cpu",
      [&] { body(PlainLoss<scalar_t>(tgt, class_weight, label_smoothing, C)); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> worst_of_k_ce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight) {
  const bool weighted = check_worst_of_k_args(logits, target, radius, class_weight);
  WorstOfKForward out = WorstOfKForward::allocate(logits, radius.has_value());
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad = contiguous(radius), cw = contiguous(class_weight);
  with_loss(weighted, logits, tgt, cw, label_smoothing,
            [&](const auto& L) { forward_impl(logits, rad, temperature, ignore_index, L, out); });
  return out.as_tuple();
}

// The backward into `grad`, which may be the logits themselves: each row is read before it is
// written (the target logit is read first, since it is rewritten after the row loop).
void backward_into(bool weighted, const at::Tensor& grad_loss, const at::Tensor& logits,
                   const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                   const at::Tensor& lse, const at::Tensor& weight, double label_smoothing,
                   const c10::optional<at::Tensor>& class_weight, at::Tensor& grad) {
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor tgt = is_soft_target(target) ? target : target.contiguous();
  const c10::optional<at::Tensor> rad = contiguous(radius), cw = contiguous(class_weight);
  with_loss(weighted, logits, tgt, cw, label_smoothing,
            [&](const auto& L) { backward_impl(g, logits, rad, lse, weight, L, grad); });
}

at::Tensor worst_of_k_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const c10::optional<at::Tensor>& radius,
                                 const at::Tensor& lse, const at::Tensor& weight,
                                 double label_smoothing, int64_t ignore_index,
                                 const c10::optional<at::Tensor>& class_weight) {
  const bool weighted =
      check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight, class_weight);
  (void)ignore_index;  // ignored samples arrive with weight 0
  at::Tensor grad = at::empty_like(logits);
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                class_weight, grad);
  return grad;
}

void worst_of_k_ce_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& target,
                                   const c10::optional<at::Tensor>& radius, const at::Tensor& lse,
                                   const at::Tensor& weight, double label_smoothing,
                                   int64_t ignore_index,
                                   const c10::optional<at::Tensor>& class_weight) {
  const bool weighted =
      check_worst_of_k_backward(grad_loss, logits, target, radius, lse, weight, class_weight);
  check_inplace_backward(logits, target);
  (void)ignore_index;
  at::Tensor out = logits;  // the same storage: the gradient replaces the logits
  backward_into(weighted, grad_loss, logits, target, radius, lse, weight, label_smoothing,
                class_weight, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmargin, CPU, m) {
  m.impl("worst_of_k_ce_fwd", &worst_of_k_ce_fwd_cpu);
  m.impl("worst_of_k_ce_bwd", &worst_of_k_ce_bwd_cpu);
  m.impl("worst_of_k_ce_bwd_inplace", &worst_of_k_ce_bwd_inplace_cpu);
}

}  // namespace fastmargin
