// Host-side argument checks shared by the ops' contracts (worst_of_k_ce.h, weight_noise_ce.h,
// margin.h): the last line of defence for direct torch.ops calls, so every message names the
// argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastmargin {

// Per-row statistics (and the vectors the ops read in that precision) are float32, float64 for
// float64 logits.
inline at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Class-index target: (N,) int64 on the logits' device, N rows (by default logits.size(0)).
inline void check_index_target(const at::Tensor& target, const at::Tensor& logits, int64_t N) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "target: expected shape (", N, ",), got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target: expected int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "target: expected device ", logits.device(),
              ", got ", target.device());
}

inline void check_index_target(const at::Tensor& target, const at::Tensor& logits) {
  check_index_target(target, logits, logits.size(0));
}

// A (len,) vector `name` in the statistics dtype on the logits' device (radius, scale, class
// weights).
inline void check_stats_vector(const at::Tensor& t, const char* name, int64_t len,
                               const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, ": expected shape (", len, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == stats_dtype(logits), name, ": expected dtype ",
              stats_dtype(logits), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(), ", got ",
              t.device());
}

// A tensor `name` on the logits' device: the kernels dereference every input on that device.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(), ", got ",
              t.device());
}

// True when no two elements of t share memory. Sufficient test: sorted by stride, every dim's
// stride steps over the whole extent of the dims below it (stride-0 dims of size > 1 fail).
// Layouts that interleave without overlapping also fail it: callers then refuse, clearly.
inline bool provably_non_overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;  // last element offset reachable by the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= extent) return false;
    extent += stride * (size - 1);
  }
  return true;
}

// True when a and b share storage and the byte ranges they span intersect (conservative: two
// interleaved views that never touch the same element also count).
inline bool memory_ranges_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  auto span = [](const at::Tensor& t) {
    const auto* lo = static_cast<const char*>(t.const_data_ptr());
    int64_t last = 0;  // offset of the last element, in elements
    for (int64_t d = 0; d < t.dim(); ++d) last += t.stride(d) * (t.size(d) - 1);
    return std::make_pair(lo, lo + (last + 1) * static_cast<int64_t>(t.element_size()));
  };
  const auto ra = span(a), rb = span(b);
  return ra.first < rb.second && rb.first < ra.second;
}

}  // namespace fastmargin
