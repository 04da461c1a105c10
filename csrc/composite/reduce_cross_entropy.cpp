// fastmargin::reduce_cross_entropy: F.cross_entropy's reductions of per-sample losses, for every
// target kind. One implementation for every caller: the public functions (through the op, so
// torch.compile traces it like any PyTorch op) and the fast eager entry (csrc/python/module.cpp,
// which calls the function directly).
//
// Registered as CompositeImplicitAutograd: it is written in ATen ops, so autograd of every order,
// forward mode, functorch transforms and torch.compile (which decomposes it) all see those ops.
// Sizes are read as SymInts so that compiled graphs with dynamic shapes trace it.
#include "fastmargin/reduce_cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace fastmargin {

namespace {

// sum_b w_{y_b} over the samples whose target is a class: ignored and out-of-range targets count
// 0 (gathering with them would fault; their loss is 0 or NaN anyway).
at::Tensor selected_weight_sum(const at::Tensor& target, const at::Tensor& weight,
                               int64_t ignore_index) {
  const c10::SymInt num_classes = weight.sym_size(0);
  if (num_classes == 0) return at::zeros({}, weight.options());  // no class is ever valid
  const at::Tensor valid = (target != ignore_index) & (target >= 0) & (target < num_classes);
  const at::Tensor picked = weight.index_select(0, at::where(valid, target, 0));
  return at::where(valid, picked, 0.0).sum();
}

}  // namespace

at::Tensor index_target_normaliser(const at::Tensor& target, int64_t ignore_index,
                                   const c10::optional<at::Tensor>& weight) {
  if (!weight.has_value()) return (target != ignore_index).sum();
  return selected_weight_sum(target, *weight, ignore_index);
}

at::Tensor reduce_cross_entropy(const at::Tensor& per_sample, const at::Tensor& target,
                                int64_t ignore_index, c10::string_view reduction,
                                const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "reduction: reduce_cross_entropy takes 'mean' or 'sum' (callers return the "
                    "per-sample losses themselves for 'none'), got '",
                    reduction, "'");
  at::Tensor total = per_sample.sum();
  if (reduction == "sum") return total;
  // 'mean': F.cross_entropy's normaliser for each target kind.
  if (target.is_floating_point()) return total / c10::Scalar(per_sample.sym_size(0));
  return total / index_target_normaliser(target, ignore_index, weight);
}

TORCH_LIBRARY_IMPL(fastmargin, CompositeImplicitAutograd, m) {
  m.impl("reduce_cross_entropy", &reduce_cross_entropy);
  m.impl("index_target_normaliser", &index_target_normaliser);
}

}  // namespace fastmargin
