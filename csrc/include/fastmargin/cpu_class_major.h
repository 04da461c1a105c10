// Row loops of the CPU cross-entropy kernels for class-major rows: (B, 1, C) logits whose rows
// are consecutive (row stride 1) and whose class dim has stride cs (the memory is (C, B), or
// (C, N * S) for spatial logits: fastmargin/_ce_layout.py hands them over so, see
// csrc/cpu/class_last.cpp). Consecutive rows sit next to each other in every class, so a tile of
// kMajorTile rows is a few vector loads per class and every per-row reduction is a lane-parallel
// vector op, with no transpose and no horizontal step; per row the operations run in the order of
// a scalar loop over the classes (the order of cpu_rows.h's small-row passes).
//
// Float, bfloat16 and half rows go through the multiversioned entry points of
// csrc/cpu/vec_rows.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fastmargin/ce_math.h"
#include "fastmargin/cpu_vec_math.h"
#include "fastmargin/philox.h"

namespace fastmargin {
namespace cpu {

// Rows per tile: four 16-lane vectors. gcc vectorises the fixed-trip lane loops below at this
// length; at 16 it unrolls them fully first and leaves them scalar (about 2x slower).
constexpr int kMajorTile = 64;

// Lane l of tile r0 reads row r0 + l; a short last tile (n < kMajorTile rows) reads row r0 in its
// unused lanes (computed, never stored), so no lane reads past the rows.
template <bool kFull>
inline int64_t lane_row(int64_t r0, int l, int64_t n) {
  return kFull ? r0 + l : r0 + (l < n ? l : 0);
}

// log(x) for float in lanes: philox.h's log_unit (Cephes' logf polynomial, under 1 ulp), with
// subnormals scaled by 2^25 first; 0 gives -inf, x < 0 NaN, +inf +inf, NaN stays NaN. std::log
// does not vectorise, and the per-row logsumexp of a class-major tile is then one scalar call
// per row.
inline float log_lane(float x) {
  const bool sub = x < 1.17549435e-38f;  // also 0 and negatives, fixed up below
  const float r = log_unit(sub ? x * 33554432.0f : x, sub ? 25 : 0);
  const float inf = std::numeric_limits<float>::infinity();
  if (x != x || x == inf) return x;
  return x > 0.0f ? r : (x == 0.0f ? -inf : std::numeric_limits<float>::quiet_NaN());
}

inline double log_lane(double x) { return std::log(x); }

template <bool kFull, typename scalar_t, typename acc_t>
void class_major_stats_tile(const scalar_t* x, int64_t cs, int64_t r0, int64_t n, int64_t C,
                            bool want_sum, acc_t* mx, acc_t* lse, acc_t* sz) {
  acc_t m[kMajorTile], sh[kMajorTile], e[kMajorTile] = {}, z[kMajorTile] = {};
  for (int l = 0; l < kMajorTile; ++l) m[l] = neg_inf<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = x + c * cs;
    for (int l = 0; l < kMajorTile; ++l) {
      const acc_t v = static_cast<acc_t>(xc[lane_row<kFull>(r0, l, n)]);
      m[l] = v > m[l] ? v : m[l];  // NaN ignored, as lane_max
    }
  }
  for (int l = 0; l < kMajorTile; ++l) sh[l] = m[l] - m[l] == acc_t(0) ? m[l] : acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = x + c * cs;
    for (int l = 0; l < kMajorTile; ++l) {
      e[l] += exp_lane(static_cast<acc_t>(xc[lane_row<kFull>(r0, l, n)]) - sh[l]);
    }
  }
  if (want_sum) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = x + c * cs;
      for (int l = 0; l < kMajorTile; ++l)
        z[l] += static_cast<acc_t>(xc[lane_row<kFull>(r0, l, n)]);
    }
  }
  for (int l = 0; l < kMajorTile; ++l) e[l] = m[l] + log_lane(e[l]);
  for (int64_t l = 0; l < n; ++l) {
    mx[r0 + l] = m[l];
    lse[r0 + l] = e[l];
    sz[r0 + l] = z[l];
  }
}

// max, logsumexp (max + log of the sum of exp(x_c - max)) and, when want_sum, sum of x_c of rows
// [0, rows). The logsumexp is right where the max is finite; the caller redoes the other rows
// with the scalar online pass.
template <typename scalar_t, typename acc_t>
void class_major_stats_loop(const scalar_t* x, int64_t cs, int64_t rows, int64_t C, bool want_sum,
                            acc_t* mx, acc_t* lse, acc_t* sz) {
  int64_t r0 = 0;
  for (; r0 + kMajorTile <= rows; r0 += kMajorTile) {
    class_major_stats_tile<true>(x, cs, r0, kMajorTile, C, want_sum, mx, lse, sz);
  }
  if (r0 < rows) class_major_stats_tile<false>(x, cs, r0, rows - r0, C, want_sum, mx, lse, sz);
}

// The gradient of a tile of rows (class_major_grad_loop); lanes compare the class with their
// row's target, so the target class costs no pass of its own. A short tile (kFull false) stores
// only its n rows.
template <bool kFull, typename scalar_t, typename acc_t>
void class_major_grad_tile(const scalar_t* z, int64_t cs, int64_t r0, int64_t n, int64_t C,
                           const int32_t* y, const acc_t* lse, const acc_t* s, acc_t a_off,
                           acc_t q_off, scalar_t* out) {
  acc_t ll[kMajorTile], sl[kMajorTile];
  int32_t yl[kMajorTile];
  for (int l = 0; l < kMajorTile; ++l) {
    const int64_t i = lane_row<kFull>(r0, l, n);
    ll[l] = lse[i];
    sl[l] = s[i];
    yl[l] = y[i];
  }
  const int64_t lanes = kFull ? int64_t(kMajorTile) : n;  // a constant trip count when full
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* zc = z + c * cs + r0;
    scalar_t* oc = out + c * cs + r0;
    const int32_t ci = static_cast<int32_t>(c);
    // exp(z - lse) - a_off, less q_off at the target class: ce_grad's order of operations.
    for (int64_t l = 0; l < lanes; ++l) {
      const acc_t q = yl[l] == ci ? q_off : acc_t(0);
      oc[l] = static_cast<scalar_t>(sl[l] *
                                    ((exp_lane(static_cast<acc_t>(zc[l]) - ll[l]) - a_off) - q));
    }
  }
}

// out[i, c] = s_i * ((exp(z_i,c - lse_i) - a_off) - [c == y_i] q_off) for rows [0, rows) and
// every class (ce_grad with eps_over_c = a_off, 1 - eps = q_off, no radius: class-major rows
// carry the plain loss only), out laid out as z (class stride cs; out may be z: each element is
// read before it is written).
template <typename scalar_t, typename acc_t>
void class_major_grad_loop(const scalar_t* z, int64_t cs, int64_t rows, int64_t C, const int32_t* y,
                           const acc_t* lse, const acc_t* s, acc_t a_off, acc_t q_off,
                           scalar_t* out) {
  int64_t r0 = 0;
  for (; r0 + kMajorTile <= rows; r0 += kMajorTile) {
    class_major_grad_tile<true>(z, cs, r0, kMajorTile, C, y, lse, s, a_off, q_off, out);
  }
  if (r0 < rows) {
    class_major_grad_tile<false>(z, cs, r0, rows - r0, C, y, lse, s, a_off, q_off, out);
  }
}

// The multiversioned loops of csrc/cpu/vec_rows.cpp, per logits dtype (float statistics).
#define FM_CLASS_MAJOR_ENTRY_POINTS(T, suffix)                                                    \
  void class_major_stats_##suffix(const T* x, int64_t cs, int64_t rows, int64_t C, bool want_sum, \
                                  float* mx, float* lse, float* sz);                              \
  void class_major_grad_##suffix(const T* z, int64_t cs, int64_t rows, int64_t C,                 \
                                 const int32_t* y, const float* lse, const float* s, float a_off, \
                                 float q_off, T* out);
FM_CLASS_MAJOR_ENTRY_POINTS(float, f32)
FM_CLASS_MAJOR_ENTRY_POINTS(c10::BFloat16, bf16)
FM_CLASS_MAJOR_ENTRY_POINTS(c10::Half, f16)
#undef FM_CLASS_MAJOR_ENTRY_POINTS

template <typename scalar_t, typename acc_t>
void class_major_stats(const scalar_t* x, int64_t cs, int64_t rows, int64_t C, bool want_sum,
                       acc_t* mx, acc_t* lse, acc_t* sz) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    class_major_stats_f32(x, cs, rows, C, want_sum, mx, lse, sz);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    class_major_stats_bf16(x, cs, rows, C, want_sum, mx, lse, sz);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    class_major_stats_f16(x, cs, rows, C, want_sum, mx, lse, sz);
  } else {
    class_major_stats_loop(x, cs, rows, C, want_sum, mx, lse, sz);
  }
}

template <typename scalar_t, typename acc_t>
void class_major_grad(const scalar_t* z, int64_t cs, int64_t rows, int64_t C, const int32_t* y,
                      const acc_t* lse, const acc_t* s, acc_t a_off, acc_t q_off, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    class_major_grad_f32(z, cs, rows, C, y, lse, s, a_off, q_off, out);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    class_major_grad_bf16(z, cs, rows, C, y, lse, s, a_off, q_off, out);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    class_major_grad_f16(z, cs, rows, C, y, lse, s, a_off, q_off, out);
  } else {
    class_major_grad_loop(z, cs, rows, C, y, lse, s, a_off, q_off, out);
  }
}

}  // namespace cpu
}  // namespace fastmargin
