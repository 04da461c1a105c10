// CPU row primitives written so that gcc/clang auto-vectorise them at -O3 on any x86-64 / ARM
// baseline (no intrinsics, no -march flags): fixed-width lane arrays for reductions, and a
// branch-free exp. std::exp does not vectorise without -ffast-math, which would also drop the
// NaN/inf semantics the losses need, so fp32 rows use exp_lane below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastmargin {
namespace cpu {

constexpr int kLanes = 16;

// exp(x) for float, ~1 ulp on [-87, 88] (Cephes' expf polynomial): exp(x) = 2^n exp(f) with
// n = round(x / ln 2) and f = x - n ln 2 split in two constants for accuracy. Below -87 it
// returns exactly 0 (so -inf, masked classes, give 0); NaN stays NaN. Arguments here are
// logits minus their row max or lse, so x > 88 does not occur (it is clamped, not inf).
//
// Written for few vector instructions, since this is the inner cost of every CPU kernel: the
// clamps are a min and a max (a NaN passes both: every comparison with it is false); n is
// rounded in float by the 1.5 * 2^23 shift, whose low mantissa bits then hold n (integer
// arithmetic on a bit pattern, defined for any input, unlike a float-to-int conversion of NaN);
// and a NaN x needs no test of its own: f, so the result, is NaN.
inline float exp_lane(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: t's mantissa holds round(xc / ln 2)
  const float t = xc * 1.44269504088896341f + kShift;
  const float fn = t - kShift;
  const float f = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float y = p * f * f + f + 1.0f;
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  // 2^n: n = t_bits - bits(kShift) in [-126, 127] on the clamped range, biased by 127.
  const uint32_t bits = (t_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = y * scale;
  return x < -87.0f ? 0.0f : result;
}

inline double exp_lane(double x) { return std::exp(x); }

// max over buf[0, n) ignoring NaN (a NaN reaches the loss through the sum of exps instead).
template <typename acc_t>
acc_t lane_max(const acc_t* buf, int64_t n) {
  acc_t m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) m[l] = buf[i + l] > m[l] ? buf[i + l] : m[l];
  }
  for (; i < n; ++i) m[0] = buf[i] > m[0] ? buf[i] : m[0];
  acc_t out = m[0];
  for (int l = 1; l < kLanes; ++l) out = m[l] > out ? m[l] : out;
  return out;
}

// sum over buf[0, n) of exp(buf[i] - shift) (shift finite).
template <typename acc_t>
acc_t lane_sum_exp(const acc_t* buf, int64_t n, acc_t shift) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += exp_lane(buf[i + l] - shift);
  }
  for (; i < n; ++i) s[0] += exp_lane(buf[i] - shift);
  acc_t out = 0;
  for (int l = 0; l < kLanes; ++l) out += s[l];
  return out;
}

template <typename acc_t>
acc_t lane_sum(const acc_t* buf, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += buf[i + l];
  }
  for (; i < n; ++i) s[0] += buf[i];
  acc_t out = 0;
  for (int l = 0; l < kLanes; ++l) out += s[l];
  return out;
}

}  // namespace cpu
}  // namespace fastmargin
