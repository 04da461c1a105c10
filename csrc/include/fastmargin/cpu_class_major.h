// Row loops of the CPU cross-entropy kernels for class-major rows: (B, 1, C) logits whose rows
// are consecutive (row stride 1) and whose class dim has stride cs (the memory is (C, B), or
// (C, N * S) for spatial logits: fastmargin/_ce_layout.py hands them over so, see
// csrc/cpu/class_last.cpp). Consecutive rows sit next to each other in every class, so a tile of
// kMajorTile rows is a few vector loads per class and every per-row reduction is a lane-parallel
// vector op, with no transpose and no horizontal step; per row the operations run in the order of
// a scalar loop over the classes (the order of cpu_rows.h's small-row passes).
//
// Float rows go through the multiversioned entry points of csrc/cpu/vec_rows.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastmargin/ce_math.h"
#include "fastmargin/cpu_vec_math.h"

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

template <bool kFull, typename scalar_t, typename acc_t>
void class_major_stats_tile(const scalar_t* x, int64_t cs, int64_t r0, int64_t n, int64_t C,
                            bool want_sum, acc_t* mx, acc_t* se, acc_t* sz) {
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
  for (int64_t l = 0; l < n; ++l) {
    mx[r0 + l] = m[l];
    se[r0 + l] = e[l];
    sz[r0 + l] = z[l];
  }
}

// max, sum of exp(x_c - max) (shift 0 where the max is not finite) and, when want_sum, sum of x_c
// of rows [0, rows) (the caller redoes non-finite maxima with the scalar online pass).
template <typename scalar_t, typename acc_t>
void class_major_stats_loop(const scalar_t* x, int64_t cs, int64_t rows, int64_t C, bool want_sum,
                            acc_t* mx, acc_t* se, acc_t* sz) {
  int64_t r0 = 0;
  for (; r0 + kMajorTile <= rows; r0 += kMajorTile) {
    class_major_stats_tile<true>(x, cs, r0, kMajorTile, C, want_sum, mx, se, sz);
  }
  if (r0 < rows) class_major_stats_tile<false>(x, cs, r0, rows - r0, C, want_sum, mx, se, sz);
}

template <bool kFull, typename scalar_t, typename acc_t>
void class_major_grad_tile(const scalar_t* z, int64_t cs, int64_t r0, int64_t n, int64_t C,
                           const acc_t* r, const acc_t* lse, const acc_t* s, acc_t a_off,
                           scalar_t* out) {
  acc_t rl[kMajorTile], ll[kMajorTile], sl[kMajorTile];
  for (int l = 0; l < kMajorTile; ++l) {
    const int64_t i = lane_row<kFull>(r0, l, n);
    rl[l] = r[i];
    ll[l] = lse[i];
    sl[l] = s[i];
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* zc = z + c * cs;
    scalar_t* oc = out + c * cs;
    if (kFull) {
      for (int l = 0; l < kMajorTile; ++l) {
        const acc_t v = static_cast<acc_t>(zc[r0 + l]);
        oc[r0 + l] = static_cast<scalar_t>(sl[l] * (exp_lane(v + rl[l] - ll[l]) - a_off));
      }
    } else {
      for (int64_t l = 0; l < n; ++l) {
        const acc_t v = static_cast<acc_t>(zc[r0 + l]);
        oc[r0 + l] = static_cast<scalar_t>(sl[l] * (exp_lane(v + rl[l] - ll[l]) - a_off));
      }
    }
  }
}

// out[i, c] = s_i * (exp(z_i,c + r_i - lse_i) - a_off) for rows [0, rows) and every class, out
// laid out as z (class stride cs; out may be z: each element is read before it is written): the
// plain-CE softmax gradient of softmax_grad_loop with A = 1, before the target class's rewrite.
template <typename scalar_t, typename acc_t>
void class_major_grad_loop(const scalar_t* z, int64_t cs, int64_t rows, int64_t C, const acc_t* r,
                           const acc_t* lse, const acc_t* s, acc_t a_off, scalar_t* out) {
  int64_t r0 = 0;
  for (; r0 + kMajorTile <= rows; r0 += kMajorTile) {
    class_major_grad_tile<true>(z, cs, r0, kMajorTile, C, r, lse, s, a_off, out);
  }
  if (r0 < rows) class_major_grad_tile<false>(z, cs, r0, rows - r0, C, r, lse, s, a_off, out);
}

void class_major_stats_f32(const float* x, int64_t cs, int64_t rows, int64_t C, bool want_sum,
                           float* mx, float* se, float* sz);
void class_major_grad_f32(const float* z, int64_t cs, int64_t rows, int64_t C, const float* r,
                          const float* lse, const float* s, float a_off, float* out);

template <typename scalar_t, typename acc_t>
void class_major_stats(const scalar_t* x, int64_t cs, int64_t rows, int64_t C, bool want_sum,
                       acc_t* mx, acc_t* se, acc_t* sz) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    class_major_stats_f32(x, cs, rows, C, want_sum, mx, se, sz);
  } else {
    class_major_stats_loop(x, cs, rows, C, want_sum, mx, se, sz);
  }
}

template <typename scalar_t, typename acc_t>
void class_major_grad(const scalar_t* z, int64_t cs, int64_t rows, int64_t C, const acc_t* r,
                      const acc_t* lse, const acc_t* s, acc_t a_off, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    class_major_grad_f32(z, cs, rows, C, r, lse, s, a_off, out);
  } else {
    class_major_grad_loop(z, cs, rows, C, r, lse, s, a_off, out);
  }
}

}  // namespace cpu
}  // namespace fastmargin
