// Cross-entropy with a per-class coefficient vector (host + device): the math behind class
// weights and probability (soft) targets, shared by the CPU and CUDA kernels.
//
// Every variant of F.cross_entropy that this file serves is, per row z (C classes),
//   l = sum_c a_c * (lse(z) - z_c),           a_c = w_c * ((1 - eps) * p_c + eps / C),
// with w the class weights (all 1 without `weight=`), eps the label smoothing and p the target
// distribution: a probability row for soft targets, the one-hot e_y for an index target.
// That is PyTorch's definition in both cases (cross_entropy_loss_prob_target and
// cross_entropy_loss_label_smoothing + nll_loss with `weight`). Its gradient is
//   dl/dz_c = A * softmax(z)_c - a_c,         A = sum_c a_c.
//
// Terms whose coefficient a_c is exactly 0 are skipped, so a class masked with -inf that has
// zero target mass gives a finite loss and zero gradient (F.cross_entropy returns NaN for a
// probability target there, because it evaluates 0 * -inf).
//
// The dot product is kept relative to the running max, D = sum_c a_c (z_c - max), so that
// l = A * log(sumexp) - D has no cancellation between two large numbers (logits of magnitude
// 1e4 in float32 stay exact to a few ulps of the loss, as for the unweighted kernel).
#pragma once

#include "fastmargin/ce_math.h"

namespace fastmargin {

// Coefficient of class c: a_c = w_c * ((1 - eps) * p_c + eps / C). With eps == 0 this is
// exactly w_c * p_c (keep == 1, eps_over_c == 0). A class with no target mass (q == 0: every
// class but y of an index target without smoothing) does not read its weight, so the kernels
// touch the (C,) weight vector only where it matters.
template <typename acc_t>
struct ClassCoef {
  const acc_t* class_weight;  // (C,) or nullptr for all ones
  acc_t keep;                 // 1 - eps
  acc_t eps_over_c;           // eps / C

  FM_HD acc_t operator()(acc_t p, int64_t c) const {
    const acc_t q = keep * p + eps_over_c;
    return (class_weight && q != acc_t(0)) ? class_weight[c] * q : q;
  }
};

// Online statistics of (part of) a row for the weighted loss: running max, sum of
// exp(z - max), A = sum a_c and D = sum_{a_c != 0} a_c (z_c - max).
template <typename acc_t>
struct WeightedRowStats {
  acc_t max;
  acc_t sumexp;
  acc_t asum;
  acc_t adot;

  FM_HD static WeightedRowStats empty() { return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)}; }

  // Moves the reference point of sumexp and D from max to m (m > max).
  // D - A (m - max): with max == -inf and A != 0 every counted z was -inf (or NaN), so D is
  // already +-inf/NaN and stays so; A == 0 needs no shift (and 0 * inf would be NaN).
  FM_HD void rebase(acc_t m) {
    sumexp = (sumexp == acc_t(0)) ? acc_t(0) : sumexp * fm_exp(max - m);
    if (asum != acc_t(0)) adot -= asum * (m - max);
    max = m;
  }

  template <int N>
  FM_HD void add(const acc_t (&x)[N], const acc_t (&a)[N]) {
    acc_t m = max;
    FM_UNROLL
    for (int e = 0; e < N; ++e) m = x[e] > m ? x[e] : m;
    if (m > max) rebase(m);
    FM_UNROLL
    for (int e = 0; e < N; ++e) {
      const bool masked = x[e] == neg_inf<acc_t>();
      sumexp += masked ? acc_t(0) : fm_exp(x[e] - m);
      if (a[e] != acc_t(0)) {
        asum += a[e];
        adot += a[e] * (masked ? neg_inf<acc_t>() : x[e] - m);
      }
    }
  }

  FM_HD void add(acc_t x, acc_t a) {
    const acc_t xs[1] = {x};
    const acc_t as[1] = {a};
    add(xs, as);
  }

  // Associative merge (any reduction tree gives the same math); NaN sums survive it.
  FM_HD void merge(WeightedRowStats o) {
    if (o.max > max) {
      rebase(o.max);
    } else if (max > o.max) {
      o.rebase(max);
    }
    sumexp = is_nan(sumexp) || is_nan(o.sumexp) ? quiet_nan<acc_t>() : sumexp + o.sumexp;
    asum += o.asum;
    adot += o.adot;
  }

  FM_HD acc_t lse() const { return max + fm_log(sumexp); }

  // l = sum_c a_c (lse - z_c) = A log(sumexp) - D. A == 0 (all-zero coefficients) gives 0.
  FM_HD acc_t loss() const { return (asum == acc_t(0) ? acc_t(0) : asum * fm_log(sumexp)) - adot; }
};

// One row of the weighted loss: logits z, target distribution p (nullptr: one-hot at y), the
// robust radius r (0: plain row) and the coefficients, evaluated in place so that a sweep over
// the row reads the soft target row once, alongside the logits.
template <typename scalar_t, typename target_t, typename acc_t>
struct WeightedRow {
  const scalar_t* z;
  const target_t* p;  // nullptr: one-hot at y
  int64_t y;          // -1 for soft targets (no class is "the target" for the radius)
  acc_t r;
  ClassCoef<acc_t> coef;

  FM_HD acc_t logit(int64_t c) const { return robust_logit(static_cast<acc_t>(z[c]), c == y, r); }
  FM_HD acc_t a(int64_t c) const {
    return coef(p ? static_cast<acc_t>(p[c]) : acc_t(c == y ? 1 : 0), c);
  }
  FM_HD WeightedRowStats<acc_t> stats(int64_t C) const {
    WeightedRowStats<acc_t> st = WeightedRowStats<acc_t>::empty();
    for (int64_t c = 0; c < C; ++c) st.add(logit(c), a(c));
    return st;
  }
  FM_HD acc_t asum(int64_t C) const {  // A = sum_c a_c without reading the logits
    acc_t A = acc_t(0);
    for (int64_t c = 0; c < C; ++c) A += a(c);
    return A;
  }
};

// d l(z~) / d r for the weight-robust row (z~_c = z_c + r off target, z_y - r on it) with
// class weights: sum_c (A p~_c - a_c) s_c with s = +1 off target, -1 on it = 2 (a_y - A p~_y).
template <typename acc_t>
FM_HD acc_t weighted_dce_dradius(acc_t lse, acc_t zy_tilde, acc_t a_y, acc_t asum) {
  return acc_t(2) * (a_y - asum * fm_exp(zy_tilde - lse));
}

// Gradient of the weighted row loss at class c, scaled by s: s * (A exp(z_c - lse) - a_c).
// The -a_c is applied in acc_t before the caller rounds to the logits dtype.
template <typename acc_t>
FM_HD acc_t weighted_ce_grad(acc_t z_tilde, acc_t a, acc_t lse, acc_t asum, acc_t s) {
  return s * (asum * fm_exp(z_tilde - lse) - a);
}

}  // namespace fastmargin
