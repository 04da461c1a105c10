// Cross-entropy-family math shared by the CPU and CUDA kernels (host + device).
//
// Notation (docs/design.md): z a row of logits, y its target, C classes, eps label smoothing,
// r the weight-robust radius (0 for plain CE). The robust row is
//   z~_c = z_c + r (c != y),  z~_y = z_y - r,
// and the per-row loss is CE(z~) = lse(z~) - (1 - eps) z~_y - (eps / C) sum_c z~_c.
// Everything is accumulated in acc_t (float for float/half/bfloat16, double for double).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#define FM_UNROLL _Pragma("unroll")
#else
#define FM_HD inline
#define FM_UNROLL
#endif

namespace fastmargin {

template <typename acc_t>
FM_HD acc_t fm_exp(acc_t x) {
  return std::exp(x);
}
template <typename acc_t>
FM_HD acc_t fm_log(acc_t x) {
  return std::log(x);
}
template <typename acc_t>
FM_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}
template <typename acc_t>
FM_HD acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}
template <typename acc_t>
FM_HD bool is_nan(acc_t x) {
  return x != x;
}

// Online softmax statistics of (part of) a row: running max, sum of exp(z - max), sum of z.
// A NaN logit makes sumexp NaN (exp(NaN) = NaN), so a NaN anywhere in a row reaches the loss.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sumexp;
  acc_t sumz;

  FM_HD static RowStats empty() { return {neg_inf<acc_t>(), acc_t(0), acc_t(0)}; }

  // Adds N elements with one rescale of the running sum (N exps instead of 2N).
  // exp(-inf - -inf) would be NaN, so -inf elements add exactly 0; a NaN element is skipped by
  // the max (x > m is false) but makes sumexp NaN.
  template <int N>
  FM_HD void add(const acc_t (&x)[N], bool want_sum) {
    acc_t m = max;
    FM_UNROLL
    for (int e = 0; e < N; ++e) m = x[e] > m ? x[e] : m;
    if (m > max) {
      sumexp = (sumexp == acc_t(0)) ? acc_t(0) : sumexp * fm_exp(max - m);
      max = m;
    }
    FM_UNROLL
    for (int e = 0; e < N; ++e) {
      sumexp += (x[e] == neg_inf<acc_t>()) ? acc_t(0) : fm_exp(x[e] - m);
      if (want_sum) sumz += x[e];
    }
  }

  FM_HD void add(acc_t x, bool want_sum) {
    const acc_t one[1] = {x};
    add(one, want_sum);
  }

  // Merges another partial result (associative, so any reduction tree gives the same math).
  FM_HD void merge(const RowStats& o) {
    const acc_t m = max > o.max ? max : o.max;
    const acc_t a = (sumexp == acc_t(0)) ? acc_t(0) : sumexp * fm_exp(max - m);
    const acc_t b = (o.sumexp == acc_t(0)) ? acc_t(0) : o.sumexp * fm_exp(o.max - m);
    // NaN sums must survive the merge even when the max is -inf.
    max = m;
    sumexp = is_nan(sumexp) || is_nan(o.sumexp) ? quiet_nan<acc_t>() : a + b;
    sumz += o.sumz;
  }

  FM_HD acc_t lse() const { return max + fm_log(sumexp); }
};

// How the kernels treat a target value: a class, the ignore_index, or invalid (NaN row).
enum class TargetKind : int { kClass = 0, kIgnored = 1, kInvalid = 2 };

FM_HD TargetKind classify_target(int64_t y, int64_t ignore_index, int64_t C) {
  if (y == ignore_index) return TargetKind::kIgnored;
  if (y < 0 || y >= C) return TargetKind::kInvalid;
  return TargetKind::kClass;
}

// The logit the robust row sees at class c: +r off target, -r on target (r = 0: plain CE).
template <typename acc_t>
FM_HD acc_t robust_logit(acc_t z, bool is_target, acc_t r) {
  return is_target ? z - r : z + r;
}

// CE of a row from its statistics over z~ (sumz is only used when eps > 0, so -inf masked
// classes give a finite loss without smoothing, as in F.cross_entropy).
template <typename acc_t>
FM_HD acc_t ce_from_stats(acc_t lse, acc_t zy_tilde, acc_t sumz_tilde, acc_t eps, int64_t C) {
  acc_t loss = lse - (acc_t(1) - eps) * zy_tilde;
  if (eps != acc_t(0)) loss -= eps / acc_t(C) * sumz_tilde;
  return loss;
}

// d CE(z~) / d r = sum_c dCE/dz~_c * dz~_c/dr = 2 (q_y - p~_y), q_y = 1 - eps + eps / C.
// From p~_y = exp(z~_y - lse) (the CPU small-row forward computes a block's exps together).
template <typename acc_t>
FM_HD acc_t dce_dradius_from_prob(acc_t p_y, acc_t eps, int64_t C) {
  return acc_t(2) * (acc_t(1) - eps + eps / acc_t(C) - p_y);
}
template <typename acc_t>
FM_HD acc_t dce_dradius(acc_t lse, acc_t zy_tilde, acc_t eps, int64_t C) {
  return dce_dradius_from_prob(fm_exp(zy_tilde - lse), eps, C);
}

// Reduces the k per-copy losses of one sample to the worst-of-k loss.
//   temperature == 0: L = max_j l_j, ties to the lowest j, a NaN copy wins (NaN propagates);
//   temperature  > 0: L = tau * log(mean_j exp(l_j / tau)), tracked as an online logsumexp.
template <typename acc_t>
struct CopyReducer {
  acc_t best;
  int64_t best_index;
  acc_t lse_max;  // online logsumexp of l_j / tau
  acc_t lse_sum;

  FM_HD static CopyReducer start() { return {neg_inf<acc_t>(), 0, neg_inf<acc_t>(), acc_t(0)}; }

  FM_HD void add(int64_t j, acc_t loss, acc_t tau) {
    const bool take = (j == 0) || (!is_nan(best) && (is_nan(loss) || loss > best));
    if (take) {
      best = loss;
      best_index = j;
    }
    if (tau > acc_t(0)) {
      const acc_t v = loss / tau;
      if (v > lse_max) {
        lse_sum = lse_sum * fm_exp(lse_max - v);
        lse_max = v;
      }
      // v == lse_max covers +inf == +inf (exp(inf - inf) would be NaN; logsumexp gives inf).
      lse_sum +=
          (v == neg_inf<acc_t>()) ? acc_t(0) : (v == lse_max ? acc_t(1) : fm_exp(v - lse_max));
    }
  }

  FM_HD acc_t loss(int64_t k, acc_t tau) const {
    if (tau > acc_t(0)) return tau * (lse_max + fm_log(lse_sum) - fm_log(acc_t(k)));
    return best;
  }

  // Weight of copy j in dL/dl_j: one-hot at the worst copy, or softmax_j(l / tau).
  FM_HD acc_t weight(int64_t j, acc_t loss_j, acc_t tau) const {
    if (tau > acc_t(0)) return fm_exp(loss_j / tau - lse_max) / lse_sum;
    return j == best_index ? acc_t(1) : acc_t(0);
  }
};

// ce_grad from p~_c = exp(z~_c - lse) (the CPU small-row backward computes a tile's exps
// together).
template <typename acc_t>
FM_HD acc_t ce_grad_from_prob(acc_t p, bool is_target, acc_t eps, acc_t eps_over_c, acc_t w) {
  acc_t g = p - eps_over_c;
  if (is_target) g -= acc_t(1) - eps;
  return w * g;
}

// Gradient of CE(z~) with respect to z_c (= z~_c, the shift is constant in z), scaled by w.
// The target's -(1 - eps) is applied in acc_t before the caller rounds to the logits dtype.
template <typename acc_t>
FM_HD acc_t ce_grad(acc_t z_tilde, bool is_target, acc_t lse, acc_t eps, acc_t eps_over_c,
                    acc_t w) {
  return ce_grad_from_prob(fm_exp(z_tilde - lse), is_target, eps, eps_over_c, w);
}

}  // namespace fastmargin
