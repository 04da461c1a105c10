// F.cross_entropy's 'mean' / 'sum' reductions of per-sample losses (csrc/composite/
// reduce_cross_entropy.cpp), for the op of the same name and the fast eager entry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace fastmargin {

// The divisor of 'mean' for class-index targets: the number of samples whose target is not
// ignore_index (an int64 0-d tensor), or sum_b w_{y_b} over them with class weights w.
at::Tensor index_target_normaliser(const at::Tensor& target, int64_t ignore_index,
                                   const c10::optional<at::Tensor>& weight);

// 'sum': sum_b l_b. 'mean': divided by the number of samples not ignored (class indices), by
// sum_b w_{y_b} over them (class weights w), or by B (probability targets).
at::Tensor reduce_cross_entropy(const at::Tensor& per_sample, const at::Tensor& target,
                                int64_t ignore_index, c10::string_view reduction,
                                const c10::optional<at::Tensor>& weight);

}  // namespace fastmargin
