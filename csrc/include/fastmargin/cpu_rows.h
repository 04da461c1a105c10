// Row helpers shared by the CPU kernels of the cross-entropy family (worst_of_k_ce.cpp,
// weight_noise_ce.cpp): robust / noisy rows in acc_t scratch, their softmax statistics in
// vectorised passes (cpu_vec_math.h), the copy reduction of one sample, and the softmax-gradient
// row loops. Host only (std::vector), never included by .cu files.
//
// Float rows (acc_t = float: float, half and bfloat16 logits) go through the entry points of
// csrc/cpu/vec_rows.cpp, which compiles the same loops for the x86-64 baseline, AVX2 + FMA and
// AVX-512 and picks one when the library loads (the exp-bound loops run 3-5x faster with 8 or 16
// lanes and FMA than with the baseline's 4).
// Double rows use the templates directly (exp_lane(double) is std::exp).
//
// Exactness contract (the same as the scalar online pass of ce_math.h it replaces): a -inf
// (masked) class adds exactly 0 to the sum of exps and gets exactly 0 probability; a NaN logit
// makes its row's sum NaN; rows whose max is not finite (all -inf, +inf, all NaN) take the scalar
// online pass itself, so their loss is what it always was.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "fastmargin/ce_math.h"
#include "fastmargin/cpu_vec_math.h"

namespace fastmargin {
namespace cpu {

// Grows on demand; one per thread chunk of an at::parallel_for body.
template <typename T>
struct Scratch {
  std::vector<T> buf;
  T* get(int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
    return buf.data();
  }
};

template <typename acc_t>
bool is_finite(acc_t x) {
  return x - x == acc_t(0);  // false for +-inf and NaN
}

// sum over i in [0, n) of f(i), in kLanes independent partial sums so that the loop vectorises
// without reassociation (f must be branch-free to vectorise).
template <typename acc_t, typename F>
acc_t lane_reduce(int64_t n, F&& f) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += f(i + l);
  }
  for (; i < n; ++i) s[0] += f(i);
  acc_t out = 0;
  for (int l = 0; l < kLanes; ++l) out += s[l];
  return out;
}

// sum over c of a_c (x_c - m) where a_c != 0 (a zero coefficient never meets a masked -inf).
template <typename acc_t>
acc_t coef_dot_loop(const acc_t* a, const acc_t* x, int64_t n, acc_t m) {
  return lane_reduce<acc_t>(n, [a, x, m](int64_t c) {
    const acc_t ac = a[c], d = x[c] - m;  // both loaded always, so the select vectorises
    return ac * (ac != acc_t(0) ? d : acc_t(0));
  });
}

// out[c] = s * (A exp(z_c + r - lse) - a_c) for c in [0, n), with a_c = a[c] (a != nullptr) or
// a_off: the gradient of sum_c a_c (lse - z~_c) at the classes whose shift is +r (A = 1,
// a_off = eps / C: plain CE).
template <typename scalar_t, typename acc_t>
void softmax_grad_loop(const scalar_t* z, int64_t n, acc_t r, acc_t lse, acc_t A, const acc_t* a,
                       acc_t a_off, acc_t s, scalar_t* out) {
  if (a) {
    for (int64_t c = 0; c < n; ++c) {
      out[c] = static_cast<scalar_t>(s * (A * exp_lane(static_cast<acc_t>(z[c]) + r - lse) - a[c]));
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      out[c] =
          static_cast<scalar_t>(s * (A * exp_lane(static_cast<acc_t>(z[c]) + r - lse) - a_off));
    }
  }
}

// acc[c] += t_c = w (exp(x_c - lse) - a_off) for c in [0, n); returns sum_c t_c xi_c (the
// weight-noise backward's dL/ds term of an off-target stretch of a noisy row x = z + s xi).
template <typename acc_t>
acc_t softmax_grad_acc_loop(const acc_t* x, const float* xi, int64_t n, acc_t lse, acc_t w,
                            acc_t a_off, acc_t* acc) {
  return lane_reduce<acc_t>(n, [=](int64_t c) {
    const acc_t t = w * (exp_lane(x[c] - lse) - a_off);
    acc[c] += t;
    return t * static_cast<acc_t>(xi[c]);
  });
}

// The float instantiations of the loops above, multiversioned in csrc/cpu/vec_rows.cpp.
float max_f32(const float* x, int64_t n);
float sum_exp_f32(const float* x, int64_t n, float shift);
float sum_f32(const float* x, int64_t n);
float coef_dot_f32(const float* a, const float* x, int64_t n, float m);
void softmax_grad_f32(const float* z, int64_t n, float r, float lse, float A, const float* a,
                      float a_off, float s, float* out);
float softmax_grad_acc_f32(const float* x, const float* xi, int64_t n, float lse, float w,
                           float a_off, float* acc);
void exp_inplace_f32(float* x, int64_t n);

template <typename acc_t>
void exp_inplace(acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    exp_inplace_f32(x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = exp_lane(x[i]);
  }
}

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) return max_f32(x, n);
  return lane_max(x, n);
}
template <typename acc_t>
acc_t row_sum_exp(const acc_t* x, int64_t n, acc_t shift) {
  if constexpr (std::is_same_v<acc_t, float>) return sum_exp_f32(x, n, shift);
  return lane_sum_exp(x, n, shift);
}
template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) return sum_f32(x, n);
  return lane_sum(x, n);
}
template <typename acc_t>
acc_t row_coef_dot(const acc_t* a, const acc_t* x, int64_t n, acc_t m) {
  if constexpr (std::is_same_v<acc_t, float>) return coef_dot_f32(a, x, n, m);
  return coef_dot_loop(a, x, n, m);
}
template <typename acc_t>
acc_t row_softmax_grad_acc(const acc_t* x, const float* xi, int64_t n, acc_t lse, acc_t w,
                           acc_t a_off, acc_t* acc) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return softmax_grad_acc_f32(x, xi, n, lse, w, a_off, acc);
  }
  return softmax_grad_acc_loop(x, xi, n, lse, w, a_off, acc);
}

// The robust row z~ of ce_math.h in acc_t: x_c = z_c + r off the target, x_y = z_y - r (y outside
// [0, C): no target class). A float row with r == 0 is used in place.
template <typename scalar_t, typename acc_t>
const acc_t* robust_row(const scalar_t* z, int64_t C, int64_t y, acc_t r, Scratch<acc_t>& s) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (r == acc_t(0)) return z;
  }
  acc_t* x = s.get(C);
  for (int64_t c = 0; c < C; ++c) x[c] = static_cast<acc_t>(z[c]) + r;
  if (y >= 0 && y < C) x[y] = robust_logit(static_cast<acc_t>(z[y]), true, r);
  return x;
}

// RowStats of x[0, C) with a finite max: max, then the sum of exps (and the plain sum when
// want_sum), each one vectorised pass. Returns false (st untouched) when the max is not finite.
template <typename acc_t>
bool fast_row_stats(const acc_t* x, int64_t C, bool want_sum, RowStats<acc_t>& st) {
  const acc_t m = row_max(x, C);
  if (!is_finite(m)) return false;
  st = {m, row_sum_exp(x, C, m), want_sum ? row_sum(x, C) : acc_t(0)};
  return true;
}

// RowStats of x[0, C): the vectorised passes, or the scalar online pass for non-finite maxima.
template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* x, int64_t C, bool want_sum) {
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  if (fast_row_stats(x, C, want_sum, st)) return st;
  for (int64_t c = 0; c < C; ++c) st.add(x[c], want_sum);
  return st;
}

// Rows of at most this many classes are reduced several at a time (small_rows_stats): one row
// alone fills few lanes, and the per-row cost of the passes above would dominate.
constexpr int64_t kSmallRow = 32;

// The robust shift of the rows of a small-rows call: row i is z~ (robust_row) with radius r[i] and
// target class cls[i] (outside [0, C): every class gets +r[i]). r == nullptr: the rows as given.
template <typename acc_t>
struct RowShift {
  const acc_t* r = nullptr;
  const int64_t* cls = nullptr;

  // Element c of row i, given the stored value v.
  acc_t apply(int64_t i, int64_t c, acc_t v) const {
    return r ? v + (c == cls[i] ? -r[i] : r[i]) : v;
  }
};

// Statistics of short rows, kLanes at a time: each tile is transposed into t (C x kLanes, row l
// of the tile in lane l) so that every per-row reduction and the exps are lane-parallel vector ops
// with no horizontal step. Per row the operations run in the order of a scalar loop over c.
//
// max, sum of exp(x_c - max) (shift 0 where the max is not finite) and, when want_sum, sum of x_c
// of `rows` rows of C <= kSmallRow classes, row i at x + i * stride (the caller redoes non-finite
// maxima). A short last tile fills its unused lanes with the tile's row 0, computed and dropped.
//
// With a radius (shift.r != nullptr) the rows are the robust rows z~ of robust_row, formed while
// the tile is loaded (z_c + r_i, and z_y + (-r_i) == z_y - r_i bit for bit at c == y_i) instead of
// being gathered into scratch first.
template <typename scalar_t, typename acc_t>
void small_rows_lanes(const scalar_t* x, int64_t stride, int64_t rows, int64_t C, bool want_sum,
                      RowShift<acc_t> shift, acc_t* mx, acc_t* se, acc_t* sz) {
  acc_t t[kSmallRow * kLanes];
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, rows - r0);
    int64_t at[kLanes];
    for (int l = 0; l < kLanes; ++l) at[l] = (r0 + (l < n ? l : 0)) * stride;
    if (shift.r) {
      acc_t up[kLanes], down[kLanes];
      int64_t y[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int64_t i = r0 + (l < n ? l : 0);
        up[l] = shift.r[i];
        down[l] = -up[l];
        y[l] = shift.cls[i];
      }
      for (int64_t c = 0; c < C; ++c) {  // branch-free select: vectorises as a blend
        for (int l = 0; l < kLanes; ++l) {
          t[c * kLanes + l] = static_cast<acc_t>(x[at[l] + c]) + (c == y[l] ? down[l] : up[l]);
        }
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {  // class-outer: contiguous stores, gathered loads
        for (int l = 0; l < kLanes; ++l) t[c * kLanes + l] = static_cast<acc_t>(x[at[l] + c]);
      }
    }
    acc_t m[kLanes], sh[kLanes], e[kLanes] = {}, z[kLanes] = {};
    for (int l = 0; l < kLanes; ++l) m[l] = neg_inf<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      for (int l = 0; l < kLanes; ++l) m[l] = t[c * kLanes + l] > m[l] ? t[c * kLanes + l] : m[l];
    }
    for (int l = 0; l < kLanes; ++l) sh[l] = is_finite(m[l]) ? m[l] : acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      for (int l = 0; l < kLanes; ++l) e[l] += exp_lane(t[c * kLanes + l] - sh[l]);
    }
    if (want_sum) {
      for (int64_t c = 0; c < C; ++c) {
        for (int l = 0; l < kLanes; ++l) z[l] += t[c * kLanes + l];
      }
    }
    for (int64_t l = 0; l < n; ++l) {
      mx[r0 + l] = m[l];
      se[r0 + l] = e[l];
      sz[r0 + l] = z[l];
    }
  }
}

// out row i = s_i * (exp(z_i,c + r_i - lse_i) - a_off) for c in [0, C), C <= kSmallRow, for
// `rows` rows (row i at z + i * zs, written at out + i * os; out may be z: a block is read whole
// before it is written): the plain-CE softmax gradient of softmax_grad_loop with A = 1. Blocks of
// rows go through acc_t scratch, so that the exps run as one flat vectorised loop (per row they
// would fill a vector and a short remainder).
template <typename scalar_t, typename acc_t>
void softmax_grad_small_rows_loop(const scalar_t* z, int64_t zs, int64_t rows, int64_t C,
                                  const acc_t* r, const acc_t* lse, const acc_t* s, acc_t a_off,
                                  scalar_t* out, int64_t os) {
  constexpr int64_t kBlock = 64;  // rows: 8 KiB of float scratch at C = 32
  acc_t e[kBlock * kSmallRow];
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t n = std::min(kBlock, rows - r0);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* zr = z + (r0 + i) * zs;
      const acc_t ri = r[r0 + i], li = lse[r0 + i];
      for (int64_t c = 0; c < C; ++c) e[i * C + c] = static_cast<acc_t>(zr[c]) + ri - li;
    }
    for (int64_t q = 0; q < n * C; ++q) e[q] = exp_lane(e[q]);
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* o = out + (r0 + i) * os;
      const acc_t si = s[r0 + i];
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(si * (e[i * C + c] - a_off));
    }
  }
}

void small_rows_lanes_f32(const float* x, int64_t stride, int64_t rows, int64_t C, bool want_sum,
                          RowShift<float> shift, float* mx, float* se, float* sz);
void softmax_grad_small_rows_f32(const float* z, int64_t zs, int64_t rows, int64_t C,
                                 const float* r, const float* lse, const float* s, float a_off,
                                 float* out, int64_t os);

template <typename scalar_t, typename acc_t>
void softmax_grad_small_rows(const scalar_t* z, int64_t zs, int64_t rows, int64_t C, const acc_t* r,
                             const acc_t* lse, const acc_t* s, acc_t a_off, scalar_t* out,
                             int64_t os) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    softmax_grad_small_rows_f32(z, zs, rows, C, r, lse, s, a_off, out, os);
  } else {
    softmax_grad_small_rows_loop(z, zs, rows, C, r, lse, s, a_off, out, os);
  }
}

// RowStats of `rows` rows of C classes (C <= kSmallRow), row i at x + i * stride (the robust row
// when `shift` has a radius), through small_rows_lanes; e is acc_t scratch of 3 * rows. Rows whose
// max is not finite take the scalar online pass, as in row_stats.
template <typename scalar_t, typename acc_t>
void small_rows_stats(const scalar_t* x, int64_t stride, int64_t rows, int64_t C, bool want_sum,
                      acc_t* e, RowStats<acc_t>* st, RowShift<acc_t> shift = {}) {
  acc_t *mx = e, *se = e + rows, *sz = e + 2 * rows;
  if constexpr (std::is_same_v<scalar_t, float>) {
    small_rows_lanes_f32(x, stride, rows, C, want_sum, shift, mx, se, sz);
  } else {
    small_rows_lanes(x, stride, rows, C, want_sum, shift, mx, se, sz);
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (is_finite(mx[i])) {
      st[i] = {mx[i], se[i], sz[i]};
      continue;
    }
    st[i] = RowStats<acc_t>::empty();
    for (int64_t c = 0; c < C; ++c) {
      st[i].add(shift.apply(i, c, static_cast<acc_t>(x[i * stride + c])), want_sum);
    }
  }
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

// The k copies of one sample: copy_loss(j, lse[j]) returns the loss of copy j and stores its
// logsumexp. Writes the worst-of-k (or smooth-max) loss and worst index, and leaves
// dL/dl_j in weight[j].
template <typename acc_t, typename CopyLoss>
void reduce_copies(int64_t k, acc_t tau, CopyLoss&& copy_loss, acc_t* lse, acc_t* weight,
                   acc_t* loss, int64_t* index) {
  CopyReducer<acc_t> red = CopyReducer<acc_t>::start();
  for (int64_t j = 0; j < k; ++j) {
    weight[j] = copy_loss(j, lse[j]);  // the loss waits here until all k copies are known
    red.add(j, weight[j], tau);
  }
  *loss = red.loss(k, tau);
  *index = red.best_index;
  for (int64_t j = 0; j < k; ++j) weight[j] = red.weight(j, weight[j], tau);
}

// softmax_grad_loop over a whole row: float rows in place, half / bfloat16 rows through float
// chunks on the stack (so they also take the multiversioned loop). The caller rewrites the
// target class, whose logit has the opposite shift.
template <typename scalar_t, typename acc_t>
void softmax_grad_row(const scalar_t* z, int64_t C, acc_t r, acc_t lse, acc_t A, const acc_t* a,
                      acc_t a_off, acc_t s, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    softmax_grad_f32(z, C, r, lse, A, a, a_off, s, out);
  } else if constexpr (std::is_same_v<acc_t, float>) {
    constexpr int64_t kChunk = 512;
    float zc[kChunk], oc[kChunk];
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      for (int64_t c = 0; c < n; ++c) zc[c] = static_cast<float>(z[c0 + c]);
      softmax_grad_f32(zc, n, r, lse, A, a ? a + c0 : nullptr, a_off, s, oc);
      for (int64_t c = 0; c < n; ++c) out[c0 + c] = static_cast<scalar_t>(oc[c]);
    }
  } else {
    softmax_grad_loop(z, C, r, lse, A, a, a_off, s, out);
  }
}

}  // namespace cpu
}  // namespace fastmargin
