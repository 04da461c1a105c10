// Counter-based Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; the Random123 constants) and
// the Gaussian noise of the weight-noise loss, as host + device code (FM_HD): the CPU and CUDA
// kernels include this one header, so both produce the same integers for the same counter and
// the same normals up to the rounding-level effect of FMA contraction (see box_muller).
//
// Noise layout (a pure function of its coordinates, nothing is stored between calls):
//   xi(seed, offset, row n, copy j, class c) = normal number (c mod 4) of the Philox block
//     key     = (lo32(seed), hi32(seed))
//     counter = (lo32(w), hi32(w), lo32(n), hi32(n)),  w = offset + (j << 32) + floor(c / 4)  (mod
//     2^64)
// so one Philox call gives the 4 normals of classes 4g .. 4g+3 of one (row, copy), the noise of
// copy j does not depend on k, N or C (a larger call extends a smaller one), and the backward
// regenerates exactly the forward's xi from (seed, offset).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastmargin/ce_math.h"  // FM_HD, FM_UNROLL

namespace fastmargin {

struct Philox4 {
  uint32_t v[4];
};

FM_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // Weyl key increments

// One Philox4x32 round on (v0, v1, v2, v3) with the round key (k0, k1). Shared by the scalar
// generator below and the lane-parallel CPU generator (cpu_noise.h), which runs it on arrays.
FM_HD void philox_round(uint32_t& v0, uint32_t& v1, uint32_t& v2, uint32_t& v3, uint32_t k0,
                        uint32_t k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo32(0xD2511F53u, v0, &hi0);
  const uint32_t lo1 = mulhilo32(0xCD9E8D57u, v2, &hi1);
  v0 = hi1 ^ v1 ^ k0;
  v1 = lo1;
  v2 = hi0 ^ v3 ^ k1;
  v3 = lo0;
}

// Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds.
FM_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  FM_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(ctr.v[0], ctr.v[1], ctr.v[2], ctr.v[3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

FM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The Box-Muller transform is written out in float32 arithmetic (polynomials, integer range
// reduction, selects; no library calls, no branches) so that one definition serves the host and
// the device and the host compiles it lane-parallel (cpu_noise.h). Host and device then differ
// only where a compiler contracts a multiply-add into an FMA (a rounding-level difference).
// Accuracy, measured over every u1 and every u2 the transform can see (2^23 and 2^24 values),
// without / with FMA contraction: log_unit 0.81 / 0.82 ulp, sqrt(-2 log u1) 0.96 ulp, sin and
// cos 1.6 / 0.99 ulp; each normal within 3.2 / 2.6 ulp of the float64 Box-Muller of the same
// (u1, u2) on 4e7 random pairs. The tests check a 4 ulp bound.

// log(u) for a positive normal float u (Cephes' logf): u = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log u = e ln2 + log(1 + x), x = m - 1 exact, log(1 + x) = x - x^2 / 2 + x^3 P(x), and ln2
// split in two so e ln2 adds no rounding error of its own. Relative accuracy holds for u near 1
// (where log u is small) because x is exact. With exponent_offset = s it returns
// log(u * 2^-s): callers scale a subnormal up by 2^s first (cpu_class_major.h's log_lane).
FM_HD float log_unit(float u, int32_t exponent_offset = 0) {
  const uint32_t bits = float_bits(u);
  const float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // in [1/2, 1)
  const bool low = m < 0.707106781186547524f;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 126 - (low ? 1 : 0) - exponent_offset;
  const float x = (low ? m + m : m) - 1.0f;  // exact (Sterbenz)
  const float fe = static_cast<float>(e);
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = p * x * z;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (x + y) + fe * 0.693359375f;
}

// (sin 2 pi u2, cos 2 pi u2) for u2 = m / 2^24, m = b >> 8 in [0, 2^24), reduced exactly in
// integers: 2 pi u2 = q pi / 2 + pi t with the quadrant q = round(m / 2^22) and
// t = (m - q 2^22) / 2^23 in [-1/4, 1/4] (exact in float). sin(pi t) and cos(pi t) are minimax
// polynomials in t^2 (fitted to relative error 3e-9 and 6e-11 on [-1/4, 1/4]), with pi split so
// the leading term pi t rounds once; the quadrant swaps and negates them.
FM_HD void sincos_2pi(uint32_t b, float& s, float& c) {
  const int32_t m = static_cast<int32_t>(b >> 8);
  const int32_t q = (m + (1 << 21)) >> 22;                                      // 0 .. 4
  const float t = static_cast<float>(m - (q << 22)) * 1.1920928955078125e-07f;  // 2^-23
  const float t2 = t * t;
  float ps = -5.8901214600e-01f;
  ps = ps * t2 + 2.5497610569e+00f;
  ps = ps * t2 - 5.1677079201e+00f;
  const float sin_pt = t * 3.14159274101257324f + t * (-8.74227766e-08f + t2 * ps);
  float pc = 2.3136417568e-01f;
  pc = pc * t2 - 1.3350505829e+00f;
  pc = pc * t2 + 4.0587077141e+00f;
  pc = pc * t2 - 4.9348020554e+00f;
  const float cos_pt = 1.0f + t2 * pc;
  const bool swap = (q & 1) != 0;
  const float sign = (q & 2) != 0 ? -1.0f : 1.0f;  // exact products below
  s = sign * (swap ? cos_pt : sin_pt);
  c = sign * (swap ? -sin_pt : cos_pt);
}

// Box-Muller in float32 with every rounding step explicit, so host and device agree:
//   u1 = (floor(a / 2^9) + 1/2) * 2^-23  in [2^-24, 1 - 2^-24]  (exact; never 0, so log is finite)
//   u2 =  floor(b / 2^8)        * 2^-24  in [0, 1)              (exact)
//   radius = sqrtf(-2 log_unit(u1))  (sqrtf is correctly rounded on both)
//   n0 = radius * cos(2 pi u2),  n1 = radius * sin(2 pi u2)  (sincos_2pi, then one float product)
// |n| <= sqrt(48 ln 2) ~ 5.77: the tails beyond 5.77 sigma (probability ~ 1e-8) are cut.
FM_HD void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u1 =
      (static_cast<float>(static_cast<int32_t>(a >> 9)) + 0.5f) * 1.1920928955078125e-07f;
  const float radius = std::sqrt(-2.0f * log_unit(u1));
  float s, c;
  sincos_2pi(b, s, c);
  n0 = radius * c;
  n1 = radius * s;
}

// The 4 normals of classes 4g .. 4g+3 of (row, copy) for the draw (seed, offset).
struct NoiseKey {
  uint64_t seed, offset;

  FM_HD void block(uint64_t row, uint64_t copy, uint64_t group, float (&out)[4]) const {
    const uint64_t w = offset + (copy << 32) + group;
    const Philox4 r =
        philox4x32_10({{static_cast<uint32_t>(w), static_cast<uint32_t>(w >> 32),
                        static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32)}},
                      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    box_muller(r.v[0], r.v[1], out[0], out[1]);
    box_muller(r.v[2], r.v[3], out[2], out[3]);
  }

  // One element (the target's noise, or a scalar tail).
  FM_HD float at(uint64_t row, uint64_t copy, uint64_t c) const {
    float out[4];
    block(row, copy, c >> 2, out);
    const int e = static_cast<int>(c & 3);  // a select chain keeps out[] in registers
    return e == 0 ? out[0] : e == 1 ? out[1] : e == 2 ? out[2] : out[3];
  }
};

// The largest class count the layout addresses (floor(c / 4) must fit in 32 bits) and copy count.
constexpr int64_t kNoiseMaxClasses = int64_t(1) << 34;
constexpr int64_t kNoiseMaxCopies = int64_t(1) << 20;

}  // namespace fastmargin
