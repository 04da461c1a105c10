// The worst-of-k cross-entropy with its reduction as one autograd node
// (csrc/autograd/worst_of_k_ce_autograd.cpp), for the eager fast path (csrc/python/module.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastmargin {

// How the logits hold the (B, k, C) rows the op reads.
enum RowsLayout : int64_t {
  kRowsAsGiven = 0,  // (B, k, C)
  kCopiesFirst = 1,  // (k, B, C): the rows are logits.transpose(0, 1)
  kOneCopy = 2,      // (N, C): the rows are logits.unsqueeze(1), k = 1
  kSpatial = 3,      // contiguous (N, C, d1, ...), k = 1: the rows are the in-place view
                     // (N, S = d1 * ..., 1, C) of their memory (class stride S: no copy)
};

// fastmargin::worst_of_k_ce_fwd on the rows of `logits` in `layout`, then F.cross_entropy's
// reduction (at::Reduction::None / Mean / Sum, as fastmargin::reduce_cross_entropy computes it).
// Returns (loss, worst-copy index (B,)); differentiable in logits, probability targets and
// radius.
std::tuple<at::Tensor, at::Tensor> worst_of_k_ce_loss(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& radius,
    double temperature, double label_smoothing, int64_t ignore_index,
    const c10::optional<at::Tensor>& class_weight, int64_t reduction, int64_t layout);

}  // namespace fastmargin
