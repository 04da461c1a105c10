// Multiclass-margin math shared by the CPU and CUDA kernels (host + device).
//
// Notation (docs/design.md): z a row of logits, y its target, C >= 2 classes. The margin is
//   m = z_y - max_{c != y} z_c,
// and the class attaining the max (the "runner-up" r) is saved so the backward is
//   dm/dz_y = +1, dm/dz_r = -1, 0 elsewhere.
// Ties for the runner-up go to the lowest index; a NaN logit off the target wins (the lowest NaN
// index), so a NaN anywhere in a row makes its margin NaN, as a max over the row would.
#pragma once

#include <cstdint>

#include "fastmargin/ce_math.h"

namespace fastmargin {

// Running max over the classes c != y, with its index (-1 until a class has been seen).
template <typename acc_t>
struct RunnerUp {
  acc_t value;
  int64_t index;

  FM_HD static RunnerUp empty() { return {neg_inf<acc_t>(), -1}; }

  // Adds class i. Callers add their classes in ascending order, so a strict comparison keeps the
  // lowest index among ties (and the first NaN).
  FM_HD void add(acc_t x, int64_t i) {
    if (index < 0 || (!is_nan(value) && (is_nan(x) || x > value))) {
      value = x;
      index = i;
    }
  }

  // Whether `o` ranks above this: seen beats unseen, NaN beats numbers, larger beats smaller,
  // then the lower index. A total order, so any reduction tree picks the same runner-up.
  FM_HD bool beaten_by(const RunnerUp& o) const {
    if (o.index < 0) return false;
    if (index < 0) return true;
    const bool on = is_nan(o.value), tn = is_nan(value);
    if (on != tn) return on;
    if (!on && o.value != value) return o.value > value;
    return o.index < index;
  }

  FM_HD void merge(const RunnerUp& o) {
    if (beaten_by(o)) *this = o;
  }
};

// Whether a target value names a class (the margin has no ignore_index: anything else is invalid
// and gives a NaN margin without any logits being read).
FM_HD bool valid_class(int64_t y, int64_t C) { return y >= 0 && y < C; }

// d(sum_n g_n m_n)/dz_c for one row: +g at the target, -g at the runner-up, 0 elsewhere.
template <typename acc_t>
FM_HD acc_t margin_grad(int64_t c, int64_t y, int64_t runner_up, acc_t g) {
  acc_t v = acc_t(0);
  if (c == y) v += g;
  if (c == runner_up) v -= g;
  return v;
}

}  // namespace fastmargin
