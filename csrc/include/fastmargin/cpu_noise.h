// The weight-noise normals on the CPU, lane-parallel: the Philox rounds and the Box-Muller
// transform of philox.h (the very functions the CUDA kernels call) run on arrays of kLanes
// blocks so the compiler vectorises them (csrc/cpu/vec_rows.cpp compiles them for the x86-64
// baseline, AVX2 + FMA and AVX-512). NoiseRows hands out the noise of whole rows (row n, copy j)
// and generates it in batches of rows, so small class counts (C = 10: 3 blocks per row) fill the
// lanes as well as large ones. Host only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastmargin/cpu_vec_math.h"  // kLanes
#include "fastmargin/philox.h"

namespace fastmargin {
namespace cpu {

// out[4 i + e] = normal e of the Philox block with counter (lo32(w[i]), hi32(w[i]), lo32(row[i]),
// hi32(row[i])), for i in [0, count); count is a multiple of kLanes (callers pad).
template <int L = kLanes>
void noise_blocks_loop(uint64_t seed, const uint64_t* w, const uint64_t* row, int64_t count,
                       float* out) {
  for (int64_t i0 = 0; i0 < count; i0 += L) {
    uint32_t v0[L], v1[L], v2[L], v3[L];
    for (int l = 0; l < L; ++l) {
      const Philox4 r = philox4x32_10(
          {{static_cast<uint32_t>(w[i0 + l]), static_cast<uint32_t>(w[i0 + l] >> 32),
            static_cast<uint32_t>(row[i0 + l]), static_cast<uint32_t>(row[i0 + l] >> 32)}},
          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      v0[l] = r.v[0];
      v1[l] = r.v[1];
      v2[l] = r.v[2];
      v3[l] = r.v[3];
    }
    float n0[L], n1[L], n2[L], n3[L];
    for (int l = 0; l < L; ++l) {
      box_muller(v0[l], v1[l], n0[l], n1[l]);
      box_muller(v2[l], v3[l], n2[l], n3[l]);
    }
    float* o = out + 4 * i0;
    for (int l = 0; l < L; ++l) {
      o[4 * l] = n0[l];
      o[4 * l + 1] = n1[l];
      o[4 * l + 2] = n2[l];
      o[4 * l + 3] = n3[l];
    }
  }
}

// The float instantiation, multiversioned in csrc/cpu/vec_rows.cpp.
void noise_blocks_f32(uint64_t seed, const uint64_t* w, const uint64_t* row, int64_t count,
                      float* out);

// Noise rows xi_nj (classes [0, C) rounded up to whole blocks) of the units u = n k + j, handed
// out in increasing u. A miss generates the requested unit and the next wanted units after it
// (wanted(n, j), below unit_end) until about kBatchBlocks Philox blocks are queued; callers ask
// for exactly the units their predicate wants, in order, so every batch is used whole.
class NoiseRows {
 public:
  static constexpr int64_t kBatchBlocks = 512;

  NoiseRows(const NoiseKey& key, int64_t k, int64_t C) : key_(key), k_(k), groups_((C + 3) / 4) {}

  template <typename Wanted>
  const float* get(int64_t n, int64_t j, int64_t unit_end, Wanted&& wanted) {
    const int64_t u = n * k_ + j;
    if (pos_ >= units_.size() || units_[pos_] != u) refill(u, unit_end, wanted);
    return xi_.data() + static_cast<int64_t>(pos_++) * 4 * groups_;
  }

 private:
  template <typename Wanted>
  void refill(int64_t u, int64_t unit_end, Wanted& wanted) {
    units_.clear();
    pos_ = 0;
    for (int64_t v = u;
         v < unit_end && static_cast<int64_t>(units_.size()) * groups_ < kBatchBlocks; ++v) {
      if (v == u || wanted(v / k_, v % k_)) units_.push_back(v);
    }
    const int64_t blocks = static_cast<int64_t>(units_.size()) * groups_;
    const int64_t padded = (blocks + kLanes - 1) / kLanes * kLanes;
    w_.assign(static_cast<size_t>(padded), 0);
    row_.assign(static_cast<size_t>(padded), 0);
    int64_t i = 0;
    for (const int64_t v : units_) {
      const uint64_t base = key_.offset + (static_cast<uint64_t>(v % k_) << 32);
      const uint64_t n = static_cast<uint64_t>(v / k_);
      for (int64_t g = 0; g < groups_; ++g, ++i) {
        w_[i] = base + static_cast<uint64_t>(g);
        row_[i] = n;
      }
    }
    xi_.resize(static_cast<size_t>(4 * padded));
    noise_blocks_f32(key_.seed, w_.data(), row_.data(), padded, xi_.data());
  }

  NoiseKey key_;
  int64_t k_, groups_;
  std::vector<int64_t> units_;
  size_t pos_ = 0;
  std::vector<uint64_t> w_, row_;
  std::vector<float> xi_;
};

}  // namespace cpu
}  // namespace fastmargin
