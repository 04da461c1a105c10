// Counter-based Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; the Random123 constants) and
// the Gaussian noise of the weight-noise loss, as host + device code (FM_HD): the CPU and CUDA
// kernels include this one header, so both produce the same integers for the same counter and
// the same normals up to the last-ulp rounding of logf and sin/cos (sqrtf is correctly rounded).
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

// Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds.
FM_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  FM_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    ctr = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// (sin 2 pi u, cos 2 pi u) for u in [0, 1), accurate for the exact u (no rounded angle): CUDA's
// sincospif (1 ulp, and no slow range-reduction path, so no stack frame in the kernels); on the
// host in double, rounded once to float. Both are within 1 ulp of the true value.
FM_HD void sincos_2pi(float u, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  sincospif(2.0f * u, &s, &c);  // 2u is exact
#else
  const double angle = 6.283185307179586476925 * static_cast<double>(u);
  s = static_cast<float>(std::sin(angle));
  c = static_cast<float>(std::cos(angle));
#endif
}

// Box-Muller in float32 with every rounding step explicit, so host and device agree:
//   u1 = (floor(a / 2^9) + 1/2) * 2^-23  in [2^-24, 1 - 2^-24]  (exact; never 0, so log is finite)
//   u2 =  floor(b / 2^8)        * 2^-24  in [0, 1)              (exact)
//   radius = sqrtf(-2 logf(u1))  (float32; logf within 1 ulp on both, sqrtf correctly rounded)
//   n0 = radius * cos(2 pi u2),  n1 = radius * sin(2 pi u2)  (sincos_2pi, then one float product)
// |n| <= sqrt(48 ln 2) ~ 5.77: the tails beyond 5.77 sigma (probability ~ 1e-8) are cut.
FM_HD void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u1 = (static_cast<float>(a >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
  const float u2 = static_cast<float>(b >> 8) * 5.9604644775390625e-08f;           // 2^-24
  const float radius = std::sqrt(-2.0f * std::log(u1));
  float s, c;
  sincos_2pi(u2, s, c);
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
