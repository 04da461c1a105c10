// Host-side contract of the worst-of-k cross-entropy ops, shared by the CPU and CUDA files:
// argument checks (the last line of defence for direct torch.ops calls; the Python layer
// validates first with friendlier messages) and output allocation.
//
// Layout: logits is (B, k, C) with the class dim contiguous and the other two strides
// arbitrary, so both public copy layouts ((B, k, C) and a transposed (k, B, C)) arrive
// without a copy. Class-major rows (a strided class dim: kernel_layout below) are also taken.
// Spatial rows: 4-D logits (N, S, k, C) hold B = N * S rows, row b = n * S + s (the outputs are
// (B,) and (B, k) as for 3-D logits). Their main use is contiguous (N, C, S) logits seen as
// logits.view(N, C, S, 1).permute(0, 2, 3, 1), which the kernels read in place for the plain
// loss (class stride S, no copy, the gradient in the same layout: kernel_layout's kClassMajor);
// any other 4-D logits run on a (B, k, C) copy.
// Per-row statistics are float32 (float64 for float64 logits).
//
// Targets: (B,) int64 class indices, or floating class probabilities (soft targets), either
// (B, C) shared by the k copies or (B, k, C) one row per copy (class dim contiguous, other
// strides arbitrary). Optional class_weight: (C,) in the statistics dtype. Either one selects
// the weighted path (ce_weighted_math.h); index targets without class weights keep the
// original (plain) arithmetic unchanged.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "fastmargin/checks.h"

namespace fastmargin {

// The number of rows B of (B, k, C) or spatial (N, S, k, C) logits (N * S).
inline int64_t num_rows(const at::Tensor& logits) {
  return logits.dim() == 4 ? logits.size(0) * logits.size(1) : logits.size(0);
}

// The copies k and classes C: the last two dims in either form.
inline int64_t num_copies(const at::Tensor& logits) { return logits.size(logits.dim() - 2); }
inline int64_t num_classes(const at::Tensor& logits) { return logits.size(logits.dim() - 1); }

inline void check_worst_of_k_logits(const at::Tensor& logits, bool class_strided_ok = false) {
  TORCH_CHECK(logits.dim() == 3 || logits.dim() == 4,
              "logits: expected a 3-D (B, k, C) tensor (or 4-D (N, S, k, C) spatial rows), got ",
              logits.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits: expected a floating dtype, got ",
              logits.scalar_type());
  const int64_t C = num_classes(logits);
  TORCH_CHECK(class_strided_ok || C <= 1 || logits.stride(logits.dim() - 1) == 1,
              "logits: the class dim must be contiguous (stride 1)");
}

inline void check_worst_of_k_inputs(const at::Tensor& logits, const at::Tensor& target,
                                    const c10::optional<at::Tensor>& radius,
                                    bool class_strided_ok = false) {
  check_worst_of_k_logits(logits, class_strided_ok);
  const int64_t B = num_rows(logits);
  check_index_target(target, logits, B);
  if (radius.has_value()) check_stats_vector(*radius, "radius", B, logits);
}

// A floating target holds class probabilities (soft targets); an integer one class indices.
inline bool is_soft_target(const at::Tensor& target) {
  return at::isFloatingType(target.scalar_type());
}

// Probability targets: (B, C) shared by the k copies or (B, k, C) one row per copy, class dim
// contiguous, other strides arbitrary; dtype the logits' dtype, or float32 for half/bfloat16
// logits (float32 mixing ratios need not be rounded to the logits' precision).
inline void check_soft_target(const at::Tensor& logits, const at::Tensor& target,
                              const c10::optional<at::Tensor>& radius) {
  check_worst_of_k_logits(logits);
  const int64_t B = logits.size(0), k = logits.size(1), C = logits.size(2);
  const bool shared = target.dim() == 2 && target.size(0) == B && target.size(1) == C;
  const bool per_copy =
      target.dim() == 3 && target.size(0) == B && target.size(1) == k && target.size(2) == C;
  TORCH_CHECK(shared || per_copy, "target: expected probabilities of shape (", B, ", ", C, ") or (",
              B, ", ", k, ", ", C, "), got ", target.sizes());
  // An empty class dim has no distribution to match (and an empty target has no data to read).
  TORCH_CHECK(C > 0, "logits: probability targets need at least one class, got C = 0");
  const auto dt = target.scalar_type(), lt = logits.scalar_type();
  const bool low = lt == at::kHalf || lt == at::kBFloat16;
  TORCH_CHECK(dt == lt || (low && dt == at::kFloat),
              "target: probability targets must have the logits' dtype ", lt,
              low ? " or float32" : "", ", got ", dt);
  TORCH_CHECK(target.size(-1) <= 1 || target.stride(-1) == 1,
              "target: the class dim must be contiguous (stride 1)");
  TORCH_CHECK(target.device() == logits.device(), "target: expected device ", logits.device(),
              ", got ", target.device());
  TORCH_CHECK(!radius.has_value(),
              "radius: the weight-robust radius is not supported with probability targets");
}

// How a device's kernels read the logits rows:
// - kRows: a contiguous class dim (the ops' contract);
// - kClassMajor: class-major rows (B, 1, C), a strided class dim with consecutive rows (row
//   stride 1), the layout spatial logits come in from fastmargin::_class_last (memory
//   (C, N * d1 * ...)); or spatial rows (N, S, 1, C) with consecutive positions (stride 1) and a
//   strided class dim, the in-place view of contiguous (N, C, S) logits (memory (N, C, S), class
//   stride S: a class-major block per sample). The kernels read them in place: on the CPU with
//   consecutive rows in the lanes of a vector, on CUDA with a thread per row (consecutive threads
//   on consecutive positions, every access coalesced). Only the plain loss (index targets, no
//   class weights, no radius) with at most max_classes classes reads them so;
// - kCopy: other class-major calls and other 4-D logits, which the op runs on a contiguous
//   (B, k, C) copy of the rows (rows_copy; the gradient is copied back into the logits'
//   layout). Any other strided class dim is refused by the checks.
enum class KernelLayout { kRows, kClassMajor, kCopy };

// A strided class dim (of more than one class): the kernels' test for class-major rows.
inline bool is_class_major(int64_t C, int64_t cs) { return C > 1 && cs != 1; }

inline KernelLayout kernel_layout(const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& radius,
                                  const c10::optional<at::Tensor>& class_weight,
                                  int64_t max_classes) {
  bool class_major = false;
  if (logits.dim() == 3) {
    class_major = is_class_major(logits.size(2), logits.stride(2)) && logits.size(1) == 1 &&
                  logits.stride(0) == 1;
  } else if (logits.dim() == 4) {
    class_major = is_class_major(logits.size(3), logits.stride(3)) && logits.size(2) == 1 &&
                  (logits.size(1) <= 1 || logits.stride(1) == 1);
    if (!class_major) return KernelLayout::kCopy;
  }
  if (!class_major) return KernelLayout::kRows;
  const bool plain = !radius.has_value() && !class_weight.has_value() && !is_soft_target(target);
  return plain && num_classes(logits) <= max_classes ? KernelLayout::kClassMajor
                                                     : KernelLayout::kCopy;
}

// The (B, k, C) rows of kCopy calls: a contiguous copy (a view where 4-D logits already are
// contiguous rows).
inline at::Tensor rows_copy(const at::Tensor& logits) {
  if (logits.dim() != 4) return logits.contiguous();
  return logits.reshape({num_rows(logits), num_copies(logits), num_classes(logits)}).contiguous();
}

// Rows of a kCopy call written back over the logits they came from (unless they are a view of
// them, already written).
inline void copy_rows_back(const at::Tensor& logits, const at::Tensor& rows) {
  if (!rows.is_alias_of(logits)) logits.copy_(rows.view(logits.sizes()));
}

// Whether a backward into `grad` (empty_like(logits)) runs on a contiguous copy of the rows and
// copies the result back: kCopy calls, and class-major rows whose gradient buffer is not laid out
// as the logits (empty_like of logits that are not dense), since the kernels write the gradient
// with the logits' strides.
inline bool backward_through_copy(KernelLayout layout, const at::Tensor& logits,
                                  const at::Tensor& grad) {
  if (layout == KernelLayout::kCopy) return true;
  if (layout != KernelLayout::kClassMajor) return false;
  for (int64_t d = 0; d < logits.dim(); ++d) {
    if (logits.size(d) > 1 && grad.stride(d) != logits.stride(d)) return true;
  }
  return false;
}

// Class weights: (C,) contiguous in the statistics dtype (float32, float64 for float64 logits).
inline void check_class_weight(const at::Tensor& logits,
                               const c10::optional<at::Tensor>& class_weight) {
  if (!class_weight.has_value()) return;
  check_stats_vector(*class_weight, "class_weight", num_classes(logits), logits);
}

// All forward arguments; true when the weighted (class weight or soft target) path runs.
inline bool check_worst_of_k_args(const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& radius,
                                  const c10::optional<at::Tensor>& class_weight,
                                  bool class_strided_ok = false) {
  if (is_soft_target(target)) {
    check_soft_target(logits, target, radius);
  } else {
    check_worst_of_k_inputs(logits, target, radius, class_strided_ok);
  }
  check_class_weight(logits, class_weight);
  return class_weight.has_value() || is_soft_target(target);
}

// (stride over samples, stride over copies) of a soft target seen as (B, k, C): a shared
// (B, C) row has copy stride 0.
inline std::pair<int64_t, int64_t> soft_target_strides(const at::Tensor& target) {
  return target.dim() == 2 ? std::make_pair(target.stride(0), int64_t(0))
                           : std::make_pair(target.stride(0), target.stride(1));
}

// The weighted path's dispatch: logits dtype, then the soft target's dtype (the logits' dtype
// or float32); index targets instantiate target_t = scalar_t (unused).
template <typename F>
inline void dispatch_weighted(const at::Tensor& logits, const at::Tensor& target, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "worst_of_k_ce_weighted", [&] {
        if constexpr (std::is_same_v<scalar_t, at::Half> ||
                      std::is_same_v<scalar_t, at::BFloat16>) {
          if (is_soft_target(target) && target.scalar_type() == at::kFloat) {
            body(scalar_t(0), float(0));
            return;
          }
        }
        body(scalar_t(0), scalar_t(0));
      });
}

struct WorstOfKForward {
  at::Tensor loss;     // (B,)   worst-of-k (or smooth-max) loss per sample
  at::Tensor lse;      // (B, k) logsumexp of every (robust) row, saved for the backward
  at::Tensor weight;   // (B, k) dL_b / dl_bj: one-hot worst copy (tau = 0) or softmax (tau > 0)
  at::Tensor index;    // (B,)   int64 worst copy
  at::Tensor dradius;  // (B,)   dL_b / dr_b, or (0,) when there is no radius

  static WorstOfKForward allocate(const at::Tensor& logits, bool with_radius) {
    const int64_t B = num_rows(logits), k = num_copies(logits);
    auto f = logits.options().dtype(stats_dtype(logits));
    return {at::empty({B}, f), at::empty({B, k}, f), at::empty({B, k}, f),
            at::empty({B}, logits.options().dtype(at::kLong)), at::empty({with_radius ? B : 0}, f)};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {loss, lse, weight, index, dradius};
  }
};

inline bool check_worst_of_k_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target,
                                      const c10::optional<at::Tensor>& radius,
                                      const at::Tensor& lse, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& class_weight,
                                      bool class_strided_ok = false) {
  const bool weighted =
      check_worst_of_k_args(logits, target, radius, class_weight, class_strided_ok);
  const int64_t B = num_rows(logits), k = num_copies(logits);
  const auto f = stats_dtype(logits);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B && grad_loss.scalar_type() == f,
              "grad_loss: expected (", B, ",) of dtype ", f);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == k && lse.scalar_type() == f &&
                  lse.is_contiguous(),
              "lse: expected contiguous (", B, ", ", k, ") of dtype ", f);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == B && weight.size(1) == k &&
                  weight.scalar_type() == f && weight.is_contiguous(),
              "weight: expected contiguous (", B, ", ", k, ") of dtype ", f);
  check_same_device(grad_loss, "grad_loss", logits);
  check_same_device(lse, "lse", logits);
  check_same_device(weight, "weight", logits);
  return weighted;
}

// The in-place backward writes every logit once, as its own gradient: logits whose elements
// share memory (expanded copies, overlapping views) would have one element written by several
// rows (zeros from unselected copies among them), and a soft target in the logits' memory would
// be overwritten before other rows read it.
inline void check_inplace_backward(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(provably_non_overlapping(logits),
              "logits: the in-place backward needs logits whose elements do not share memory, got "
              "sizes ",
              logits.sizes(), " with strides ", logits.strides(),
              " (an expanded or overlapping view); use the out-of-place backward");
  if (is_soft_target(target)) {
    TORCH_CHECK(!memory_ranges_intersect(logits, target),
                "target: the probability target shares memory with the logits, which the in-place "
                "backward overwrites; pass a separate target or use the out-of-place backward");
  }
}

}  // namespace fastmargin
