// Typed dispatcher handles of the ops, for C++ code that calls them through the dispatcher (the
// C++ autograd nodes, the fast eager entry), so that every dispatch key (Autograd, CPU, CUDA,
// Python modes) sees the call. Looked up once, on first use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastmargin {

// The typed handle of the op `name` ("fastmargin::..."); callers keep it in a function-local
// static, so the schema is looked up once, on first use (ops defined from Python exist only once
// the package is imported).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using WorstOfKFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using WorstOfKFwdSignature = WorstOfKFwdResult(const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&, double, double,
                                               int64_t, const c10::optional<at::Tensor>&);
using WorstOfKBwdSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const c10::optional<at::Tensor>&, const at::Tensor&,
                                        const at::Tensor&, double, int64_t,
                                        const c10::optional<at::Tensor>&);

// fastmargin::worst_of_k_ce_fwd (csrc/ops.cpp has the schema and its meaning).
inline const c10::TypedOperatorHandle<WorstOfKFwdSignature>& worst_of_k_ce_fwd_op() {
  static const auto op = find_op<WorstOfKFwdSignature>("fastmargin::worst_of_k_ce_fwd");
  return op;
}

// fastmargin::worst_of_k_ce_bwd.
inline const c10::TypedOperatorHandle<WorstOfKBwdSignature>& worst_of_k_ce_bwd_op() {
  static const auto op = find_op<WorstOfKBwdSignature>("fastmargin::worst_of_k_ce_bwd");
  return op;
}

}  // namespace fastmargin
